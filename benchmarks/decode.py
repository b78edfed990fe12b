"""Generation speed of Itera-Lite against Llama and Mamba-2 of the same width, depth and vocabulary, in one process.

    python -m benchmarks.decode            # full run (~15 min on 2 cores): benchmarks/results/decode.json + decode.png
    python -m benchmarks.decode --quick    # a few tokens each, to check that it runs

Every model runs eager and compiled. Compiled means what a transformers user writes: `generate(...,
compile_config=CompileConfig(fullgraph=True))`; peers also get `cache_implementation="static"` (their KV cache must
be static to compile), and all of them the Inductor settings that Itera-Lite uses by itself on CPU.

Measures: greedy `generate` tokens/s at batch 1/8/32 (256/128/64 new tokens after a 16-token prompt); decode
tokens/s at several context lengths and the cache's bytes per sequence there (Llama's KV cache is filled with random
keys and values of that length, which costs what a real one does and needs no quadratic prefill); Itera-Lite in
bf16 and bitsandbytes nf4/int8; a 2048-token prefill; Itera-Lite without its cache (the original code's way); and
the compile time, cold and with Inductor's on-disk cache warm (two fresh processes sharing one cache folder).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time

import torch
from transformers import CompileConfig, DynamicCache

from benchmarks.peers import build, machine, parameters, save, timed
from modeling_itera.generation import compiled_decode_step, inductor_cpu_settings
from modeling_itera.modeling_itera import cache_nbytes

MODELS = ["itera-lite", "llama", "mamba2"]
SETTINGS = ["eager", "compiled"]
PROMPT = 16


def compile_kwargs(model) -> dict:
    """The generate() arguments that compile the decode step on this device, for any of the models."""
    config = CompileConfig(fullgraph=True)
    config._compile_all_devices = True  # transformers compiles on accelerators only unless told
    kwargs = {"compile_config": config}
    if not model.config.model_type.startswith("itera"):
        kwargs["cache_implementation"] = "static"  # Itera-Lite picks it itself when given a compile_config
    return kwargs


def generate_call(model, batch: int, new_tokens: int, setting: str, use_cache: bool = True):
    prompt = torch.randint(3, model.config.vocab_size, (batch, PROMPT))
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=use_cache)
    if setting == "compiled":
        kwargs.update(compile_kwargs(model))
    # peers get Itera-Lite's own Inductor settings for CPU (it applies them itself: a second patch changes nothing)
    wrapper = inductor_cpu_settings() if setting == "compiled" else contextlib.nullcontext()

    @torch.no_grad()
    def run():
        with wrapper:
            model.generate(prompt, attention_mask=torch.ones_like(prompt), **kwargs)

    return run


def generate_tps(model, batch: int, new_tokens: int, setting: str = "eager", repeats: int = 2, **kw) -> dict:
    run = generate_call(model, batch, new_tokens, setting, **kw)
    start = time.perf_counter()
    run()  # the first call compiles (compiled setting); timed() warms up once more
    first = time.perf_counter() - start
    seconds = timed(run, repeats)
    return {"tokens_per_s": batch * new_tokens / seconds, "first_call_s": first, "steady_call_s": seconds}


def interleaved_tps(runs: dict, tokens: int, repeats: int = 2) -> dict:
    """Tokens/s of each model's generate call: first every model's first call (which compiles), then rounds that
    time every model in turn, best of `repeats` (after a warm-up round). On this shared machine a load that drifts
    then touches every model alike, and the ratios hold."""
    cells, best = {}, {}
    for name, run in runs.items():
        start = time.perf_counter()
        try:
            run()
        except Exception as err:  # e.g. a peer whose decode step does not compile
            cells[name] = {"error": f"{type(err).__name__}: {err}"[:300]}
            continue
        cells[name], best[name] = {"first_call_s": time.perf_counter() - start}, float("inf")
    for round_ in range(repeats + 1):
        for name in best:
            start = time.perf_counter()
            runs[name]()
            if round_:
                best[name] = min(best[name], time.perf_counter() - start)
    for name, seconds in best.items():
        cells[name].update(tokens_per_s=tokens / seconds, steady_call_s=seconds)
    return cells


def fill_kv_cache(model, context: int) -> DynamicCache:
    """A Llama KV cache holding `context` random positions: decoding after it costs what it would after a prompt."""
    cfg = model.config
    cache = DynamicCache(config=cfg)
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    for layer in range(cfg.num_hidden_layers):
        k, v = (torch.randn(1, cfg.num_key_value_heads, context, head_dim) for _ in range(2))
        cache.update(k, v, layer)
    return cache


@torch.no_grad()
def decode_at_context(model, context: int, new_tokens: int, setting: str) -> dict:
    """Decode tokens/s after `context` tokens, and the cache's bytes per sequence at that point."""
    if model.config.model_type == "llama":
        cache = fill_kv_cache(model, context)
        token = torch.randint(3, model.config.vocab_size, (1, 1))
    else:
        prompt = torch.randint(3, model.config.vocab_size, (1, context))
        out = model(prompt, use_cache=True, logits_to_keep=1)
        cache, token = out.cache, out.logits[:, -1:].argmax(-1)
    nbytes = cache_nbytes(cache)
    step = compiled_decode_step(model) if setting == "compiled" else model

    def run(n):
        nonlocal cache, token
        for _ in range(n):
            out = step(input_ids=token, cache=cache, use_cache=True, logits_to_keep=1)
            cache, token = out.cache, out.logits[:, -1:].argmax(-1)

    run(4)  # warm-up and compilation (an attention cache grows by a few tokens here: negligible)
    start = time.perf_counter()
    run(new_tokens)
    return {"tokens_per_s": new_tokens / (time.perf_counter() - start), "cache_bytes": nbytes}


