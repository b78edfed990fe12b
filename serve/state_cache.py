"""Prefix caching for a recurrent model: states along a prompt, kept for the next prompt that shares a prefix with it.

An SSM's whole context is one fixed-size state per sequence (conv window + SSM state per layer), so a prompt that
starts with a prefix seen before needs only the rest prefilled from the saved state, where a KV-cache model would
keep a cache that grows with the prefix. The engine keeps the state at a prompt's end (with its next-token logits)
and checkpoints along it: the states at the chunk boundaries of the chunked scan, which the prefill computes anyway
(`modeling_itera.ssm`, `chunk_checkpoints`). A prompt that leaves a cached one anywhere resumes from the last
checkpoint before they part, within one chunk of it.

Entries sit in a radix tree over token ids (a trie whose edges hold runs of tokens, so a node per entry and per
branching point, not per token): a lookup walks the prompt down the tree once and takes the deepest entry on its way.
They are evicted in LRU order within a byte budget; an evicted entry's node goes, and so does a branch left empty.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

KEY_BYTES_PER_TOKEN = 8  # the entry's key (a tuple of ids) counts against the budget too


@dataclass
class Entry:
    cache: object  # batch-1 state after the prefix (a DynamicCache, or another backend's); only copies handed out
    logits: torch.Tensor | None  # (v,) the next-token logits after the prefix; None for a checkpoint inside a prompt
    nbytes: int
    node: Node | None = None


@dataclass(eq=False)
class Node:
    edge: tuple[int, ...]  # the tokens from the parent to this node
    parent: Node | None = None
    children: dict[int, Node] = field(default_factory=dict)  # by the first token of the child's edge
    entry: Entry | None = None


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
    """Prefix states within `max_bytes` (0: off), in a radix tree over token ids. Used from the engine thread only."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.root = Node(())
        self.entries: OrderedDict[tuple[int, ...], Entry] = OrderedDict()  # LRU order, oldest first
        self.bytes = self.hits = self.misses = 0

    def lookup(self, ids: list[int]) -> tuple[int, object | None, torch.Tensor | None]:
        """(length of the longest cached prefix of `ids`, a copy of its state, its logits), or (0, None, None).
        A checkpoint (no logits) serves only a prompt longer than it: the next token needs the logits."""
        best = self._deepest(ids)
        if best is None:
            self.misses += 1
            return 0, None, None
        length, entry = best
        self.entries.move_to_end(tuple(ids[:length]))
        self.hits += 1
        return length, copy.deepcopy(entry.cache), entry.logits

    def cached_length(self, ids: list[int]) -> int:
        """The length of the prefix that `lookup(ids)` would resume from (0: none), without copying its state,
        counting a lookup or refreshing its place in the LRU order: what the engine uses to plan its prefill."""
        best = self._deepest(ids)
        return 0 if best is None else best[0]

    def _deepest(self, ids: list[int]) -> tuple[int, Entry] | None:
        """(depth, entry) of the deepest entry on the path of `ids` that can serve it, or None."""
        node, depth, best = self.root, 0, None
        while True:
            if node.entry is not None and (depth < len(ids) or node.entry.logits is not None):
                best = depth, node.entry
            if depth >= len(ids) or (child := node.children.get(ids[depth])) is None:
                return best
            if tuple(ids[depth : depth + len(child.edge)]) != child.edge:
                return best  # the prompt leaves the tree inside this edge: no entry lies inside an edge
            node, depth = child, depth + len(child.edge)

    def put(self, ids: list[int], cache, logits: torch.Tensor | None, owned: bool = False) -> None:
        """Keeps the batch-1 state after `ids` (and its (v,) logits, or None for a checkpoint inside a prompt): a
        copy, unless `owned` (the caller hands it over). Evicts the least recently used beyond the budget. An entry
        with logits replaces a checkpoint at the same prefix; otherwise a prefix held already is left as it is."""
        key = tuple(ids)
        nbytes = state_bytes(cache) + (0 if logits is None else logits.nbytes) + KEY_BYTES_PER_TOKEN * len(key)
        held = self.entries.get(key)
        if nbytes > self.max_bytes or (held is not None and (held.logits is not None or logits is None)):
            return
        if held is not None:
            self._remove(key)
        entry = Entry(cache if owned else copy.deepcopy(cache), None if logits is None else logits.clone(), nbytes)
        entry.node = self._insert(key)
        entry.node.entry = entry
        self.entries[key] = entry
        self.bytes += nbytes
        while self.bytes > self.max_bytes:
            self._remove(next(iter(self.entries)))

    def _insert(self, key: tuple[int, ...]) -> Node:
        """The node at exactly `key`, made where missing (splitting an edge where `key` leaves it)."""
        node, depth = self.root, 0
        while depth < len(key):
            child = node.children.get(key[depth])
            if child is None:
                new = Node(key[depth:], node)
                node.children[key[depth]] = new
                return new
            common = 0
            for a, b in zip(child.edge, key[depth:]):
                if a != b:
                    break
                common += 1
            if common < len(child.edge):  # split: a node at the point where `key` leaves the edge (or ends in it)
                middle = Node(child.edge[:common], node)
                node.children[key[depth]] = middle
                child.edge, child.parent = child.edge[common:], middle
                middle.children[child.edge[0]] = child
                child = middle
            node, depth = child, depth + common
        return node

    def _remove(self, key: tuple[int, ...]) -> None:
        entry = self.entries.pop(key)
        self.bytes -= entry.nbytes
        node = entry.node
        node.entry = None
        # Prune: a node without an entry and children goes; one left with a single child merges into it.
        while node is not self.root and node.entry is None and len(node.children) <= 1:
            parent = node.parent
            if node.children:
                (child,) = node.children.values()
                child.edge, child.parent = node.edge + child.edge, parent
                parent.children[node.edge[0]] = child
            else:
                del parent.children[node.edge[0]]
            node = parent
