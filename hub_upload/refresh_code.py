"""Bring a model folder's remote code up to date with the package, without touching its weights.

    python -m hub_upload.refresh_code checkpoints/itera-lite-tinystories            # after changing modeling_itera/
    python -m hub_upload.refresh_code checkpoints/itera-lite-tinystories --check    # only say what is stale

Copies the .py files that `save_pretrained` writes next to the weights (the modules of the classes registered for
the Auto classes and, recursively, their same-folder relative imports) from the installed `modeling_itera` into the
folder, removes .py files that are no longer part of that code, and rewrites `config.json` only when its `auto_map`
differs from what `save_pretrained` would write. Weights, tokenizer and generation config are left as they are.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from transformers.dynamic_module_utils import get_relative_import_files

from modeling_itera import IteraLiteConfig, IteraLiteForCausalLM, IteraLiteModel

from .folder import read_config

REGISTERED = (IteraLiteConfig, IteraLiteModel, IteraLiteForCausalLM)  # register_for_auto_class in modeling_itera


def remote_code_sources() -> dict[str, Path]:
    """File name -> source file, for every file `save_pretrained` copies (as transformers' `custom_object_save`)."""
    sources = {}
    for cls in REGISTERED:
        module_file = sys.modules[cls.__module__].__file__
        for path in [module_file, *get_relative_import_files(module_file)]:
            sources[Path(path).name] = Path(path)
    return dict(sorted(sources.items()))


def expected_auto_map() -> dict[str, str]:
    return {cls._auto_class: f"{cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}" for cls in REGISTERED}


def differences(folder: Path) -> tuple[dict[str, Path], list[Path], dict, bool]:
    """What `folder` lacks: the package's sources it has not or has otherwise ({name: source}), its .py files that are
    no longer part of the model's code, its config, and whether that config's auto_map is current."""
    config = read_config(folder)
    sources = remote_code_sources()
    outdated = {
        name: source
        for name, source in sources.items()
        if not (folder / name).is_file() or (folder / name).read_bytes() != source.read_bytes()
    }
    leftovers = [p for p in sorted(folder.glob("*.py")) if p.name not in sources]
    return outdated, leftovers, config, config.get("auto_map") == expected_auto_map()


def stale(folder: str | Path) -> list[str]:
    """What differs from the package, one line each; empty when the folder's remote code is current."""
    folder = Path(folder)
    outdated, leftovers, config, auto_map_current = differences(folder)
    problems = [
        f"{name} is missing" if not (folder / name).is_file() else f"{name} differs from {source}"
        for name, source in outdated.items()
    ]
    problems += [f"{p.name} is no longer part of the model's code" for p in leftovers]
    if not auto_map_current:
        problems.append(f"config.json auto_map is {config.get('auto_map')}, expected {expected_auto_map()}")
    return problems


def refresh(folder: str | Path) -> list[str]:
    """Makes `folder`'s remote code current; returns the names of the files written or removed ("x.py (removed)")."""
    folder = Path(folder)
    outdated, leftovers, config, auto_map_current = differences(folder)
    for name, source in outdated.items():
        shutil.copyfile(source, folder / name)
    for leftover in leftovers:
        leftover.unlink()
    changed = list(outdated) + [f"{p.name} (removed)" for p in leftovers]
    if not auto_map_current:
        config["auto_map"] = expected_auto_map()
        # The layout save_pretrained writes (and training.reports keeps): sorted keys, two spaces, final newline.
        (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        changed.append("config.json")
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hub_upload.refresh_code", description=__doc__.splitlines()[0])
    parser.add_argument("model_folder", help="an Itera-Lite model folder, e.g. checkpoints/itera-lite-tinystories")
    parser.add_argument("--check", action="store_true", help="write nothing; exit code 1 if anything is stale")
    args = parser.parse_args(argv)
    try:
        if args.check:
            problems = stale(args.model_folder)
            for line in problems:
                print(f"{args.model_folder}: {line}")
            return 1 if problems else 0
        changed = refresh(args.model_folder)
    except (FileNotFoundError, ValueError) as err:
        print(f"refresh_code: error: {err}", file=sys.stderr)
        return 2
    print(f"{args.model_folder}: updated {', '.join(changed)}" if changed else f"{args.model_folder}: up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
