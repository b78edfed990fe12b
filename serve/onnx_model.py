"""The ONNX backend: an export folder (`python -m modeling_itera.export`) run by onnxruntime behind the same engine.

`OnnxLM` answers the one call the engine makes of a causal LM, `model(input_ids, attention_mask=..., cache=...,
use_cache=True, logits_to_keep=...)`, with the export's two graphs (`modeling_itera.onnx_runtime.IteraOnnxModel`),
and `OnnxState` is the batched state the engine keeps between steps: per layer the conv window and the SSM state, as
numpy arrays with the batch first. Everything above it (continuous batching, batched prefill, the prefix cache,
sampling, penalties, logprobs, stop strings, n) is the engine's own code, shared with the PyTorch backend.

The graphs take and return plain arrays, so the state is never updated in place: a state handed to the prefix
cache stays what it was, and joining or leaving the batch is a concatenation or a row selection.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from modeling_itera.onnx_runtime import IteraOnnxModel


class OnnxState:
    """The recurrent state of a batch of sequences, 2 arrays per layer (b, ...); `arrays` None: empty sequences, so
    that a fresh prompt takes the prefill graph from zeros (left-padded to whole chunks) in one call."""

    def __init__(self, arrays: list[np.ndarray] | None = None):
        self.arrays = arrays

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays or ())

    def reorder_cache(self, index: torch.Tensor) -> None:
        """Keeps (or repeats) the rows `index`, in that order, as `DynamicCache.reorder_cache` does."""
        rows = index.cpu().numpy()
        self.arrays = [a[rows] for a in self.arrays]

    def row(self, r: int) -> OnnxState:
        """Row r as a state of its own, copied: a view would keep the whole batch's arrays alive where it is kept."""
        return OnnxState([a[r : r + 1].copy() for a in self.arrays])

    @staticmethod
    def concatenate(states: list[OnnxState]) -> OnnxState:
        """The states of several batches stacked into one, in order."""
        return OnnxState([np.concatenate(parts) for parts in zip(*(s.arrays for s in states))])


@dataclass
class Output:
    logits: torch.Tensor  # (b, k, v): the last k positions (k = l where all logits were asked for)
    cache: OnnxState


class OnnxLM:
    """The export folder as the engine's model. Args: folder, the export; threads, onnxruntime's intra-op threads."""

    def __init__(self, folder: str | Path, threads: int | None = None):
        self.onnx = IteraOnnxModel(folder, threads=threads)
        self.folder = self.onnx.folder
        self.device = torch.device("cpu")
        eos = self.onnx.eos_token_id
        path = self.folder / "generation_config.json"
        if path.is_file():  # the model's generation config wins over its config, as for the PyTorch backend
            eos = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id", eos)
        self.generation_config = SimpleNamespace(eos_token_id=eos)
        self.config = SimpleNamespace(**self.onnx.meta["config"], eos_token_id=self.onnx.eos_token_id)

    def new_cache(self) -> OnnxState:
        return OnnxState()

    def __call__(self, *args, **kwargs) -> Output:
        return self.forward(*args, **kwargs)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: OnnxState | None = None,
        use_cache: bool = True,
        logits_to_keep: int = 1,
    ) -> Output:
        """input_ids (b, l) from the state `cache` (empty when None) -> the logits of the last `logits_to_keep`
        positions (0: all) and the state after the last token. `attention_mask` (b, l), 0 for left padding, which
        only the prefill graph from an empty state takes (padding there leaves the zero state at zero; a padded step
        from a state would decay it). The engine's `use_cache` is always True here."""
        ids = input_ids.cpu().numpy()
        states = None if cache is None else cache.arrays
        mask = None if attention_mask is None or bool(attention_mask.all()) else attention_mask.cpu().numpy()
        if mask is not None and (states is not None or logits_to_keep != 1):
            raise ValueError("left padding is for a prefill from an empty state that keeps the last logits only")
        if logits_to_keep == 0 or logits_to_keep > 1:  # the prefill graph returns the last position only
            logits, states = self._every_position(ids, states)
            logits = logits[:, -logits_to_keep:] if logits_to_keep else logits
        elif ids.shape[1] == 1 and mask is None:
            last, states = self.onnx.decode(ids, self.onnx.zero_states(len(ids)) if states is None else states)
            logits = last[:, None]
        else:
            last, states = self.onnx.prefill(ids, mask, states=states)
            logits = last[:, None]
        return Output(torch.from_numpy(np.ascontiguousarray(logits)), OnnxState(states))

    def _every_position(self, ids: np.ndarray, states: list[np.ndarray] | None) -> tuple[np.ndarray, list]:
        """(b, l, v) logits of every position, one decode step per token (to score an echoed prompt)."""
        states = self.onnx.zero_states(len(ids)) if states is None else states
        logits = []
        for t in range(ids.shape[1]):
            last, states = self.onnx.decode(ids[:, t : t + 1], states)
            logits.append(last)
        return np.stack(logits, axis=1), states


def load_onnx(folder: str | Path, threads: int | None = None):
    """Returns (`OnnxLM`, tokenizer) for an export folder; `NotAnExportError` (a `ValueError`) for any other."""
    from transformers import AutoTokenizer

    model = OnnxLM(folder, threads=threads)
    if not (model.folder / "tokenizer.json").is_file():
        raise ValueError(f"{folder} has no tokenizer.json: export the model with its tokenizer")
    return model, AutoTokenizer.from_pretrained(str(model.folder))
