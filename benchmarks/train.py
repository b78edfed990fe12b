"""Training and prefill speed: Itera-Lite against Llama and Mamba-2, each in every setting, in one process.

python -m benchmarks.train                               # all models; writes results/train.json and train.png
python -m benchmarks.train --models llama --settings bf16  # some: their rows replace those in train.json
python -m benchmarks.train --quick                       # a tiny batch, eager only, to check that it runs

Every (model, setting) is built first; then they take turns, `--rounds` times, and each keeps its best time.

Training is forward + backward + AdamW at 8 x 512 tokens; prefill is one 2048-token prompt without autograd (the
LM head on the last position only). Settings: `eager` fp32; `bf16`, fp32 weights under
`torch.autocast("cpu", bfloat16)` (what `--bf16 true` gives on a CPU); `compiled`, each repeated block compiled with
`torch.compile` (regional compilation, what `--torch_compile true` gives in `training.pretrain`); `compiled_bf16`,
both; `model_compiled` and `model_compiled_bf16`, `torch.compile(model)` on the whole model with default options, as
a user or `Trainer(torch_compile=True)` calls it, without and with autocast. Peak memory is the most bytes that
torch's CPU allocator held at once during a step beyond what was held before it (activations, gradients,
temporaries: the weights and the optimizer state are extra and the same for every setting), from the profiler's
memory events.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import time

import torch

from benchmarks.peers import RESULTS, build, machine, parameters, save
from modeling_itera import IteraLiteForCausalLM
from modeling_itera.loss import use_compiled_loss

MODELS = ["itera-lite", "llama", "mamba2"]
SETTINGS = ["eager", "bf16", "compiled", "compiled_bf16", "model_compiled", "model_compiled_bf16"]


def compile_blocks(model: torch.nn.Module) -> None:
    """Regional compilation in place: every block of the model's repeated `ModuleList` compiled, one graph each.
    (Itera-Lite's bf16 loss chunk is compiled too, as under `--torch_compile true`: `Runner.train_step` switches it.)"""
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) and all(type(m) is type(module[0]) for m in module):
            for block in module:
                block.compile(fullgraph=True)


