"""Loading the model and tokenizer that the server runs: a local Itera-Lite folder or a Hub id."""

from __future__ import annotations

import logging
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

import modeling_itera  # noqa: F401  (registers the Auto classes, so no remote code is needed for local folders)
from modeling_itera.defaults import BUNDLED_MODEL, DTYPES, nf4_config

logger = logging.getLogger(__name__)


def load(model: str | Path, dtype: str = "float32", load_in_4bit: bool = False, trust_remote_code: bool = False):
    """Returns (model in eval mode, tokenizer). Raises `ValueError` for a folder that is not a model."""
    path = Path(model)
    if path.exists() and not (path / "config.json").exists():
        raise ValueError(f"{model} is not a model folder (no config.json in it)")
    if not path.exists() and path == BUNDLED_MODEL:
        raise ValueError(f"the bundled model is not at {BUNDLED_MODEL}; pass --model FOLDER_OR_HUB_ID")
    kwargs = {"dtype": DTYPES[dtype], "trust_remote_code": trust_remote_code}
    if load_in_4bit:
        # The model itself declares the layers that stay unquantized (modules_kept_out_of_quantization).
        kwargs["quantization_config"] = nf4_config()
    tokenizer = AutoTokenizer.from_pretrained(str(model), trust_remote_code=trust_remote_code)
    lm = AutoModelForCausalLM.from_pretrained(str(model), **kwargs).eval()
    logger.info("loaded %s (%s%s)", model, dtype, ", 4-bit" if load_in_4bit else "")
    return lm, tokenizer
