"""Where bf16 mixed precision pays: the rule behind a recipe's `"bf16": "auto"`."""

from __future__ import annotations

import torch


def native_bf16_available() -> bool:
    """True where bf16 matmuls run in hardware: a CUDA or XPU device that supports bf16, else a CPU with AVX512-BF16
    or AMX (oneDNN's bf16 kernels; `--bf16 true` trains ~1.5x faster there, `benchmarks.train`). Elsewhere autocast
    emulates bf16 and is slower than fp32, so "auto" means fp32 there. Apple's MPS is left in fp32."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return torch.xpu.is_bf16_supported()
    if torch.accelerator.is_available():
        return False
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private, hence getattr: absent means no
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def resolve_auto_precision(recipe: dict) -> dict:
    """The recipe with `"bf16": "auto"` replaced by `native_bf16_available()` (TrainingArguments wants a bool)."""
    if recipe.get("bf16") == "auto":
        recipe = {**recipe, "bf16": native_bf16_available()}
    return recipe
