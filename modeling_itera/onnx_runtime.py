"""Run an Itera-Lite ONNX export (`python -m modeling_itera.export`) with onnxruntime, numpy and tokenizers only.

No PyTorch and no transformers: this file imports neither (tests/test_onnx.py runs it where `import torch` fails).

    model = IteraOnnxModel("itera-onnx")
    print(model.generate("Once upon a time", max_new_tokens=50, greedy=True))
    for piece in model.stream("Once upon a time", temperature=0.8, top_k=50, seed=0):
        print(piece, end="", flush=True)

The state of a sequence is 2 arrays per layer (the conv window and the SSM state), of a fixed size: a prompt is one
`prefill` call, each new token one `decode` call, whatever the length so far.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

METADATA_FILE = "itera_onnx.json"  # the same name as in export.py, which this file cannot import (it imports torch)
FORMAT = "itera-lite-onnx"
FORMAT_VERSION = 1
GRAPHS = ("prefill", "decode")


class NotAnExportError(ValueError):
    """A folder that is not an Itera-Lite ONNX export, or whose graphs do not match its `itera_onnx.json`."""


def load_metadata(folder: Path) -> dict:
    path = folder / METADATA_FILE
    if not folder.is_dir():
        raise NotAnExportError(f"{folder} is not a folder (expected an export of `python -m modeling_itera.export`)")
    if not path.is_file():
        raise NotAnExportError(
            f"{folder} is not an Itera-Lite ONNX export: it has no {METADATA_FILE} "
            "(write an export with `python -m modeling_itera.export --model MODEL --output DIR`)"
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise NotAnExportError(f"{path} is not valid JSON ({err})") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise NotAnExportError(f"{path} does not describe an Itera-Lite ONNX export (format is not {FORMAT!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise NotAnExportError(
            f"{path} has format_version {meta.get('format_version')!r}; this runtime reads {FORMAT_VERSION}: "
            "export the model again with this version of modeling_itera"
        )
    return meta


def check_graph(session: ort.InferenceSession, graph: str, path: Path, meta: dict) -> None:
    """The graph was exported from the model the metadata describes, and takes and returns what it says."""
    stamp = session.get_modelmeta().custom_metadata_map
    if stamp.get("itera_config_hash") != meta["config_hash"]:
        raise NotAnExportError(
            f"{path} was exported from another model: its config hash is {stamp.get('itera_config_hash')!r}, "
            f"{METADATA_FILE} says {meta['config_hash']!r} (the folder mixes files of two exports)"
        )
    if stamp.get("itera_graph") != graph:
        raise NotAnExportError(f"{path} is the {stamp.get('itera_graph')!r} graph, not {graph!r}")
    expected = meta["graphs"][graph]
    for kind, actual in (("inputs", session.get_inputs()), ("outputs", session.get_outputs())):
        names = [v.name for v in actual]
        want = [v["name"] for v in expected[kind]]
        if names != want:
            raise NotAnExportError(f"{path} has {kind} {names}, {METADATA_FILE} says {want}")
        for value, spec in zip(actual, expected[kind]):
            static = [(i, d) for i, d in enumerate(spec["shape"]) if isinstance(d, int)]
            if any(not isinstance(value.shape[i], int) or value.shape[i] != d for i, d in static):
                raise NotAnExportError(
                    f"{path}: {value.name} has shape {value.shape}, {METADATA_FILE} says {spec['shape']}"
                )


class IteraOnnxModel:
    """An export folder: its two onnxruntime sessions, its tokenizer, and a generator over them.

    Args:
        folder: the output of `python -m modeling_itera.export`.
        threads: onnxruntime intra-op threads (default: onnxruntime's, the physical cores).
    """

    def __init__(self, folder: str | Path, threads: int | None = None):
        self.folder = Path(folder)
        self.meta = load_metadata(self.folder)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.sessions = {}
        for graph in GRAPHS:
            path = self.folder / self.meta["graphs"][graph]["file"]
            if not path.is_file():
                raise NotAnExportError(f"{self.folder} is an incomplete export: {path.name} is missing")
            try:
                session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            except Exception as err:  # onnxruntime raises its own exception types for unreadable graphs
                raise NotAnExportError(f"{path} is not a readable ONNX graph ({err})") from err
            check_graph(session, graph, path, self.meta)
            self.sessions[graph] = session
        self.vocab_size = int(self.meta["vocab_size"])
        self.chunk_size = int(self.meta["chunk_size"])
        self.eos_token_id, self.pad_token_id = self.meta.get("eos_token_id"), self.meta.get("pad_token_id") or 0
        self.state_names = [v["name"] for v in self.meta["graphs"]["decode"]["inputs"][1:]]
        self.state_shapes = {
            v["name"]: tuple(v["shape"][1:]) for v in self.meta["graphs"]["decode"]["inputs"][1:]
        }  # without the batch
        self.generation_defaults = self._generation_defaults()
        self._tokenizer = None

    @property
    def tokenizer(self):
        """The export's `tokenizers.Tokenizer` (loaded on first use: a caller that passes ids needs none)."""
        if self._tokenizer is None:
            from tokenizers import Tokenizer

            path = self.folder / "tokenizer.json"
            if not path.is_file():
                raise NotAnExportError(f"{self.folder} has no tokenizer.json: pass token ids instead of text")
            self._tokenizer = Tokenizer.from_file(str(path))
        return self._tokenizer

    def _generation_defaults(self) -> dict:
        path = self.folder / "generation_config.json"
        config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        keys = ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "repetition_penalty")
        return {k: config[k] for k in keys if config.get(k) is not None}

    # --- the two graphs, with their inputs checked ---------------------------------------------------------------

    def zero_states(self, batch: int) -> list[np.ndarray]:
        """The state of an empty sequence: zeros, 2 arrays per layer, in the graphs' input order."""
        return [np.zeros((batch, *self.state_shapes[name]), dtype=np.float32) for name in self.state_names]

    def check_ids(self, input_ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(input_ids)
        if ids.ndim != 2 or 0 in ids.shape:
            raise ValueError(f"input_ids must be a non-empty (batch, length) array, got shape {ids.shape}")
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"input_ids must hold integer token ids, got dtype {ids.dtype}")
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= self.vocab_size:
            raise ValueError(
                f"input_ids contains token id {lo if lo < 0 else hi}, outside [0, vocab_size={self.vocab_size})"
            )
        return ids.astype(np.int64, copy=False)

    def check_states(self, states: Sequence[np.ndarray], batch: int) -> list[np.ndarray]:
        if len(states) != len(self.state_names):
            raise ValueError(
                f"expected {len(self.state_names)} state arrays ({', '.join(self.state_names)}), got {len(states)}"
            )
        checked = []
        for name, state in zip(self.state_names, states):
            state = np.asarray(state)
            expected = (batch, *self.state_shapes[name])
            if state.shape != expected:
                raise ValueError(f"{name} has shape {state.shape}, expected {expected} (batch {batch} of input_ids)")
            checked.append(state.astype(np.float32, copy=False))
        return checked

    def _run(self, graph: str, feeds: dict) -> tuple[np.ndarray, list[np.ndarray]]:
        logits, *states = self.sessions[graph].run(None, feeds)
        return logits[:, -1], states

    def decode(self, input_ids: np.ndarray, states: Sequence[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """One token per sequence. input_ids (b, 1) or (b,) -> logits (b, vocab) and the new states."""
        ids = self.check_ids(np.asarray(input_ids).reshape(-1, 1))
        states = self.check_states(states, ids.shape[0])
        return self._run("decode", {"input_ids": ids, **dict(zip(self.state_names, states))})

    def perplexity(self, ids: np.ndarray) -> float:
        """Teacher-forced perplexity of (b, l) token ids, one decode step per position (a decode step from zero
        states is the prefill of one token)."""
        states, nll = self.zero_states(ids.shape[0]), []
        for t in range(ids.shape[1] - 1):
            logits, states = self.decode(ids[:, t : t + 1], states)
            shifted = logits - logits.max(-1, keepdims=True)
            logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
            nll.append(-logp[np.arange(len(ids)), ids[:, t + 1]])
        return float(np.exp(np.mean(nll)))

    def prefill(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray | None = None,
        states: Sequence[np.ndarray] | None = None,
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """A prompt, from an empty state or from `states`. input_ids (b, l), attention_mask (b, l) with 0 for left
        padding -> logits of the last position (b, vocab) and the states after it.

        From an empty state the prompt is left-padded to a whole number of chunks (the prefill graph's length), which
        changes nothing: padding leaves a zero state at zero. From given `states` it must not be padded (a padded
        step still decays the state): the whole chunks go through the prefill graph, the rest through decode steps.
        """
        ids = self.check_ids(input_ids)
        b, l = ids.shape
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask).astype(np.int64)
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask has shape {mask.shape}, input_ids {ids.shape}")
        if states is None:
            pad = (-l) % self.chunk_size
            ids = np.pad(ids, ((0, 0), (pad, 0)), constant_values=self.pad_token_id)
            mask = np.pad(mask, ((0, 0), (pad, 0)))
            feeds = {"input_ids": ids, "attention_mask": mask, **dict(zip(self.state_names, self.zero_states(b)))}
            return self._run("prefill", feeds)
        states = self.check_states(states, b)
        if not mask.all():
            raise ValueError("a prompt continued from states cannot be padded: pass rows of equal length, mask all 1")
        whole = l - l % self.chunk_size
        logits = None
        if whole:
            feeds = {
                "input_ids": ids[:, :whole],
                "attention_mask": mask[:, :whole],
                **dict(zip(self.state_names, states)),
            }
            logits, states = self._run("prefill", feeds)
        for t in range(whole, l):
            logits, states = self._run(
                "decode", {"input_ids": ids[:, t : t + 1], **dict(zip(self.state_names, states))}
            )
        return logits, states

    # --- generation ------------------------------------------------------------------------------------------------

    def encode(self, prompts: str | Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Text -> left-padded ids (b, l) and attention mask."""
        texts = [prompts] if isinstance(prompts, str) else list(prompts)
        rows = [self.tokenizer.encode(t).ids for t in texts]
        if not texts or any(not r for r in rows):
            raise ValueError("the prompt is empty (no tokens)")
        width = max(len(r) for r in rows)
        ids = np.full((len(rows), width), self.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, row in enumerate(rows):
            ids[i, width - len(row) :], mask[i, width - len(row) :] = row, 1
        return ids, mask

    def generate_ids(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray | None = None,
        max_new_tokens: int | None = None,
        greedy: bool | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float | None = None,
        seed: int | None = None,
        eos_token_id: int | None | bool = True,
    ) -> Iterator[np.ndarray]:
        """Yields the next token of every row (b,), step by step. A row that has emitted eos gets `pad_token_id`
        from then on; the loop ends when every row has, or after `max_new_tokens`. Unset sampling arguments take the
        export's `generation_config.json`; without one, and without sampling arguments, it is greedy.
        `eos_token_id=True`: the export's eos; None or False: no stop."""
        d = self.generation_defaults
        max_new_tokens = d.get("max_new_tokens", 100) if max_new_tokens is None else max_new_tokens
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        if greedy is None:  # sampling when the generation config says so, or when a sampling argument is given
            greedy = not (d.get("do_sample", False) or any(v is not None for v in (temperature, top_k, top_p)))
        sampler = Sampler(
            temperature=1.0 if greedy else (d.get("temperature", 1.0) if temperature is None else temperature),
            top_k=None if greedy else (d.get("top_k") if top_k is None else top_k),
            top_p=None if greedy else (d.get("top_p") if top_p is None else top_p),
            repetition_penalty=d.get("repetition_penalty", 1.0) if repetition_penalty is None else repetition_penalty,
            greedy=greedy,
            seed=seed,
        )
        eos = self.eos_token_id if eos_token_id is True else (None if eos_token_id is False else eos_token_id)
        ids = self.check_ids(input_ids)
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
        seen = np.zeros((ids.shape[0], self.vocab_size), dtype=bool)  # for the repetition penalty
        rows = np.broadcast_to(np.arange(ids.shape[0])[:, None], ids.shape)
        seen[rows[mask == 1], ids[mask == 1]] = True
        logits, states = self.prefill(ids, mask)
        done = np.zeros(ids.shape[0], dtype=bool)
        for _ in range(max_new_tokens):
            token = np.where(done, self.pad_token_id, sampler(logits, seen))
            seen[np.arange(len(token)), token] |= ~done
            yield token
            done |= eos is not None and token == eos
            if done.all():
                return
            logits, states = self.decode(token[:, None], states)

    def generate(
        self,
        prompts: str | Sequence[str],
        *,
        max_new_tokens: int | None = None,
        greedy: bool | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float | None = None,
        seed: int | None = None,
        eos_token_id: int | None | bool = True,
        skip_special_tokens: bool = True,
    ) -> str | list[str]:
        """Text in, text out: a list for a list of prompts, batched with left padding.

        Args:
            prompts: one text or a list of texts.
            max_new_tokens: tokens to generate at most (default: the export's generation config, else 100).
            greedy: argmax decoding; None: sampling when the generation config says so or a sampling argument is set.
            temperature, top_k, top_p: sampling settings (unset: the generation config's).
            repetition_penalty: transformers' penalty of tokens already in the row (1.0: none).
            seed: seeds the sampler's numpy generator.
            eos_token_id: True: the export's eos ends a row; an id: that one; None or False: no stop.
            skip_special_tokens: drop special tokens from the decoded text.

        Returns:
            the generated text (without the prompt), or one per prompt.
        """
        ids, mask = self.encode(prompts)
        steps = list(
            self.generate_ids(
                ids, mask, max_new_tokens, greedy, temperature, top_k, top_p, repetition_penalty, seed, eos_token_id
            )
        )
        tokens = np.stack(steps, axis=1) if steps else np.zeros((ids.shape[0], 0), dtype=np.int64)
        texts = [self.tokenizer.decode(self._until_eos(row), skip_special_tokens=skip_special_tokens) for row in tokens]
        return texts[0] if isinstance(prompts, str) else texts

    def stream(
        self,
        prompt: str,
        *,
        max_new_tokens: int | None = None,
        greedy: bool | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float | None = None,
        seed: int | None = None,
        eos_token_id: int | None | bool = True,
        skip_special_tokens: bool = True,
    ) -> Iterator[str]:
        """One prompt; yields the new text as it grows (arguments as in `generate`). Each piece is cut from the
        decoded prompt + new tokens, so that spaces and merged characters come out as in one decode."""
        ids, mask = self.encode(prompt)
        prompt_ids = ids[0].tolist()
        shown = self.tokenizer.decode(prompt_ids, skip_special_tokens=skip_special_tokens)
        new = []
        steps = self.generate_ids(
            ids, mask, max_new_tokens, greedy, temperature, top_k, top_p, repetition_penalty, seed, eos_token_id
        )
        for token in steps:
            new = self._until_eos([*new, int(token[0])])
            text = self.tokenizer.decode(prompt_ids + new, skip_special_tokens=skip_special_tokens)
            if len(text) > len(shown) and not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                yield text[len(shown) :]
                shown = text

    def _until_eos(self, row) -> list[int]:
        row = [int(t) for t in row]
        return row[: row.index(self.eos_token_id) + 1] if self.eos_token_id in row else row


class Sampler:
    """The next token from the last logits (b, vocab), in transformers' order: repetition penalty, temperature,
    top-k, top-p, then a draw (or the argmax when `greedy`) with a numpy generator seeded once."""

    def __init__(self, temperature=1.0, top_k=None, top_p=None, repetition_penalty=1.0, greedy=False, seed=None):
        if not greedy and not temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature!r}")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
        if top_k is not None and top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {top_k!r}")
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.repetition_penalty, self.greedy = repetition_penalty, greedy
        self.rng = np.random.default_rng(seed)

    def __call__(self, logits: np.ndarray, seen: np.ndarray) -> np.ndarray:
        logits = logits.astype(np.float32, copy=True)
        if self.repetition_penalty != 1.0:
            penalised = np.where(logits > 0, logits / self.repetition_penalty, logits * self.repetition_penalty)
            logits = np.where(seen, penalised, logits)
        if self.greedy:
            return logits.argmax(-1)
        logits /= self.temperature
        if self.top_k:
            kth = np.sort(logits, axis=-1)[:, -min(self.top_k, logits.shape[-1]), None]
            logits = np.where(logits < kth, -np.inf, logits)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        if self.top_p is not None and self.top_p < 1:
            order = np.argsort(-probs, axis=-1)
            sorted_probs = np.take_along_axis(probs, order, -1)
            # keep the smallest prefix whose mass reaches top_p (at least one token)
            drop_sorted = np.cumsum(sorted_probs, -1) - sorted_probs >= self.top_p
            drop = np.zeros_like(drop_sorted)
            np.put_along_axis(drop, order, drop_sorted, -1)
            probs = np.where(drop, 0.0, probs)
            probs /= probs.sum(-1, keepdims=True)
        u = self.rng.random((probs.shape[0], 1))
        return np.minimum((np.cumsum(probs, -1) < u).sum(-1), probs.shape[-1] - 1)
