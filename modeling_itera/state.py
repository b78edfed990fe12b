"""Save the recurrent state of a generation to a file and load it back: stop a story, continue it later, elsewhere.

An Itera-Lite cache is one fixed-size state per sequence (a conv window and an SSM state per layer, 565 KB for
the bundled model at any length), so the whole context of a story fits in a small safetensors file:

    out = model.generate(**inputs, max_new_tokens=100, return_dict_in_generate=True)
    save_state(out.cache, "story.safetensors", out.sequences)
    # ... later, in another process:
    cache, ids = load_state("story.safetensors", model)
    more = model.generate(ids, cache=cache, max_new_tokens=100)  # the tokens an uninterrupted run gives

`generate` returns a cache that has read every token but the last one it generated; passing the whole sequence
with that cache makes `generate` feed only that last token, as in one uninterrupted call.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import DynamicCache

from .generation import READ_IDS, remember_read_ids

FORMAT = "itera-lite-state"
VERSION = "1"


def save_state(cache: DynamicCache, path: str | Path, input_ids: torch.Tensor | None = None) -> None:
    """Writes every layer's conv window and SSM state and, if given, the (b, l) token ids of the text so far: from
    `generate`, its `sequences` (the cache has read all but the last); after a forward, the ids it read."""
    tensors = {}
    for i, layer in enumerate(cache.layers):
        conv, ssm = getattr(layer, "conv_states", {}).get(0), getattr(layer, "recurrent_states", {}).get(0)
        if conv is None or ssm is None:
            raise ValueError(f"cache layer {i} holds no recurrent state: save a cache that forward or generate filled")
        tensors[f"layers.{i}.conv_state"] = conv.detach().contiguous().cpu()
        tensors[f"layers.{i}.ssm_state"] = ssm.detach().contiguous().cpu()
    batch = tensors["layers.0.conv_state"].shape[0]
    if input_ids is not None:
        if input_ids.dim() != 2 or input_ids.shape[0] != batch:
            raise ValueError(f"input_ids must have shape (batch={batch}, length), got {tuple(input_ids.shape)}")
        tensors["input_ids"] = input_ids.detach().contiguous().cpu()
    metadata = {"format": FORMAT, "version": VERSION, "num_layers": str(len(cache.layers))}
    if input_ids is not None:
        read = getattr(cache, READ_IDS, None)  # set by generate; else the cache read all of input_ids
        metadata["read_tokens"] = str(read.shape[1] if read is not None else input_ids.shape[1])
    else:
        seen = getattr(cache.layers[0], "cumulative_length_linear", None)  # transformers' own count, 5.25 on
        if isinstance(seen, torch.Tensor):
            metadata["read_tokens"] = str(int(seen))
    save_file(tensors, str(path), metadata=metadata)


def load_state(path: str | Path, model) -> tuple[DynamicCache, torch.Tensor | None]:
    """The cache saved by `save_state`, checked against the config of the `model` that will continue from it and on
    its device, and the token ids saved with it (None if none were)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"state file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata, tensors = f.metadata() or {}, {name: f.get_tensor(name) for name in f.keys()}
    except Exception as err:  # safetensors' own error type for a file that is not safetensors
        raise ValueError(f"{path} is not a safetensors file: {err}") from err
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path} is not an Itera-Lite state file (no format={FORMAT!r} in its metadata)")
    num_layers = int(metadata["num_layers"])
    states = [(tensors[f"layers.{i}.conv_state"], tensors[f"layers.{i}.ssm_state"]) for i in range(num_layers)]
    check_fits(path, states, model.config)
    cache = DynamicCache(config=model.config)
    states = [(conv.to(model.device), ssm.to(model.device)) for conv, ssm in states]
    for layer, (conv, ssm) in zip(cache.layers, states):
        # The layer's own update path: allocates its (static-address) buffers, copies the values in, and marks the
        # state as continuing (the next conv update appends to this window instead of padding from zero).
        layer.update_conv_state(conv, conv_kernel_size=conv.shape[-1])
        layer.update_recurrent_state(ssm)
    input_ids = tensors.get("input_ids")
    if input_ids is not None:
        input_ids = input_ids.to(model.device)
        remember_read_ids(cache, input_ids[:, : int(metadata["read_tokens"])])
    set_seen_tokens(cache, int(metadata.get("read_tokens", 0)))
    return cache, input_ids


def set_seen_tokens(cache: DynamicCache, count: int) -> None:
    """Sets the token count that transformers keeps on each recurrent layer (`get_seq_length`, 5.25 on): writing the
    conv window above counted its width, not the tokens the state has read. 0 where the file does not say."""
    for layer in cache.layers:
        seen = getattr(layer, "cumulative_length_linear", None)
        if isinstance(seen, torch.Tensor):
            seen.fill_(count)


def check_fits(path: Path, states: list[tuple[torch.Tensor, torch.Tensor]], config) -> None:
    """A clear error where a state file does not belong to a model of this shape."""
    if len(states) != config.num_hidden_layers:
        raise ValueError(f"{path} holds {len(states)} layers of state; the model has {config.num_hidden_layers}")
    conv_shape = (config.intermediate_ssm_size + 2 * config.state_size, config.conv_kernel)
    ssm_shape = (config.num_heads, config.head_dim, config.state_size)
    for i, (conv, ssm) in enumerate(states):
        if tuple(conv.shape[1:]) != conv_shape or tuple(ssm.shape[1:]) != ssm_shape:
            raise ValueError(
                f"{path}: layer {i} holds states of shapes {tuple(conv.shape[1:])} and {tuple(ssm.shape[1:])}; "
                f"this model needs {conv_shape} and {ssm_shape} (a state saved from another model?)"
            )
