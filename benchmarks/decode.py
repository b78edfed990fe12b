"""Generation speed of Itera-Lite against Llama and Mamba-2 of the same width, depth and vocabulary, in one process.

    python -m benchmarks.decode            # full run, writes benchmarks/results/decode.json and decode.png
    python -m benchmarks.decode --quick    # a few tokens each, to check that it runs

Measures: batch-1 greedy `generate` tokens/s (256 new tokens after a 16-token prompt); the same for Itera-Lite
without its cache (it then re-runs the whole prefix for every token, as the original Itera-Lite code did); decode
tokens/s at several context lengths (after a prefill of that length) and the cache's bytes per sequence there;
batch-32 against batch-1 aggregate tokens/s; prefill tokens/s of a 2048-token prompt.
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.peers import build, machine, parameters, save, timed
from modeling_itera.modeling_itera import cache_nbytes

MODELS = ["itera-lite", "llama", "mamba2"]


def generate_tps(model, batch: int, prompt_len: int, new_tokens: int, use_cache: bool = True, repeats: int = 2):
    vocab = model.config.vocab_size
    prompt = torch.randint(3, vocab, (batch, prompt_len))
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=use_cache)
    with torch.no_grad():
        seconds = timed(lambda: model.generate(prompt, attention_mask=torch.ones_like(prompt), **kwargs), repeats)
    return batch * new_tokens / seconds


@torch.no_grad()
def decode_at_context(model, context: int, new_tokens: int) -> tuple[float, int]:
    """Greedy decode tokens/s after a prefill of `context` tokens, and the cache's bytes at that point."""
    prompt = torch.randint(3, model.config.vocab_size, (1, context))
    out = model(prompt, use_cache=True, logits_to_keep=1)
    cache, token = out.cache, out.logits[:, -1:].argmax(-1)
    nbytes = cache_nbytes(cache)

    def run():
        nonlocal cache, token
        for _ in range(new_tokens):
            out = model(token, cache=cache, use_cache=True, logits_to_keep=1)
            cache, token = out.cache, out.logits[:, -1:].argmax(-1)

    run()  # warm-up (an attention cache grows by new_tokens here: negligible next to `context`)
    t0 = time.perf_counter()
    run()
    return new_tokens / (time.perf_counter() - t0), nbytes


@torch.no_grad()
def prefill_tps(model, length: int, repeats: int = 2) -> float:
    prompt = torch.randint(3, model.config.vocab_size, (1, length))
    return length / timed(lambda: model(prompt, use_cache=True, logits_to_keep=1), repeats)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks that the script runs")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--contexts", type=int, nargs="+", default=[64, 1024, 8192])
    args = parser.parse_args(argv)
    new_tokens, contexts, prefill_len, batch = (256, args.contexts, 2048, 32)
    if args.quick:
        new_tokens, contexts, prefill_len, batch = (4, [16, 64], 64, 4)
    torch.manual_seed(0)
    models = {name: build(name, args.preset) for name in MODELS}
    result = {"machine": machine(), "preset": args.preset, "new_tokens": new_tokens, "models": {}}
    for name, model in models.items():
        row = {"parameters": parameters(model)}
        row["decode_tps_batch1"] = generate_tps(model, 1, 16, new_tokens)
        if name != "mamba2":  # the context table compares the recurrent cache with Llama's growing KV cache
            row["decode_by_context"] = {}
            for context in contexts:
                tps, nbytes = decode_at_context(model, context, min(64, new_tokens))
                row["decode_by_context"][context] = {"tokens_per_s": tps, "cache_bytes": nbytes}
        row[f"decode_tps_batch{batch}"] = generate_tps(model, batch, 16, max(4, new_tokens // 4), repeats=1)
        row["prefill_tps"] = prefill_tps(model, prefill_len)
        result["models"][name] = row
        print(name, {k: v for k, v in row.items() if k != "decode_by_context"}, flush=True)
    itera = models["itera-lite"]
    result["itera_no_cache_tps"] = generate_tps(itera, 1, 16, min(new_tokens, 64), use_cache=False, repeats=1)
    summarize(result, batch)
    if not args.quick:
        save("decode", result)
        plot(result)
    return result


def summarize(result: dict, batch: int) -> None:
    rows = result["models"]
    it, ll, m2 = rows["itera-lite"], rows["llama"], rows["mamba2"]
    contexts = sorted(it["decode_by_context"], key=int)
    lo, hi = contexts[0], contexts[-1]
    result["ratios"] = {
        "decode_vs_llama": it["decode_tps_batch1"] / ll["decode_tps_batch1"],
        "decode_vs_mamba2": it["decode_tps_batch1"] / m2["decode_tps_batch1"],
        "decode_vs_no_cache": it["decode_tps_batch1"] / result["itera_no_cache_tps"],
        f"context_{hi}_vs_{lo}": it["decode_by_context"][hi]["tokens_per_s"]
        / it["decode_by_context"][lo]["tokens_per_s"],
        f"batch{batch}_vs_batch1": it[f"decode_tps_batch{batch}"] / it["decode_tps_batch1"],
        "prefill_vs_llama": it["prefill_tps"] / ll["prefill_tps"],
    }
    print(f"\n| model | params | decode tok/s (b=1) | decode tok/s (b={batch}) | prefill tok/s |")
    print("|---|---:|---:|---:|---:|")
    for name, row in rows.items():
        print(
            f"| {name} | {row['parameters'] / 1e6:.2f}M | {row['decode_tps_batch1']:.0f} | "
            f"{row[f'decode_tps_batch{batch}']:.0f} | {row['prefill_tps']:.0f} |"
        )
    print("\n| context | itera-lite tok/s | itera-lite cache bytes/seq | llama tok/s | llama cache bytes/seq |")
    print("|---:|---:|---:|---:|---:|")
    for c in contexts:
        a, b = it["decode_by_context"][c], ll["decode_by_context"][c]
        print(
            f"| {c} | {a['tokens_per_s']:.0f} | {a['cache_bytes']:,} | {b['tokens_per_s']:.0f} | {b['cache_bytes']:,} |"
        )
    print("\nratios:", {k: round(v, 2) for k, v in result["ratios"].items()})


def plot(result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from benchmarks.peers import RESULTS

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, row in result["models"].items():
        if "decode_by_context" in row:
            xs = sorted(row["decode_by_context"], key=int)
            ax.plot([int(x) for x in xs], [row["decode_by_context"][x]["tokens_per_s"] for x in xs], "o-", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens already in the sequence)")
    ax.set_ylabel("decode tokens/s (batch 1)")
    ax.set_title(f"Decode speed against context, {result['preset']} size, CPU")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "decode.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
