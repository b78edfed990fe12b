"""Write an Itera-Lite model as a transformers GraniteMoeHybrid folder (`python -m modeling_itera.export --format
granite`), which stock transformers, vLLM and llama.cpp's own converter read with no code of ours.

The folder: `config.json` (`granite.granite_config`, plain JSON), `model.safetensors` (fp32, Granite's checkpoint
names, `granite.granite_state_dict`), the tokenizer files and `generation_config.json` of the model. It loads with
`AutoModelForCausalLM.from_pretrained(folder)`, no `trust_remote_code`, and gives Itera-Lite's logits within float
rounding (tests/test_export_granite.py).
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from .granite import granite_config, granite_state_dict

WEIGHTS_FILE = "model.safetensors"


def write_granite_folder(model, output: str | Path, tokenizer=None, generation_config=None) -> Path:
    """Writes `model` (an `IteraLiteForCausalLM`) into the folder `output` as GraniteMoeHybrid; returns the folder.

    Args:
        model: the model to write (any dtype; the folder is fp32).
        output: the folder, created if missing.
        tokenizer, generation_config: saved beside the weights when given.
    """
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    config = granite_config(model.config)
    (out / "config.json").write_text(json.dumps(config, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    save_file(granite_state_dict(model), str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    if generation_config is not None:
        generation_config.save_pretrained(out)
    return out


__all__ = ["write_granite_folder"]
