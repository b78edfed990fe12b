"""The Hub repository's files: which files of a model folder are shipped, checked before anything is uploaded.

A model folder written by `training.pretrain` also holds metrics, plots and checkpoints; the repository gets only
what `from_pretrained`, `AutoTokenizer` and `pipeline` read, plus the model card. Every check runs before the
network is touched, so a folder that would not load from the Hub is never pushed.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from huggingface_hub import ModelCard

AUTO_CLASSES = ("AutoConfig", "AutoModel", "AutoModelForCausalLM")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json")
# Same-folder relative imports: the files `custom_object_save` copies and the Hub's dynamic-module loader fetches.
RELATIVE_IMPORT = re.compile(r"^\s*from\s+\.(\w+)\s+import", re.MULTILINE)


def read_config(model_folder: Path) -> dict:
    path = model_folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{model_folder} is not a model folder: it has no config.json")
    config = json.loads(path.read_text())
    if config.get("model_type") != "itera_lite":
        raise ValueError(f"{path} has model_type {config.get('model_type')!r}; hub_upload ships Itera-Lite models only")
    return config


def remote_code_files(model_folder: Path, config: dict) -> list[str]:
    """The .py files `trust_remote_code` loads: the `auto_map` modules and, recursively, their relative imports."""
    auto_map = config.get("auto_map") or {}
    missing = [name for name in AUTO_CLASSES if name not in auto_map]
    if missing:
        raise ValueError(
            f"config.json auto_map lacks {', '.join(missing)}: re-save the model after `import modeling_itera`"
        )
    pending = [ref.split(".")[0] + ".py" for ref in auto_map.values()]
    found: list[str] = []
    while pending:
        name = pending.pop()
        if name in found:
            continue
        path = model_folder / name
        if not path.is_file():
            raise FileNotFoundError(f"{model_folder} lacks {name}, needed by the model's remote code (auto_map)")
        found.append(name)
        pending += [f"{module}.py" for module in RELATIVE_IMPORT.findall(path.read_text())]
    return sorted(found)


def files_to_ship(model_folder: str | Path) -> list[str]:
    """Names of the files of `model_folder` that go to the Hub (README.md is written separately).

    Raises:
        FileNotFoundError, ValueError: naming what is missing or wrong, before any upload.
    """
    folder = Path(model_folder)
    config = read_config(folder)
    weights = sorted(p.name for p in folder.glob("*.safetensors"))
    if not weights:
        hint = " (it has PyTorch .bin weights: re-save with save_pretrained)" if any(folder.glob("*.bin")) else ""
        raise FileNotFoundError(f"{folder} has no .safetensors weights{hint}")
    tokenizer = [name for name in TOKENIZER_FILES if (folder / name).is_file()]
    if not {"tokenizer.json", "tokenizer_config.json"} & set(tokenizer):
        raise FileNotFoundError(f"{folder} has no tokenizer (tokenizer.json / tokenizer_config.json)")
    if not (folder / "generation_config.json").is_file():
        raise FileNotFoundError(
            f"{folder} has no generation_config.json: without one, pipeline() samples with its own defaults"
        )
    model = [name for name in MODEL_FILES if (folder / name).is_file()]
    return sorted(set(weights + model + tokenizer + remote_code_files(folder, config)))


def write_repo(model_folder: str | Path, destination: str | Path, card: ModelCard) -> list[str]:
    """Copies the shipped files and writes the card into the (existing, empty) `destination`; returns the names."""
    names = files_to_ship(model_folder)
    for name in names:
        shutil.copyfile(Path(model_folder) / name, Path(destination) / name)
    card.save(Path(destination) / "README.md")
    return sorted(names + ["README.md"])
