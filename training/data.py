"""Data pipeline: text documents -> token ids -> fixed-length blocks, with `datasets`.

Sources: a local `.txt` file (documents separated by a line `<|endoftext|>`, as TinyStories ships them; a file
without separators is one document per paragraph block), a local `.jsonl` file (a "text" field per line), a
folder of such files, or a Hub dataset name such as `roneneldan/TinyStories` (needs a network).
Each document becomes `<s> tokens </s>`; documents are concatenated and cut into blocks of `block_size` tokens,
so no token is lost except the tail shorter than one block. The packed blocks are saved under `cache_dir`, keyed by
the data, the tokenizer and the block size, so that a second run does not tokenize again.

`PackedDocumentsCollator` batches the blocks with their document boundaries: `seq_idx` (each `<s>` starts a new
document, where the model resets its state) and a label of -100 at each `<s>`, so that no document is predicted from
the one before it, as transformers' `DataCollatorWithFlattening(return_seq_idx=True)` does for unpacked documents.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from datasets import Dataset, load_dataset, load_from_disk

DOC_SEPARATOR = "<|endoftext|>"
IGNORE_INDEX = -100  # the label the loss skips (transformers' and torch's cross-entropy default)
TEXT_SUFFIXES = (".txt", ".jsonl", ".json")


def read_documents(path: str | Path) -> list[str]:
    """The documents of one local `.txt` or `.jsonl` file. Raises a clear error for a missing or empty file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file not found: {path}")
    if path.suffix not in TEXT_SUFFIXES:
        raise ValueError(f"unsupported data file {path}: expected one of {', '.join(TEXT_SUFFIXES)}")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"data file is empty: {path}")
    if path.suffix in (".jsonl", ".json"):
        docs = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                record = json.loads(line)
                if "text" not in record:
                    raise ValueError(f"{path}:{n}: a JSON line without a 'text' field")
                docs.append(record["text"])
    elif DOC_SEPARATOR in text:
        docs = text.split(DOC_SEPARATOR)
    else:
        docs = text.split("\n\n")
    docs = [d.strip() for d in docs if d.strip()]
    if not docs:
        raise ValueError(f"data file has no text: {path}")
    return docs


def load_texts(source: str, split: str = "train") -> Dataset:
    """A dataset with a "text" column from a local file or folder, or from the Hub by name."""
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in TEXT_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"no {'/'.join(TEXT_SUFFIXES)} files in folder {path}")
        return Dataset.from_dict({"text": [d for f in files for d in read_documents(f)]})
    if path.suffix in TEXT_SUFFIXES or os.sep in source or path.exists():
        return Dataset.from_dict({"text": read_documents(path)})
    # Anything else is a Hub dataset id, e.g. roneneldan/TinyStories (split "train" or "validation").
    return load_dataset(source, split=split)


def _fingerprint(texts: Dataset, tokenizer, block_size: int) -> str:
    h = hashlib.sha256()
    h.update(texts._fingerprint.encode())
    h.update(tokenizer.backend_tokenizer.to_str().encode())
    h.update(str(block_size).encode())
    return h.hexdigest()[:16]


def tokenize_and_pack(
    texts: Dataset, tokenizer, block_size: int, cache_dir: str | Path | None = None, num_proc: int | None = None
) -> Dataset:
    """Token blocks `{"input_ids": [block_size ints]}` from documents `{"text": str}`.

    Args:
        texts: documents.
        tokenizer: adds <s> itself; </s> is appended here.
        block_size: tokens per block.
        cache_dir: where packed blocks are kept between runs (None: no cache).
        num_proc: processes for tokenization (default: the CPU count, at most 8).
    """
    if block_size < 2:
        raise ValueError(f"block_size must be at least 2, got {block_size}")
    cached = Path(cache_dir) / f"packed-{_fingerprint(texts, tokenizer, block_size)}" if cache_dir else None
    if cached is not None and cached.exists():
        return load_from_disk(str(cached))
    num_proc = num_proc or min(8, os.cpu_count() or 1)
    num_proc = num_proc if len(texts) >= 1000 * num_proc else None  # processes only pay off on big inputs
    eos = tokenizer.eos_token_id

    def tokenize(batch):
        ids = tokenizer(batch["text"], add_special_tokens=True)["input_ids"]
        return {"input_ids": [doc + [eos] for doc in ids]}

    def pack(batch):
        flat = [t for doc in batch["input_ids"] for t in doc]
        usable = len(flat) - len(flat) % block_size
        return {"input_ids": [flat[i : i + block_size] for i in range(0, usable, block_size)]}

    tokens = texts.map(tokenize, batched=True, num_proc=num_proc, remove_columns=texts.column_names, desc="Tokenizing")
    # One packing pass over everything (batch_size=None): blocks then span document boundaries, as intended.
    blocks = tokens.map(pack, batched=True, batch_size=None, desc="Packing")
    if len(blocks) == 0:
        raise ValueError(f"the data has fewer than block_size={block_size} tokens: nothing to train on")
    if cached is not None:
        blocks.save_to_disk(str(cached))
    return blocks


class PackedDocumentsCollator:
    """Batches of packed blocks `{"input_ids": [...]}` for a causal LM that keeps the documents inside a block apart.

    Returns `input_ids` (b, l), `labels` (the ids, -100 at each `<s>`: a document's first token is not predicted from
    the previous document) and `seq_idx` (b, l) int32, the number of `<s>` up to each position: the document index
    that `IteraLiteForCausalLM` resets its state and conv window at. A block that starts inside a document gives that
    document index 0; the tokens before it in the document are out of reach, as without boundaries.
    """

    def __init__(self, bos_token_id: int):
        self.bos_token_id = bos_token_id

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        ids = torch.tensor([list(f["input_ids"]) for f in features], dtype=torch.long)  # (b, l)
        starts = ids == self.bos_token_id
        return {
            "input_ids": ids,
            "labels": ids.masked_fill(starts, IGNORE_INDEX),
            "seq_idx": starts.cumsum(1, dtype=torch.int32),
        }
