"""Itera-Lite: a small selective state-space language model with a sparse MoE feed-forward, for transformers.

Importing the package registers it with the Auto classes, so `AutoModelForCausalLM.from_pretrained(folder)` works
without `trust_remote_code`; `save_pretrained` also writes the model's source next to the weights, so the folder
loads with `trust_remote_code=True` where this package is not installed.

The torch-free parts (the ONNX runner `modeling_itera.onnx_runtime`, `python -m modeling_itera --backend onnx`)
work where torch and transformers are not installed (`pip install --no-deps .` beside onnxruntime, tokenizers and
numpy): the model's names are then resolved on first use (PEP 562), with an error that says what to install.
"""

from __future__ import annotations

from importlib.util import find_spec

# The model's public names and the submodule that defines each.
MODEL_NAMES = {
    "IteraLiteConfig": "configuration_itera",
    "IteraLiteForCausalLM": "modeling_itera",
    "IteraLiteModel": "modeling_itera",
    "IteraLitePreTrainedModel": "modeling_itera",
    "load_state": "state",
    "save_state": "state",
}
HAVE_TORCH = find_spec("torch") is not None and find_spec("transformers") is not None


def register_auto_classes() -> None:
    """`AutoConfig` / `AutoModel` / `AutoModelForCausalLM` know the model, and `save_pretrained` copies its source
    with a matching `config.auto_map` (remote code)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from .configuration_itera import IteraLiteConfig
    from .modeling_itera import IteraLiteForCausalLM, IteraLiteModel

    AutoConfig.register(IteraLiteConfig.model_type, IteraLiteConfig, exist_ok=True)
    AutoModel.register(IteraLiteConfig, IteraLiteModel, exist_ok=True)
    AutoModelForCausalLM.register(IteraLiteConfig, IteraLiteForCausalLM, exist_ok=True)
    IteraLiteConfig.register_for_auto_class("AutoConfig")
    IteraLiteModel.register_for_auto_class("AutoModel")
    IteraLiteForCausalLM.register_for_auto_class("AutoModelForCausalLM")


# Where transformers is installed, `import modeling_itera` must register at once: users write
# `import modeling_itera` and then call `AutoModelForCausalLM.from_pretrained` without touching a name of ours.
if HAVE_TORCH:
    register_auto_classes()


def __getattr__(name: str):
    if name not in MODEL_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if not HAVE_TORCH:
        raise ImportError(
            f"modeling_itera.{name} needs torch and transformers, which are not installed here: "
            "`pip install itera-lite` (the torch-free ONNX runner is modeling_itera.onnx_runtime)"
        )
    from importlib import import_module

    value = getattr(import_module(f".{MODEL_NAMES[name]}", __name__), name)
    globals()[name] = value  # once: later lookups do not come back here
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *MODEL_NAMES])


__all__ = list(MODEL_NAMES)
