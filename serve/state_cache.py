"""Prefix caching for a recurrent model: the state at the end of a prompt, kept for the next prompt that extends it.

An SSM's whole context is one fixed-size state per sequence (conv window + SSM state per layer), so a prompt that
starts with a prompt seen before needs only its new tokens prefilled from the saved state, where a KV-cache model
would keep a cache that grows with the prefix. Entries are keyed by the exact token ids of the prefix (two
prompts that differ anywhere inside it never share a state), kept in LRU order within a byte budget.
"""

from __future__ import annotations

import copy
from collections import Counter, OrderedDict
from dataclasses import dataclass

import torch
from transformers import DynamicCache


@dataclass
class Entry:
    cache: DynamicCache  # batch-1 state after the prefix; never handed out itself, only copies of it
    logits: torch.Tensor  # (v,) the next-token logits after the prefix
    nbytes: int


def state_bytes(cache) -> int:
    if not isinstance(cache, DynamicCache):  # another backend's state (`serve.onnx_model.OnnxState`)
        return cache.nbytes
    return sum(
        t.nbytes
        for layer in cache.layers
        for held in (layer.conv_states, layer.recurrent_states)
        for t in held.values()
        if t is not None
    )


class StateCache:
    """LRU of prompt-end states within `max_bytes` (0: off). Used from the engine thread only."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.entries: OrderedDict[tuple[int, ...], Entry] = OrderedDict()
        self.lengths: Counter = Counter()  # prefix lengths held, to look up only those
        self.bytes = self.hits = self.misses = 0

    def lookup(self, ids: list[int]) -> tuple[int, DynamicCache | None, torch.Tensor | None]:
        """(length of the longest cached prefix of `ids`, a copy of its state, its logits), or (0, None, None)."""
        for length in sorted((n for n in self.lengths if n <= len(ids)), reverse=True):
            entry = self.entries.get(key := tuple(ids[:length]))
            if entry is not None:
                self.entries.move_to_end(key)
                self.hits += 1
                return length, copy.deepcopy(entry.cache), entry.logits
        self.misses += 1
        return 0, None, None

    def put(self, ids: list[int], cache: DynamicCache, logits: torch.Tensor) -> None:
        """Keeps a copy of the batch-1 state after `ids` (and its (v,) logits); evicts the oldest beyond the budget."""
        key = tuple(ids)
        nbytes = state_bytes(cache) + logits.nbytes
        if nbytes > self.max_bytes or key in self.entries:
            return
        self.entries[key] = Entry(copy.deepcopy(cache), logits.clone(), nbytes)
        self.lengths[len(key)] += 1
        self.bytes += nbytes
        while self.bytes > self.max_bytes:
            old, entry = self.entries.popitem(last=False)
            self.bytes -= entry.nbytes
            self.lengths[len(old)] -= 1
            if not self.lengths[len(old)]:
                del self.lengths[len(old)]
