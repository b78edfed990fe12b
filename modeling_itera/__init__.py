"""Itera-Lite: a small selective state-space language model with a sparse MoE feed-forward, for transformers.

Importing the package registers it with the Auto classes, so `AutoModelForCausalLM.from_pretrained(folder)` works
without `trust_remote_code`; `save_pretrained` also writes the model's source next to the weights, so the folder
loads with `trust_remote_code=True` where this package is not installed.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_itera import IteraLiteConfig
from .modeling_itera import IteraLiteForCausalLM, IteraLiteModel, IteraLitePreTrainedModel
from .state import load_state, save_state

AutoConfig.register(IteraLiteConfig.model_type, IteraLiteConfig, exist_ok=True)
AutoModel.register(IteraLiteConfig, IteraLiteModel, exist_ok=True)
AutoModelForCausalLM.register(IteraLiteConfig, IteraLiteForCausalLM, exist_ok=True)

# Copy the source files on save_pretrained and write the matching config.auto_map (remote code).
IteraLiteConfig.register_for_auto_class("AutoConfig")
IteraLiteModel.register_for_auto_class("AutoModel")
IteraLiteForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "IteraLiteConfig",
    "IteraLiteForCausalLM",
    "IteraLiteModel",
    "IteraLitePreTrainedModel",
    "load_state",
    "save_state",
]
