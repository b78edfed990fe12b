"""Prefill of the prompts that join the running batch: fresh prompts together in one left-padded forward, prompts
that resume from the prefix cache alone, and the states along the way kept in the cache for later prompts.

A fresh prompt (no prefix of it in the state cache) starts from the zero state, so several of them can share one
forward: left-padded to the longest, with `attention_mask` 0 on the padding. That is exact for this model: the mixer
zeroes x, B and C at masked positions before and after its causal conv (`modeling_itera.ssm.IteraLiteMixer`), so
padding leaves a zero state at zero and the conv window of padding is zeros, as at a fresh start; the rows of a
batch do not interact. A prompt that resumes from a cached state starts at its own position from its own state,
and one that asks for its own logprobs needs every position's logits: each of those runs alone (batch 1).

Checkpoints of a padded row: with P padded columns in front of its tokens, the state at column c of the batch is the
state after its first c - P tokens (the padding contributed nothing), a valid prefix state wherever c > P.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers import DynamicCache

from .state_cache import StateCache

if TYPE_CHECKING:
    from .engine import Job

# A group of fresh prompts is cut where its padding would exceed this share of its real tokens. Padding costs what a
# real token costs (the projections, the conv and the scan run over every column), so the bound keeps the wasted
# compute of a forward under a fifth of it, while prompts of similar length still share one forward, which on a CPU
# is far cheaper than one forward each (fewer, larger matmuls; the per-op overhead paid once).
MAX_PADDING = 0.25
# The padded tokens of one forward, at most (a longer prompt runs alone). Past this a CPU forward gets slower per
# token, its activations (~40 MB at 8k tokens, bundled model) no longer staying in the cache: 32 fresh prompts of
# ~164 tokens, one thread of the 2-core AMD EPYC of docs/serving.md, prefilled 1.0-1.15x (PyTorch) and 1.7x (ONNX
# int8, in interval pieces) faster in forwards of 512-2048 tokens than one by one, 0.8x at 8k tokens.
FORWARD_TOKENS = 1024
PAD_ID = 0  # what fills the padded columns: masked, so any id of the vocabulary does


@dataclass(eq=False)
class Prompt:
    """One prompt of a joining job, from its lookup in the state cache to its batch-1 state."""

    job: Job
    index: int  # in the job's prompts
    ids: list[int]
    start: int = 0  # tokens resumed from the state cache
    cache: object | None = None  # the state after ids[:start] (None: zero), then after ids
    last: torch.Tensor | None = None  # (v,) the next-token logits after ids, once known
    pad: int = 0  # padded columns in front of it in its prefill batch

    @property
    def batchable(self) -> bool:
        """Starts from zero and needs the last logits only: may share a left-padded forward with others."""
        return self.start == 0 and not self.job.prompt_logprobs

    @property
    def prefilled(self) -> bool:
        return self.last is not None


def fresh_groups(prompts: list[Prompt], max_tokens: int = FORWARD_TOKENS) -> list[list[Prompt]]:
    """The batchable prompts in groups of similar length, longest first: a group ends where its padding would
    exceed MAX_PADDING of its real tokens, or its padded tokens `max_tokens` (a longer prompt makes a group alone).
    Sorted longest first, each prompt pads less than the next would: where one does not fit, none after it does."""
    groups: list[list[Prompt]] = []
    for prompt in sorted(prompts, key=lambda p: -len(p.ids)):
        if groups:
            group = groups[-1]
            padded = len(group[0].ids) * (len(group) + 1)
            real = sum(len(p.ids) for p in group) + len(prompt.ids)
            if padded <= (1 + MAX_PADDING) * real and padded <= max_tokens:
                group.append(prompt)
                continue
        groups.append([prompt])
    return groups


def cache_row(cache, r: int, states: list[tuple[torch.Tensor, torch.Tensor]] | None = None):
    """Row r of a batch's state as a batch-1 state of its own, copied (a view would keep the whole batch alive in
    the prefix cache): the cache's own conv windows and SSM states, or `states`, per layer (conv, ssm) of the same
    batch, such as the ones recorded at a chunk boundary."""
    if not isinstance(cache, DynamicCache):
        return cache.row(r)
    memo = {}  # deepcopy puts these in place of the cache's tensors, and copies the rest
    for i, layer in enumerate(cache.layers):
        conv, ssm = states[i] if states is not None else (layer.conv_states[0], layer.recurrent_states[0])
        for held, row in ((layer.conv_states[0], conv), (layer.recurrent_states[0], ssm)):
            if held is not None:
                memo[id(held)] = row[r : r + 1].clone()
    return copy.deepcopy(cache, memo)


class Prefiller:
    """Runs groups of prompts into batch-1 states and puts those, and checkpoints along the prompts, into the state
    cache. Used from the engine thread only.

    Args:
        model: the engine's model (PyTorch, or a backend with the same call: `serve.onnx_model.OnnxLM`).
        new_cache: a fresh, empty state of the model.
        state_cache: the prefix cache that gets the states.
        interval: a checkpoint every this many tokens (0: prompt ends only). PyTorch takes them from the chunked
            scan's chunk boundaries (free; the interval rounded up to whole chunks); another backend prefills in pieces.
    """

    def __init__(self, model, new_cache, state_cache: StateCache, interval: int):
        self.model, self.new_cache, self.state_cache, self.interval = model, new_cache, state_cache, interval
        self.scan_checkpoints = isinstance(model, torch.nn.Module)
        self.device = next(model.parameters()).device if self.scan_checkpoints else model.device

    def run(self, group: list[Prompt]) -> torch.Tensor:
        """Prefills the group (several batchable prompts, or any one prompt) and gives each its state and last
        logits. Returns the last forward's logits: (b, l, v) for a prompt that scores itself, else (b, 1, v)."""
        ids, mask = self._padded(group)
        scoring = group[0].job.prompt_logprobs
        checkpoints = bool(self.state_cache.max_bytes and self.interval and not scoring)
        cache = group[0].cache if group[0].start else self.new_cache()
        done = 0  # columns run so far
        for end in self._piece_ends(group, ids.shape[1]) if checkpoints and not self.scan_checkpoints else ():
            piece_mask = mask[:, :end] if mask is not None and not done else None  # the first piece holds the padding
            out = self.model(ids[:, done:end], attention_mask=piece_mask, cache=cache, use_cache=True, logits_to_keep=1)
            cache, done = out.cache, end
            self._keep(group, end, cache, out.logits[:, -1])
        if checkpoints and self.scan_checkpoints:
            cache.chunk_checkpoints = {}  # the scan records its chunk-boundary states (`_keep_checkpoints`)
        out = self.model(
            ids[:, done:],
            attention_mask=mask if not done else None,
            cache=cache,
            use_cache=True,
            logits_to_keep=0 if scoring else 1,  # 0: every position's logits
        )
        cache = out.cache
        if getattr(cache, "chunk_checkpoints", None) is not None:
            self._keep_checkpoints(group, done, cache)
        for r, prompt in enumerate(group):
            prompt.cache, prompt.last = cache if len(group) == 1 else cache_row(cache, r), out.logits[r, -1]
            if self.state_cache.max_bytes:
                self.state_cache.put(prompt.ids, prompt.cache, prompt.last)
        return out.logits

    def _padded(self, group: list[Prompt]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The tokens still to run of each prompt, left-padded to the longest: ids (b, l) and the attention mask
        (b, l), None where nothing is padded. Sets each prompt's `pad`."""
        rows = [prompt.ids[prompt.start :] for prompt in group]
        width = max(len(row) for row in rows)
        ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
        mask = torch.ones_like(ids)
        for prompt, row, ids_row, mask_row in zip(group, rows, ids, mask):
            prompt.pad = width - len(row)
            ids_row[prompt.pad :] = torch.tensor(row)
            mask_row[: prompt.pad] = 0
        padded = any(prompt.pad for prompt in group)
        return ids.to(self.device), mask.to(self.device) if padded else None

    def _piece_ends(self, group: list[Prompt], width: int) -> range:
        """The columns where a piece of a prefill in pieces ends: the multiples of the interval from the prompts'
        start (0 for fresh prompts) after all the padding, since a piece that continues a state takes none."""
        start, interval = group[0].start, self.interval  # one prompt if it resumes, else start 0 for all
        lowest = max(max(prompt.pad for prompt in group), 1)  # a column after every padded one
        first = -(-(start + lowest) // interval) * interval - start
        return range(first, width, interval)

    def _keep(self, group: list[Prompt], column: int, cache, logits: torch.Tensor | None, states=None) -> None:
        """Puts each row's state after `column` columns of the batch (`cache`'s own, or `states`, see `cache_row`)
        into the state cache, as the state after the row's first start + column - pad tokens, where there are any;
        with its next-token logits (b, v), or as a checkpoint without (None)."""
        for r, prompt in enumerate(group):
            end = prompt.start + column - prompt.pad
            if end > 0:
                row_logits = None if logits is None else logits[r]
                self.state_cache.put(prompt.ids[:end], cache_row(cache, r, states), row_logits, owned=True)

    def _keep_checkpoints(self, group: list[Prompt], done: int, cache: DynamicCache) -> None:
        """Keeps the chunk-boundary states that the mixers recorded during the forward from column `done`, every
        interval (rounded up to whole chunks) from there: each row's conv window and SSM state at the boundary."""
        recorded = cache.chunk_checkpoints
        del cache.chunk_checkpoints  # before any copy of the cache, and so that nothing else records into it
        layers = range(len(cache.layers))
        # Nothing to keep where a layer has no mixer, or the prefill was one token (a decode step records nothing).
        if sorted(recorded) != list(layers) or any(recorded[i].keys() != {"conv", "ssm"} for i in layers):
            return
        chunk = self.model.config.chunk_size
        every = -(-self.interval // chunk) * chunk
        for j in range(recorded[0]["ssm"].shape[1]):
            column = (j + 1) * chunk  # the boundary's column, from `done`
            if column % every == 0:
                states = [(recorded[i]["conv"][:, j], recorded[i]["ssm"][:, j]) for i in layers]
                self._keep(group, done + column, cache, None, states)
