"""OpenAI's `logprobs` object of a completion choice, built from the engine's per-token log-probabilities.

`{"tokens": [...], "token_logprobs": [...], "top_logprobs": [{token: logprob}, ...], "text_offset": [...]}`: one
entry per token, the prompt's tokens first with `echo` (the very first token's logprob and top are `null`: nothing
predicts it). `text_offset` is each token's character offset from the start of the prompt, as in OpenAI's API, so
that with `echo` it indexes the returned text. The offsets add up the tokens' own decoded lengths, with special
tokens (`<s>`) counting 0 since they are not part of the text. A token that ends inside a UTF-8 character
(byte-level BPE) is shown as its vocabulary entry, so that the keys of `top_logprobs` stay distinct, and counts 0
too: offsets after such a character are short by one per character. The sampled token is always in
`top_logprobs`, which may hence hold `logprobs + 1` entries.
"""

from __future__ import annotations

from .sampling import TokenLogprob

REPLACEMENT = "\ufffd"  # what a partial UTF-8 character decodes to


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
