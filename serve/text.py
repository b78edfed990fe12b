"""Token ids to text, one token at a time: the deltas a stream sends, and the stop strings that end a completion.

Two things make this more than `decode(ids)[len(sent):]`:
- a token can end in the middle of a UTF-8 character (byte-level BPE), which decodes to U+FFFD until the next
  token completes it; such text is held back, never sent and then taken back;
- a stop string may arrive split over several tokens, so the tail that could still grow into one is held back,
  and the completion ends just before the stop string (which is not part of the text, as in OpenAI's API).

Decoding re-reads only a few tokens of left context each step (the prefix/read offsets of TGI and vLLM), so a long
completion costs O(1) per token, and tokenizers whose pieces depend on their neighbours still diff correctly.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"  # what an incomplete UTF-8 sequence decodes to


class TextStream:
    """The text of one completion, grown one token at a time.

    Args:
        tokenizer: decodes ids; called from one thread only (fast tokenizers are not safe to share).
        stop: strings that end the completion; the text stops just before the first one found.
    """

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.prefix_offset = self.read_offset = 0
        self.text = ""  # decoded so far (may end with a held-back partial stop string)
        self.sent = 0  # characters of `text` already handed out
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _new_text(self, final: bool) -> str:
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and (final or not full.endswith(REPLACEMENT)):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return full[len(prefix) :]
        return ""

    def add(self, token: int) -> str:
        """Appends a token; returns the text that is now final (possibly ""). Check `stopped` afterwards."""
        self.ids.append(token)
        self.text += self._new_text(final=False)
        return self._release(final=False)

    def finish(self) -> str:
        """The rest of the text, once no token will follow (held-back bytes included, as U+FFFD)."""
        if not self.stopped:
            self.text += self._new_text(final=True)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        longest = max((len(s) for s in self.stop), default=0)
        start = max(0, self.sent - longest + 1)  # a stop string cannot lie wholly inside text already searched
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text, self.stopped = self.text[: min(hits)], True
            final = True
        end = len(self.text) if final else len(self.text) - self._held_back()
        delta, self.sent = self.text[self.sent : end], max(self.sent, end)
        return delta

    def _held_back(self) -> int:
        """Characters at the end of `text` that may be the beginning of a stop string."""
        unsent = self.text[self.sent :]
        for k in range(min(len(unsent), max((len(s) - 1 for s in self.stop), default=0)), 0, -1):
            if any(s.startswith(unsent[-k:]) for s in self.stop):
                return k
        return 0
