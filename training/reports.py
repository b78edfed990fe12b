"""What a training run leaves behind: the final model folder and the loss curve."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from modeling_itera.defaults import DTYPES


def save_final(model, tokenizer, folder: str | Path, save_dtype: str = "float32") -> None:
    """Saves model, tokenizer and generation config so that `from_pretrained(folder)` and the pipeline load it.

    With `save_dtype="bfloat16"` the weights are stored in half the bytes, but `config.json` still says float32:
    `from_pretrained` follows `config.dtype` by default, and a CPU user should land on fp32 (or ask for bf16),
    never on a half-precision default (fp16 is 10x slower than fp32 on CPUs without native fp16).
    """
    if save_dtype not in DTYPES:
        raise ValueError(f"unknown save_dtype {save_dtype!r}; valid: {', '.join(DTYPES)}")
    folder = Path(folder)
    model.to(DTYPES[save_dtype]).save_pretrained(folder)
    model.to(torch.float32)
    tokenizer.save_pretrained(folder)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config["dtype"] = "float32"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def plot_losses(log_history: list[dict], path: str | Path, title: str = "") -> None:
    """Training and validation loss against optimizer step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e]
    valid = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if valid:
        ax.plot(*zip(*valid), "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if train or valid:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