@torch.no_grad()
def prefill_tps(model, length: int, repeats: int = 2) -> float:
    prompt = torch.randint(3, model.config.vocab_size, (1, length))
    return length / timed(lambda: model(prompt, use_cache=True, logits_to_keep=1), repeats)


def quantized_rows(new_tokens: int) -> dict:
    """Itera-Lite loaded in fp32 and bf16 (eager and compiled) and bitsandbytes nf4 / int8 (eager: transformers does
    not compile bitsandbytes models), batch 1, one after the other."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from modeling_itera.defaults import nf4_config

    rows = {}
    with tempfile.TemporaryDirectory() as folder:
        build("itera-lite").save_pretrained(folder)
        variants = {
            "fp32": dict(dtype=torch.float32),  # the reference of this table, measured beside the others
            "bf16": dict(dtype=torch.bfloat16),
            "nf4": dict(quantization_config=nf4_config()),
            "int8": dict(quantization_config=BitsAndBytesConfig(load_in_8bit=True)),
        }
        for name, load in variants.items():
            try:
                model = AutoModelForCausalLM.from_pretrained(folder, **load).eval()
                for setting in ["eager", "compiled"] if name in ("fp32", "bf16") else ["eager"]:
                    rows[f"{name}/{setting}"] = generate_tps(model, 1, new_tokens, setting, repeats=1)
            except Exception as err:  # a missing bitsandbytes backend must not sink the whole benchmark
                rows[name] = {"error": f"{type(err).__name__}: {err}"[:300]}
            print(name, rows.get(f"{name}/eager", rows.get(name)), flush=True)
    return rows


def compile_seconds(new_tokens: int) -> dict:
    """Seconds the first compiled generate takes beyond a steady one, in a fresh process: cold (empty Inductor cache),
    then warm (a second fresh process on the same cache folder)."""
    result = {}
    with tempfile.TemporaryDirectory() as cache_dir:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache_dir}
        code = (
            "import json, torch; from benchmarks.decode import generate_tps; from benchmarks.peers import build; "
            "torch.manual_seed(0); "
            f"r = generate_tps(build('itera-lite'), 1, {new_tokens}, 'compiled', repeats=1); "
            "print(json.dumps(r['first_call_s'] - r['steady_call_s']))"
        )
        for kind in ("cold", "warm"):
            out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
            result[kind] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks that the script runs")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--contexts", type=int, nargs="+", default=[64, 1024, 8192, 32768])
    parser.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    args = parser.parse_args(argv)
    new_tokens = {1: 256, 8: 128, 32: 64}
    context_tokens, prefill_len, contexts, batches = 64, 2048, args.contexts, args.batches
    if args.quick:
        new_tokens, context_tokens, prefill_len, contexts, batches = {}, 4, 64, [16, 64], [1, 2]
    torch.manual_seed(0)
    result = {"machine": machine(), "load_average": os.getloadavg(), "preset": args.preset, "prompt": PROMPT}
    models = {name: build(name, args.preset) for name in args.models}
    rows = {name: {"parameters": parameters(m), "generate": {}, "decode_by_context": {}} for name, m in models.items()}
    for setting in SETTINGS:
        # the smoke run compiles only Itera-Lite (each compile costs ~10-20 s here)
        names = [n for n in models if not (args.quick and setting == "compiled" and n != "itera-lite")]
        torch._dynamo.reset()
        for batch in batches:
            tokens = new_tokens.get(batch, 4)
            runs = {n: generate_call(models[n], batch, tokens, setting) for n in names}
            for name, cell in interleaved_tps(runs, batch * tokens).items():
                rows[name]["generate"][f"{setting}/batch{batch}"] = cell
                print(name, setting, batch, cell, flush=True)
        torch._dynamo.reset()
        for context in contexts:  # the recurrent state against Llama's growing KV cache, one after the other
            for name in (n for n in names if n != "mamba2"):
                cell = decode_at_context(models[name], context, context_tokens, setting)
                rows[name]["decode_by_context"][f"{setting}/{context}"] = cell
                print(name, setting, "context", context, cell, flush=True)
    for name, model in models.items():
        rows[name]["prefill_tps"] = prefill_tps(model, prefill_len)
    if "itera-lite" in models:
        rows["itera-lite"]["no_cache"] = generate_tps(
            models["itera-lite"], 1, min(64, new_tokens.get(1, 4)), use_cache=False, repeats=1
        )
    result["models"] = rows
    if "itera-lite" in args.models and not args.quick:
        result["itera_dtypes"] = quantized_rows(64)
        result["compile_seconds"] = compile_seconds(32)
    summarize(result)
    if not args.quick:
        save("decode", result)
        plot(result)
    return result


def tps(row: dict, key: str) -> float:
    cell = row["generate"].get(key, {})
    return cell.get("tokens_per_s", float("nan"))


def summarize(result: dict) -> None:
    rows = result["models"]
    batches = sorted({int(k.split("batch")[1]) for row in rows.values() for k in row["generate"]})
    print("\n| model | params | setting | " + " | ".join(f"tok/s b={b}" for b in batches) + " | prefill tok/s |")
    print("|---|---:|---|" + "---:|" * (len(batches) + 1))
    for name, row in rows.items():
        for setting in SETTINGS:
            cells = " | ".join(f"{tps(row, f'{setting}/batch{b}'):.0f}" for b in batches)
            prefill = f"{row['prefill_tps']:.0f}" if setting == "eager" else ""
            print(f"| {name} | {row['parameters'] / 1e6:.2f}M | {setting} | {cells} | {prefill} |")
    if "itera-lite" not in rows or "llama" not in rows:
        return
    it, ll = rows["itera-lite"], rows["llama"]
    contexts = sorted({int(k.split("/")[1]) for k in it["decode_by_context"]})
    header = "| context | itera eager | itera compiled | itera state B | llama eager | llama compiled | llama KV B |"
    print("\n" + header)
    print("|---:|---:|---:|---:|---:|---:|---:|")
    nan = {"tokens_per_s": float("nan")}
    for c in contexts:
        a, b = it["decode_by_context"], ll["decode_by_context"]
        print(
            f"| {c} | {a[f'eager/{c}']['tokens_per_s']:.0f} | {a.get(f'compiled/{c}', nan)['tokens_per_s']:.0f} | "
            f"{a[f'eager/{c}']['cache_bytes']:,} | {b[f'eager/{c}']['tokens_per_s']:.0f} | "
            f"{b.get(f'compiled/{c}', nan)['tokens_per_s']:.0f} | {b[f'eager/{c}']['cache_bytes']:,} |"
        )
    b_lo, b_hi = batches[0], batches[-1]
    ctx = next((c for c in (8192, contexts[-1]) if c in contexts), contexts[-1])
    result["ratios"] = {
        "compiled_vs_llama_eager_b1": tps(it, f"compiled/batch{b_lo}") / tps(ll, f"eager/batch{b_lo}"),
        "compiled_vs_llama_compiled_b1": tps(it, f"compiled/batch{b_lo}") / tps(ll, f"compiled/batch{b_lo}"),
        "eager_vs_llama_eager_b1": tps(it, f"eager/batch{b_lo}") / tps(ll, f"eager/batch{b_lo}"),
        "compiled_vs_eager_b1": tps(it, f"compiled/batch{b_lo}") / tps(it, f"eager/batch{b_lo}"),
        f"compiled_b{b_hi}_vs_b{b_lo}": tps(it, f"compiled/batch{b_hi}") / tps(it, f"compiled/batch{b_lo}"),
        f"compiled_b{b_hi}_vs_llama_best_b{b_hi}": tps(it, f"compiled/batch{b_hi}")
        / max(tps(ll, f"eager/batch{b_hi}"), tps(ll, f"compiled/batch{b_hi}")),
        f"context_{ctx}_compiled_vs_llama_eager": it["decode_by_context"][f"compiled/{ctx}"]["tokens_per_s"]
        / ll["decode_by_context"][f"eager/{ctx}"]["tokens_per_s"],
        "prefill_vs_llama": it["prefill_tps"] / ll["prefill_tps"],
        "cache_vs_no_cache_b1": tps(it, f"eager/batch{b_lo}") / it["no_cache"]["tokens_per_s"],
    }
    if "itera_dtypes" in result and "bf16/compiled" in result["itera_dtypes"]:
        dtypes = result["itera_dtypes"]
        for setting in SETTINGS:
            result["ratios"][f"bf16_vs_fp32_{setting}_b1"] = (
                dtypes[f"bf16/{setting}"]["tokens_per_s"] / dtypes[f"fp32/{setting}"]["tokens_per_s"]
            )
    print("\nratios:", {k: round(v, 2) for k, v in result["ratios"].items()})


def plot(result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from benchmarks.peers import RESULTS

    fig, (bars, curve) = plt.subplots(1, 2, figsize=(11, 4))
    names = list(result["models"])
    for i, setting in enumerate(SETTINGS):
        values = [tps(result["models"][n], f"{setting}/batch1") for n in names]
        bars.bar([j + 0.4 * i for j in range(len(names))], values, width=0.4, label=setting)
    bars.set_xticks([j + 0.2 for j in range(len(names))], names)
    bars.set_ylabel("greedy generate tokens/s (batch 1)")
    bars.set_title("Batch 1, eager vs compiled")
    bars.legend()
    for name, row in result["models"].items():
        for setting, style in (("eager", "o--"), ("compiled", "o-")):
            cells = {int(k.split("/")[1]): v for k, v in row["decode_by_context"].items() if k.startswith(setting)}
            if cells:
                xs = sorted(cells)
                curve.plot(xs, [cells[x]["tokens_per_s"] for x in xs], style, label=f"{name} {setting}")
    curve.set_xscale("log", base=2)
    curve.set_xlabel("context length (tokens already in the sequence)")
    curve.set_ylabel("decode tokens/s (batch 1)")
    curve.set_title(f"Decode speed against context, {result['preset']} size, CPU")
    curve.grid(alpha=0.3)
    curve.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "decode.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
