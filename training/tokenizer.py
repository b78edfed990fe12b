"""Byte-level BPE tokenizer for Itera-Lite, trained with `tokenizers` and wrapped for `AutoTokenizer`.

Special tokens have fixed ids that match `IteraLiteConfig`'s defaults: <pad>=0, <s>=1, </s>=2. <pad> is distinct
from </s> because the language-modeling collator masks every pad id out of the labels: with pad == eos the model
would never learn to end a story. Every encoding starts with <s>, as every training document does.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
SPECIAL_TOKENS = [PAD, BOS, EOS]  # ids 0, 1, 2


def train_tokenizer(texts: Iterable[str], vocab_size: int = 8192, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """Trains a byte-level BPE of exactly `vocab_size` entries (if the text has enough distinct pairs).

    Args:
        texts: documents (or batches of lines) to learn merges from.
        vocab_size: entries including the 256 byte symbols and the 3 special tokens.
    """
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(
            f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} (bytes + specials), got {vocab_size}"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte is a token: no <unk>, ever
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return wrap(tok)


def wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    """The transformers tokenizer around a `tokenizers.Tokenizer`, with left padding for batched generation."""
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        padding_side="left",
        model_input_names=["input_ids", "attention_mask"],
    )


def batched(texts: Iterable[str], size: int = 1000) -> Iterator[list[str]]:
    batch = []
    for text in texts:
        batch.append(text)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def load_or_train(path: str | Path, texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Loads the tokenizer saved in `path`, or trains one on `texts` and saves it there."""
    from transformers import AutoTokenizer

    path = Path(path)
    if (path / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(path)
    tokenizer = train_tokenizer(batched(texts), vocab_size=vocab_size)
    tokenizer.save_pretrained(path)
    return tokenizer