def peak_step_bytes(fn) -> int:
    """The most bytes torch's CPU allocator held at once during `fn()`, beyond what it held before."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    held = peak = 0
    for event in sorted(prof.profiler.kineto_results.events(), key=lambda e: e.start_ns()):
        if event.name() == "[memory]":
            held += event.nbytes()
            peak = max(peak, held)
    return peak


def autocast(setting: str):
    if setting.endswith("bf16"):
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class Runner:
    """One (model, setting): a training step and a prefill, ready to be timed in turn with the others."""

    def __init__(self, name: str, setting: str, preset: str, batch: int, length: int, prefill: int):
        torch.manual_seed(0)
        self.name, self.setting = name, setting
        self.model = build(name, preset)
        self.parameters = parameters(self.model)
        if setting.startswith("compiled"):
            compile_blocks(self.model)
        elif setting.startswith("model_compiled"):
            self.model = torch.compile(self.model)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.ids = torch.randint(3, self.model.config.vocab_size, (batch, length))
        self.prompt = torch.randint(3, self.model.config.vocab_size, (1, prefill))

    def train_step(self) -> None:
        self.model.train()
        # the compiled loss chunk is a global switch: on for the compiled settings only, whichever runner ran last
        use_compiled_loss(self.setting.startswith("compiled") and isinstance(self.model, IteraLiteForCausalLM))
        with autocast(self.setting):
            loss = self.model(input_ids=self.ids, labels=self.ids).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def prefill(self) -> None:
        self.model.eval()
        with autocast(self.setting):
            self.model(input_ids=self.prompt, use_cache=False, logits_to_keep=1)


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(runners: list[Runner], rounds: int) -> dict:
    """Best time of `rounds` calls for each runner's step and prefill, the runners taking turns round after round:
    on a shared machine whose speed drifts by tens of percent over minutes, every row then sees the same drift."""
    rows = {}
    for r in runners:  # the first step compiles, where compiled; the second settles the allocator
        first = seconds(r.train_step)
        r.train_step(), r.prefill(), r.prefill()
        rows[r.name, r.setting] = {"first_step_s": first, "train_s": math.inf, "prefill_s": math.inf}
    for _ in range(rounds):
        for r in runners:
            row = rows[r.name, r.setting]
            row["train_s"] = min(row["train_s"], seconds(r.train_step))
            row["prefill_s"] = min(row["prefill_s"], seconds(r.prefill))
    for r in runners:
        row = rows[r.name, r.setting]
        row["train_tokens_per_s"] = r.ids.numel() / row.pop("train_s")
        row["prefill_tokens_per_s"] = r.prompt.numel() / row.pop("prefill_s")
        row["peak_step_mb"] = peak_step_bytes(r.train_step) / 2**20
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--prefill", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=MODELS)
    parser.add_argument("--settings", nargs="+", choices=SETTINGS, default=SETTINGS)
    args = parser.parse_args(argv)
    quick = (2, 32, 64, 1)
    batch, length, prefill, rounds = quick if args.quick else (args.batch, args.length, args.prefill, args.rounds)
    settings = ["eager"] if args.quick else args.settings
    # Every model's blocks share their class's code, so each compiled model adds guards to the same cache entry.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    torch._dynamo.config.accumulated_cache_size_limit = max(torch._dynamo.config.accumulated_cache_size_limit, 1024)
    # Static graphs per shape, as training.pretrain compiles them: the prefill's shape would otherwise recompile the
    # training graph with dynamic shapes, ~25% slower.
    torch._dynamo.config.automatic_dynamic_shapes = False
    run_id = time.strftime("%Y-%m-%d %H:%M:%S")
    runners = [Runner(n, s, args.preset, batch, length, prefill) for n in args.models for s in settings]
    measured = measure(runners, rounds)
    rows = {}
    for r in runners:
        row = {**measured[r.name, r.setting], "run": run_id}  # rows of one run were measured in one process
        rows.setdefault(r.name, {"settings": {}, "parameters": r.parameters})["settings"][r.setting] = row
        print(
            f"{r.name} {r.setting}: train {row['train_tokens_per_s']:.0f} tok/s, peak {row['peak_step_mb']:.0f} MB, "
            f"prefill {row['prefill_tokens_per_s']:.0f} tok/s (first step {row['first_step_s']:.0f} s)",
            flush=True,
        )
    result = {
        "machine": machine(),
        "preset": args.preset,
        "batch": batch,
        "length": length,
        "prefill": prefill,
        "rounds": rounds,
    }
    if not args.quick:
        previous = {}
        if (RESULTS / "train.json").exists():
            previous = json.loads((RESULTS / "train.json").read_text()).get("models", {})
            previous = {k: v for k, v in previous.items() if "settings" in v}  # rows of the older format are dropped
        for name, row in rows.items():  # settings measured now replace those of earlier runs
            entry = previous.setdefault(name, {"settings": {}})
            entry["parameters"] = row["parameters"]
            entry["settings"].update(row["settings"])
        rows = previous
    result["models"] = rows
    result["ratios"] = ratios(rows)
    print(table(result))
    if not args.quick:
        save("train", result)
        plot(result)
    return result


def best(row: dict, key: str, run: str | None = None) -> tuple[str, float] | None:
    """The setting with the highest `key`, among those measured in `run` (all when None)."""
    settings = [s for s in row["settings"] if run is None or row["settings"][s].get("run") == run]
    if not settings:
        return None
    setting = max(settings, key=lambda s: row["settings"][s][key])
    return setting, row["settings"][setting][key]


def ratios(rows: dict) -> dict:
    """Itera-Lite's best setting over each peer's best, for training and prefill, and peak memory at those settings:
    only against a peer's rows from the same run (one process) as Itera-Lite's newest rows, the only fair ratio on a
    shared machine. A peer with no row from that run gets no ratio."""
    if "itera-lite" not in rows:
        return {}
    run = max(s.get("run", "") for s in rows["itera-lite"]["settings"].values())
    out = {}
    for peer in sorted(rows.keys() - {"itera-lite"}):
        if best(rows[peer], "train_tokens_per_s", run) is None:
            continue
        for key in ("train_tokens_per_s", "prefill_tokens_per_s"):
            (ours, mine), (theirs, their) = best(rows["itera-lite"], key, run), best(rows[peer], key, run)
            out[f"{key}_vs_{peer}"] = {"ratio": mine / their, "itera-lite": ours, peer: theirs, "run": run}
        ours, theirs = out[f"train_tokens_per_s_vs_{peer}"]["itera-lite"], out[f"train_tokens_per_s_vs_{peer}"][peer]
        ours_eager, theirs_eager = rows["itera-lite"]["settings"].get("eager"), rows[peer]["settings"].get("eager")
        if ours_eager and theirs_eager and ours_eager.get("run") == theirs_eager.get("run") == run:
            ratio = ours_eager["prefill_tokens_per_s"] / theirs_eager["prefill_tokens_per_s"]
            out[f"eager_prefill_tokens_per_s_vs_{peer}"] = {"ratio": ratio, "run": run}
        out[f"peak_step_mb_vs_{peer}"] = {
            "ratio": rows["itera-lite"]["settings"][ours]["peak_step_mb"]
            / rows[peer]["settings"][theirs]["peak_step_mb"]
        }
    return out


def table(result: dict) -> str:
    lines = [
        f"| model | params | setting | train tok/s ({result['batch']} x {result['length']}) | peak step MB | "
        f"prefill tok/s ({result['prefill']}) |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for name, row in result["models"].items():
        for setting, s in row["settings"].items():
            lines.append(
                f"| {name} | {row['parameters'] / 1e6:.2f}M | {setting} | {s['train_tokens_per_s']:,.0f} | "
                f"{s['peak_step_mb']:,.0f} | {s['prefill_tokens_per_s']:,.0f} |"
            )
    lines.append("ratios: " + ", ".join(f"{k} {v['ratio']:.2f}" for k, v in result["ratios"].items()))
    return "\n".join(lines)


def plot(result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["models"])
    settings = [s for s in SETTINGS if any(s in result["models"][n]["settings"] for n in names)]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    keys = [
        ("train_tokens_per_s", f"training tokens/s, {result['batch']} x {result['length']}"),
        ("peak_step_mb", "peak MB held during a training step"),
        ("prefill_tokens_per_s", f"prefill tokens/s, {result['prefill']} tokens"),
    ]
    width = 0.8 / len(settings)
    for ax, (key, title) in zip(axes, keys):
        for i, setting in enumerate(settings):
            values = [result["models"][n]["settings"].get(setting, {}).get(key, 0) for n in names]
            ax.bar([j + i * width for j in range(len(names))], values, width, label=setting)
        ax.set_xticks([j + width * (len(settings) - 1) / 2 for j in range(len(names))], names)
        ax.set_title(title, fontsize=9)
    axes[0].legend(fontsize=8)
    fig.suptitle(
        "CPU, fp32 weights; bf16 = autocast, compiled = regional torch.compile, model_compiled = torch.compile(model)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(RESULTS / "train.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
