"""Clear errors for weights that cannot be loaded: a truncated or corrupted file, or tensors whose shapes do not
fit the config. transformers' own errors say that something failed; these say which file and which tensor."""

from __future__ import annotations

import os

from safetensors import safe_open


def describe_unloadable_weights(folder: str | os.PathLike, expected_shapes: dict[str, tuple[int, ...]]) -> str | None:
    """What is wrong with the `.safetensors` files of a local `folder`, or None if nothing is found (or the folder
    is not local). `expected_shapes` maps parameter names to the shapes the config implies."""
    if not os.path.isdir(folder):
        return None
    problems = []
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".safetensors"):
            continue
        path = os.path.join(folder, name)
        try:
            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    shape = tuple(f.get_slice(key).get_shape())
                    expected = expected_shapes.get(key)
                    if expected is not None and shape != expected:
                        problems.append(f"{path}: tensor {key!r} has shape {shape}, the config implies {expected}")
                    f.get_tensor(key)  # reads the bytes: catches truncation inside the data section
        except Exception as err:  # safetensors raises its own error type for every kind of damage
            problems.append(f"{path} is truncated or corrupted ({err})")
    return "; ".join(problems) or None
