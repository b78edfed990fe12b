"""Where one batch-1 decode step of Itera-Lite spends its time, eager and compiled (torch.profiler, CPU).

    python -m benchmarks.profile_step      # writes benchmarks/results/decode_profile.txt

Profiles `steps` decode steps after a 16-token prompt, in a plain loop over the model's forward (what `generate`
runs per token, without generate's own bookkeeping), and prints the ops by self time with their count per step.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import DynamicCache

from benchmarks.peers import RESULTS, build
from modeling_itera.generation import compiled_decode_step


@torch.no_grad()
def profile(model, step, steps: int) -> tuple[str, float, int]:
    """The profiler table, ms per step (measured without the profiler) and ops launched per step."""
    prompt = torch.randint(3, model.config.vocab_size, (1, 16))
    cache = DynamicCache(config=model.config)
    token = model(prompt, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1:].argmax(-1)

    def run(n):
        nonlocal token
        for _ in range(n):
            token = step(input_ids=token, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1:].argmax(-1)

    run(8)  # warm-up (and compilation)
    start = time.perf_counter()
    run(steps)
    ms = (time.perf_counter() - start) / steps * 1e3
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        run(steps)
    events = prof.key_averages()
    ops = sum(e.count for e in events if e.key.startswith("aten::") and e.cpu_parent is None) // steps
    return events.table(sort_by="self_cpu_time_total", row_limit=12), ms, ops


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = build("itera-lite", args.preset)
    report = []
    for name, step in (("eager", model), ("compiled", compiled_decode_step(model))):
        table, ms, ops = profile(model, step, args.steps)
        report.append(f"## {name}: {ms:.2f} ms per step, {ops} top-level aten ops per step\n\n{table}")
        print(report[-1], flush=True)
    text = "\n".join(report)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "decode_profile.txt").write_text(text)
    return text


if __name__ == "__main__":
    main()
