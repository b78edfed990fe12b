"""The models compared: Itera-Lite and transformers' own peers at the same width, depth and vocabulary."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Mamba2Config, Mamba2ForCausalLM

from modeling_itera import IteraLiteConfig, IteraLiteForCausalLM

PRESETS = json.loads((Path(__file__).resolve().parent.parent / "configuration" / "models.json").read_text())
RESULTS = Path(__file__).resolve().parent / "results"


def build(name: str, preset: str = "tiny", dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A randomly initialised model in eval mode. Peers share Itera-Lite's hidden size, depth and vocabulary."""
    shape = dict(PRESETS[preset])
    width, depth, vocab = shape["hidden_size"], shape["num_hidden_layers"], shape["vocab_size"]
    if name == "itera-lite":
        model = IteraLiteForCausalLM(IteraLiteConfig(**shape))
        model.fused_training_loss = True  # as training/ trains it
    elif name == "llama":
        model = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=vocab,
                hidden_size=width,
                num_hidden_layers=depth,
                intermediate_size=3 * width,
                num_attention_heads=max(1, width // 64),
                num_key_value_heads=max(1, width // 64),
                max_position_embeddings=16384,
                tie_word_embeddings=True,
            )
        )
    elif name == "mamba2":
        head_dim = shape.get("head_dim", 64)
        model = Mamba2ForCausalLM(
            Mamba2Config(
                vocab_size=vocab,
                hidden_size=width,
                num_hidden_layers=depth,
                state_size=shape["state_size"],
                expand=2,
                head_dim=head_dim,
                num_heads=2 * width // head_dim,
                n_groups=1,
                chunk_size=shape.get("chunk_size", 64),
                tie_word_embeddings=True,
            )
        )
    else:
        raise ValueError(f"unknown model {name!r}; valid: itera-lite, llama, mamba2")
    return model.to(dtype).eval()


def parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def timed(fn, repeats: int = 3) -> float:
    """Best wall-clock seconds of `repeats` calls (after one warm-up call): the least noisy figure here."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": cpu_name(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def save(name: str, result: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path
