"""Time of the three MoE dispatch forms (dense, grouped, looped) by number of tokens, at the tiny preset's shape.

    python -m benchmarks.moe_dispatch

Sets `DENSE_DISPATCH_MAX_TOKENS` in modeling_itera/moe.py: the dense form (every expert on every token) wins for a
few tokens, the grouped matmul for many. Forward only, no autograd (decode and prefill), and forward + backward.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.peers import PRESETS, timed
from modeling_itera import IteraLiteConfig
from modeling_itera.moe import IteraLiteSparseMoE


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 32, 64, 128, 512, 4096])
    args = parser.parse_args(argv)
    moe = IteraLiteSparseMoE(IteraLiteConfig(**PRESETS[args.preset]))
    result = {}
    print("| tokens | pass | dense ms | grouped ms | looped ms |\n|---:|---|---:|---:|---:|")
    for t in args.tokens:
        x = torch.randn(1, t, moe.router.in_features)
        for kind in ("forward", "forward+backward"):
            row = {}
            for dispatch in ("dense", "grouped", "looped"):
                if kind == "forward":

                    def run(dispatch=dispatch, x=x):
                        with torch.no_grad():
                            moe(x, dispatch=dispatch)
                else:

                    def run(dispatch=dispatch, x=x):
                        moe(x.requires_grad_(), dispatch=dispatch)[0].sum().backward()

                row[dispatch] = timed(run, repeats=5 if t < 1024 else 2) * 1e3
            result[f"{t}/{kind}"] = row
            print(f"| {t} | {kind} | {row['dense']:.3f} | {row['grouped']:.3f} | {row['looped']:.3f} |", flush=True)
    return result


if __name__ == "__main__":
    main()
