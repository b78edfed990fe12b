"""Training speed: forward + backward + AdamW step, Itera-Lite against Llama and Mamba-2 in one process.

python -m benchmarks.train           # batch 8 x 512 tokens; writes benchmarks/results/train.json and train.png
python -m benchmarks.train --quick   # a tiny batch, to check that it runs
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.peers import build, machine, parameters, save, timed

MODELS = ["itera-lite", "llama", "mamba2"]


def train_tps(model, batch: int, length: int, repeats: int) -> float:
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(3, model.config.vocab_size, (batch, length))

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return batch * length / timed(step, repeats)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=512)
    args = parser.parse_args(argv)
    batch, length, repeats = (2, 32, 1) if args.quick else (args.batch, args.length, 3)
    torch.manual_seed(0)
    result = {"machine": machine(), "preset": args.preset, "batch": batch, "length": length, "models": {}}
    for name in MODELS:
        model = build(name, args.preset)
        tps = train_tps(model, batch, length, repeats)
        result["models"][name] = {"parameters": parameters(model), "train_tokens_per_s": tps}
        print(f"{name}: {tps:.0f} tokens/s", flush=True)
    rows = result["models"]
    result["ratios"] = {
        "vs_llama": rows["itera-lite"]["train_tokens_per_s"] / rows["llama"]["train_tokens_per_s"],
        "vs_mamba2": rows["itera-lite"]["train_tokens_per_s"] / rows["mamba2"]["train_tokens_per_s"],
    }
    print(f"\n| model | params | train tokens/s ({batch} x {length}, fwd+bwd+AdamW) |\n|---|---:|---:|")
    for name, row in rows.items():
        print(f"| {name} | {row['parameters'] / 1e6:.2f}M | {row['train_tokens_per_s']:.0f} |")
    print("ratios:", {k: round(v, 2) for k, v in result["ratios"].items()})
    if not args.quick:
        save("train", result)
        plot(result)
    return result


def plot(result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from benchmarks.peers import RESULTS

    names = list(result["models"])
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.bar(names, [result["models"][n]["train_tokens_per_s"] for n in names], color=["C0", "C1", "C2"])
    ax.set_ylabel("training tokens/s")
    ax.set_title(f"fwd+bwd+AdamW, {result['batch']} x {result['length']} tokens, CPU")
    fig.tight_layout()
    fig.savefig(RESULTS / "train.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
