"""Where one training step of Itera-Lite and of the same-shape Llama spends its time (torch.profiler, CPU).

    python -m benchmarks.profile_train                     # compiled + bf16, 8 x 512; writes results/train_profile.txt
    python -m benchmarks.profile_train --setting bf16      # any setting of benchmarks.train
    python -m benchmarks.profile_train --setting eager --prefill 2048  # a 2048-token prefill instead of a step

Each model's step is built as `benchmarks.train` builds it, warmed up (compiled), then profiled once with Inductor's
kernels named in the trace (`cpp.enable_kernel_profile`), so that a compiled graph's time is split by kernel. The
report groups the self time of every op and kernel by what it is (matmuls, compiled elementwise kernels, attention,
...) side by side, then lists each model's top ops. The profiler slows a step by ~10-30%: the shares are the figure,
not the absolute times, which `benchmarks.train` measures.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.peers import RESULTS
from benchmarks.train import SETTINGS, Runner

# (group, test on the op's name), first match wins.
GROUPS = [
    ("matmul (mm, bmm, grouped mm)", lambda k: k in {"aten::mm", "aten::bmm", "aten::addmm", "aten::_grouped_mm"}),
    ("attention (SDPA)", lambda k: "scaled_dot_product" in k),
    # Inductor's kernels: `graph_N_cpp_fused_...`, or `cpp_fused_...` inside a nested compile region (the loss chunk)
    ("loss: compiled chunk kernels", lambda k: "cpp_fused" in k and ("log_softmax" in k or "logsumexp" in k)),
    ("loss: eager log-softmax", lambda k: k.startswith("aten::") and ("log_softmax" in k or "nll_loss" in k)),
    ("compiled elementwise kernels", lambda k: k.startswith(("graph_", "cpp_fused"))),
    ("copies, casts and fills", lambda k: k in {"aten::copy_", "aten::_to_copy", "aten::fill_", "aten::zero_"}),
    ("optimizer", lambda k: "Optimizer" in k or "_foreach" in k or k in {"aten::lerp_", "aten::addcdiv_"}),
]


def group_of(key: str) -> str:
    return next((name for name, test in GROUPS if test(key)), "other (eager ops, dispatch, autograd)")


def profile_step(runner: Runner, prefill: bool = False) -> list:
    step = runner.prefill if prefill else runner.train_step
    for _ in range(3):  # compile, settle the allocator
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return list(prof.key_averages())


def report(events_by_model: dict[str, list], top: int) -> str:
    totals = {m: sum(e.self_cpu_time_total for e in ev) / 1e3 for m, ev in events_by_model.items()}
    models = list(events_by_model)
    lines = ["| group | " + " | ".join(f"{m} ms (share)" for m in models) + " |", "|---|" + "---:|" * len(models)]
    grouped = {m: {} for m in models}
    for m, events in events_by_model.items():
        for e in events:
            grouped[m][group_of(e.key)] = grouped[m].get(group_of(e.key), 0.0) + e.self_cpu_time_total / 1e3
    for name in [g for g, _ in GROUPS] + ["other (eager ops, dispatch, autograd)"]:
        cells = [f"{grouped[m].get(name, 0):.0f} ({grouped[m].get(name, 0) / totals[m]:.0%})" for m in models]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("| total self time | " + " | ".join(f"{totals[m]:.0f}" for m in models) + " |")
    for m, events in events_by_model.items():
        lines += ["", f"{m}: top {top} ops and kernels by self time", ""]
        for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]:
            lines.append(f"{e.self_cpu_time_total / 1e3:8.1f} ms {e.count:4d}x  {e.key[:110]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=SETTINGS, default="compiled_bf16")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--prefill", type=int, default=0, help="profile a prefill of this many tokens instead")
    parser.add_argument("--no-save", action="store_true", help="print only (tests)")
    args = parser.parse_args(argv)
    torch._inductor.config.cpp.enable_kernel_profile = True
    torch._dynamo.config.automatic_dynamic_shapes = False  # static graphs, as benchmarks.train and training.pretrain
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    events = {
        name: profile_step(
            Runner(name, args.setting, args.preset, args.batch, args.length, prefill=args.prefill or 16),
            prefill=bool(args.prefill),
        )
        for name in ("itera-lite", "llama")
    }
    if args.prefill:
        title = f"## Prefill of {args.prefill} tokens, {args.setting}, {args.preset} preset\n\n"
    else:
        title = f"## Training step, {args.setting}, {args.batch} x {args.length} tokens, {args.preset} preset\n\n"
    text = title + report(events, args.top) + "\n"
    print(text)
    if not args.no_save:
        RESULTS.mkdir(exist_ok=True)
        name = f"prefill_profile_{args.setting}.txt" if args.prefill else "train_profile.txt"
        (RESULTS / name).write_text(text)
    return text


if __name__ == "__main__":
    main()
