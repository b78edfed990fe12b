"""The `tinystories` recipe's training step on this machine, against the same step of another checkout (a baseline).

python -m benchmarks.recipe_step                          # this checkout: eager fp32, then the recipe's settings
python -m benchmarks.recipe_step --baseline 7d6cb0d       # and a commit's code, checked out into a temporary worktree

A step is what `Trainer` runs for each batch of the recipe: 16 x 256 tokens, forward + backward with labels, gradient
clipping at 1.0 and fused AdamW (lr 2e-3, weight decay 0.1, betas 0.9 / 0.95), on the `tiny` preset. Settings: `eager`
(fp32, no compilation, no document boundaries: the recipe before #12) and `recipe` (each block compiled, as
`--torch_compile true` does, bf16 autocast where the recipe's `bf16: "auto"` turns it on, and the packed stories'
boundaries, `seq_idx`, as `--packing_boundaries` gives them). Each (checkout, setting) runs in a process of its
own, since two checkouts' `modeling_itera` cannot share one; the processes take turns, round after round, and the
best step time of each is kept, so that the machine's drift hits all of them alike. Trainer's own overhead (data
loading, logging) is not included. Writes `results/recipe_step.json`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BATCH, LENGTH = 16, 256


def worker(repo: Path, setting: str, steps: int) -> dict:
    """Runs in a child process: `steps` timed steps of `repo`'s model after two warm-up steps (compilation)."""
    sys.path.insert(0, str(repo))
    import torch

    from modeling_itera import IteraLiteConfig, IteraLiteForCausalLM

    preset = json.loads((repo / "configuration" / "models.json").read_text())["tiny"]
    torch.manual_seed(0)
    model = IteraLiteForCausalLM(IteraLiteConfig(**preset)).train()
    model.fused_training_loss = True  # as training/ trains it (the baseline's code ignores it: it always fused)
    bf16 = False
    if setting == "recipe":
        sys.path.insert(0, str(REPO))  # this checkout's rule for bf16, applied to the baseline's model too
        from training.precision import native_bf16_available

        bf16 = native_bf16_available()
        from modeling_itera import loss

        loss.use_compiled_loss(True)  # as training.pretrain does under --torch_compile true
        for block in model.model.layers:
            block.compile(fullgraph=True)
    optimizer = torch.optim.AdamW(  # fused: Trainer's default optimizer (adamw_torch_fused)
        model.parameters(), lr=2e-3, weight_decay=0.1, betas=(0.9, 0.95), fused=True
    )
    ids = torch.randint(3, preset["vocab_size"], (BATCH, LENGTH))
    batch = {"input_ids": ids, "labels": ids}
    if setting == "recipe":
        # The recipe resets the state at each story's start inside a packed block (--packing_boundaries, on by
        # default): starts as often as in TinyStories (~198 tokens a story). The baseline's code predates them.
        starts = torch.rand(BATCH, LENGTH, generator=torch.Generator().manual_seed(0)) < 1 / 198
        batch["seq_idx"] = starts.cumsum(1, dtype=torch.int32)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(), step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"best_step_s": min(times), "bf16": bf16, "threads": torch.get_num_threads()}


def run_worker(repo: Path, setting: str, steps: int) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.recipe_step", "--worker", str(repo), setting, str(steps)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", help="a git commit whose code is timed in the eager setting beside this one")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per process")
    parser.add_argument("--worker", nargs=3, metavar=("REPO", "SETTING", "STEPS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        repo, setting, steps = args.worker
        print(json.dumps(worker(Path(repo), setting, int(steps))))
        return {}

    with tempfile.TemporaryDirectory() as tmp:
        runs = {("this", "eager"): REPO, ("this", "recipe"): REPO}
        if args.baseline:
            baseline = Path(tmp) / "baseline"
            subprocess.run(["git", "worktree", "add", "--detach", str(baseline), args.baseline], cwd=REPO, check=True)
            runs = {("baseline", "eager"): baseline, **runs}
        try:
            best = {}
            for _ in range(args.rounds):
                for key, repo in runs.items():
                    row = run_worker(repo, key[1], args.steps)
                    if key not in best or row["best_step_s"] < best[key]["best_step_s"]:
                        best[key] = row
        finally:
            if args.baseline:
                subprocess.run(["git", "worktree", "remove", "--force", str(baseline)], cwd=REPO, check=False)

    reference = best[("baseline", "eager")] if args.baseline else best[("this", "eager")]
    rows = []
    for (code, setting), row in best.items():
        tokens_per_s = BATCH * LENGTH / row["best_step_s"]
        speedup = reference["best_step_s"] / row["best_step_s"]
        rows.append({"code": code, "setting": setting, "tokens_per_s": tokens_per_s, "speedup": speedup, **row})
        print(
            f"{code:8s} {setting:6s}: {row['best_step_s'] * 1000:6.0f} ms/step, {tokens_per_s:6.0f} tok/s, "
            f"{speedup:.2f}x (bf16 {row['bf16']}, {row['threads']} threads)"
        )
    result = {"baseline": args.baseline, "batch": BATCH, "length": LENGTH, "rows": rows}
    from benchmarks.peers import machine, save

    result["machine"] = machine()
    save("recipe_step", result)
    return result


if __name__ == "__main__":
    main()
