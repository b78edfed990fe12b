"""Push an Itera-Lite model folder to the Hugging Face Hub as a complete, loadable repository.

    python -m hub_upload runs/tiny user/itera-lite-tinystories [--private] [--revision dev] [--create-pr] [--dry-run]

The repository gets the safetensors weights, `config.json` with `auto_map` and the remote-code files (so it loads
with `trust_remote_code=True` where `modeling_itera` is not installed), the tokenizer, `generation_config.json`
and a model card. `build_model_card` is reusable on its own (e.g. by `Trainer`-side hub support).
"""

from .card import build_model_card, count_parameters
from .push import HubUploadError, PushResult, push_model

__all__ = ["HubUploadError", "PushResult", "build_model_card", "count_parameters", "push_model"]
