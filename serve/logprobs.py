"""OpenAI's `logprobs` objects of a completion choice and of a chat choice, built from the engine's per-token
log-probabilities.

Completions (`Logprobs`):

`{"tokens": [...], "token_logprobs": [...], "top_logprobs": [{token: logprob}, ...], "text_offset": [...]}`: one
entry per token, the prompt's tokens first with `echo` (the very first token's logprob and top are `null`: nothing
predicts it). `text_offset` is each token's character offset from the start of the prompt, as in OpenAI's API, so
that with `echo` it indexes the returned text. The offsets add up the tokens' own decoded lengths, with special
tokens (`<s>`) counting 0 since they are not part of the text. A token that ends inside a UTF-8 character
(byte-level BPE) is shown as its vocabulary entry, so that the keys of `top_logprobs` stay distinct, and counts 0
too: offsets after such a character are short by one per character. The sampled token is always in
`top_logprobs`, which may hence hold `logprobs + 1` entries.

Chat (`ChatLogprobs`): `{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"},
...]}, ...]}`, one entry per generated token with its `top_logprobs` most likely tokens (exactly that many, as
OpenAI gives them). `bytes` are the token's own bytes, for a byte-level BPE tokenizer its raw bytes even where it
ends inside a UTF-8 character, so that a client that joins and decodes them gets the reply's text (where the model
wrote invalid UTF-8, the reply shows U+FFFD, as decoding with errors="replace" does; a stop sequence cuts the
reply, not the entries). Special tokens (the EOS that ends a reply) are left out of `content`, as out of the reply.
"""

from __future__ import annotations

from tokenizers import decoders
from transformers.convert_slow_tokenizer import bytes_to_unicode

from .sampling import TokenLogprob

REPLACEMENT = "\ufffd"  # what a partial UTF-8 character decodes to
BYTE_OF_CHAR = {char: byte for byte, char in bytes_to_unicode().items()}  # byte-level BPE's alphabet, inverted


class Logprobs:
    """The logprobs of one choice, grown chunk by chunk.

    Args:
        tokenizer: decodes single tokens (used from the event loop's thread only).
        offset: the character offset of the first token to come (the prompt's length when it is not echoed).
    """

    def __init__(self, tokenizer, offset: int = 0):
        self.tokenizer, self.offset = tokenizer, offset
        self.special = set(tokenizer.all_special_ids)
        self.whole = self.empty()

    @staticmethod
    def empty() -> dict:
        return {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}

    def piece(self, token: int) -> tuple[str, int]:
        """The token's text and the characters it adds to the completion."""
        text = self.tokenizer.decode([token], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if REPLACEMENT in text:
            return self.tokenizer.convert_ids_to_tokens(token), 0
        return text, 0 if token in self.special else len(text)

    def add(self, entries: list[TokenLogprob | None], tokens: list[int] | None = None) -> dict:
        """Appends entries (None: the prompt's unscored first token, whose id is then in `tokens`); returns the
        logprobs object of these entries alone (a stream's chunk)."""
        chunk = self.empty()
        for i, entry in enumerate(entries):
            token = entry.token if entry is not None else tokens[i]
            piece, length = self.piece(token)
            chunk["tokens"].append(piece)
            chunk["token_logprobs"].append(None if entry is None else entry.logprob)
            if entry is None:
                chunk["top_logprobs"].append(None)
            else:
                top = {self.piece(t)[0]: lp for t, lp in entry.top}
                chunk["top_logprobs"].append(top | {piece: entry.logprob})
            chunk["text_offset"].append(self.offset)
            self.offset += length
        for key, values in chunk.items():
            self.whole[key] += values
        return chunk


class ChatLogprobs:
    """The logprobs of one chat choice (module docstring), grown delta by delta."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.special = set(tokenizer.all_special_ids)
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self.byte_level = isinstance(getattr(backend, "decoder", None), decoders.ByteLevel)
        self.content: list[dict] = []

    def describe(self, token: int, logprob: float) -> dict:
        text = self.tokenizer.decode([token], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        entry = self.tokenizer.convert_ids_to_tokens(token)
        if self.byte_level and token not in self.special and all(c in BYTE_OF_CHAR for c in entry):
            raw = [BYTE_OF_CHAR[c] for c in entry]
        else:
            raw = list(text.encode())
        return {"token": entry if REPLACEMENT in text else text, "logprob": logprob, "bytes": raw}

    def add(self, entries: list[TokenLogprob]) -> list[dict]:
        """Appends the entries of generated tokens; returns those of this delta alone (a stream's chunk)."""
        chunk = []
        for e in entries:
            if e.token in self.special:
                continue
            chunk.append(self.describe(e.token, e.logprob) | {"top_logprobs": [self.describe(*t) for t in e.top]})
        self.content += chunk
        return chunk
