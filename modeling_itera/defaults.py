"""Constants shared by the programs around the model (the story CLI, the server, training, the benchmarks): one home.

Not part of the model's remote code: modeling_itera.py and configuration_itera.py do not import this file, so
`save_pretrained` never copies it next to the weights.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path


class TorchDtypes(Mapping):
    """`--dtype` name -> torch dtype, importing torch only when a dtype is looked up: the story CLI's ONNX backend
    reads these names (its `--dtype` choices) in an environment that has no torch."""

    NAMES = ("float32", "bfloat16", "float16")

    def __getitem__(self, name: str):
        if name not in self.NAMES:
            raise KeyError(name)
        import torch

        return getattr(torch, name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.NAMES)

    def __len__(self) -> int:
        return len(self.NAMES)


# `--dtype` names accepted by every program that loads a model.
DTYPES = TorchDtypes()

# The model trained on TinyStories: bundled in a clone of the repository, published on the Hub for installed copies.
BUNDLED_MODEL = Path(__file__).resolve().parent.parent / "checkpoints" / "itera-lite-tinystories"
HUB_MODEL_ID = "itera-lite/itera-lite-tinystories"


def default_model() -> str:
    """The bundled folder when it is there (running from a clone), else the published Hub repository (`pip install .`
    copies only the package, not `checkpoints/`)."""
    return str(BUNDLED_MODEL) if BUNDLED_MODEL.is_dir() else HUB_MODEL_ID


def nf4_config():
    """The 4-bit setting used everywhere (bitsandbytes nf4, bf16 compute); a new object each call, as
    `from_pretrained` may modify the one it is given."""
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
