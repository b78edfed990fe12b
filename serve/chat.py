"""Chat completions for a story model: a conversation becomes a prompt through the tokenizer's chat template,
and the engine's events become OpenAI's `chat.completion` objects and `chat.completion.chunk`s.

The bundled model is a TinyStories model with no notion of turns, so a model folder without its own
`chat_template` gets `STORY_TEMPLATE`: the story so far is the contents of the user and assistant messages in
order, joined by spaces after one `<s>` (system messages are dropped: the model cannot follow instructions), and
the reply continues that story. A folder whose tokenizer has a template, or `--chat-template FILE`, uses that one.
"""

from __future__ import annotations

from collections import defaultdict

from .engine import Delta, Finished, Job
from .logprobs import ChatLogprobs

STORY_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for m in messages if m['role'] != 'system' -%}"
    "{{ ' ' if not loop.first else '' }}{{ m['content'] | trim }}"
    "{%- endfor -%}"
)


def chat_prompt(tokenizer, messages: list[dict], template: str | None = None) -> list[int]:
    """The token ids of a conversation, ready for the reply: the template's text, tokenized without adding
    special tokens (the template writes its own `<s>`)."""
    text = tokenizer.apply_chat_template(
        messages,
        chat_template=template or tokenizer.chat_template or STORY_TEMPLATE,
        tokenize=False,
        add_generation_prompt=True,
    )
    return tokenizer.encode(text, add_special_tokens=False)


class ChatChoices:
    """A job's events as chat choices: a first chunk with the role, content deltas (with their logprobs, where the
    request asked for them), a chunk with finish_reason."""

    def __init__(self, job: Job, tokenizer=None, logprobs: bool = False):
        self.job = job
        self.text: dict[int, str] = defaultdict(str)
        self.reasons: dict[int, str] = {}
        self.logprobs = [ChatLogprobs(tokenizer) for _ in range(job.slots)] if logprobs else None

    @staticmethod
    def chunk(index: int, delta: dict, reason: str | None = None, logprobs: list[dict] | None = None) -> dict:
        return {
            "index": index,
            "delta": delta,
            "logprobs": None if logprobs is None else {"content": logprobs},
            "finish_reason": reason,
        }

    def echoed(self) -> list[dict]:
        return [self.chunk(i, {"role": "assistant", "content": ""}) for i in range(self.job.slots)]

    def on(self, event) -> list[dict]:
        if isinstance(event, Finished):
            self.reasons[event.index] = event.reason
            return [self.chunk(event.index, {}, event.reason)]
        if isinstance(event, Delta):
            self.text[event.index] += event.text
            lp = None if self.logprobs is None else self.logprobs[event.index].add(list(event.logprobs))
            return [self.chunk(event.index, {"content": event.text}, None, lp)] if event.text or lp else []
        return []

    def whole(self) -> list[dict]:
        return [
            {
                "index": i,
                "message": {"role": "assistant", "content": self.text[i]},
                "logprobs": None if self.logprobs is None else {"content": self.logprobs[i].content},
                "finish_reason": self.reasons.get(i),
            }
            for i in range(self.job.slots)
        ]
