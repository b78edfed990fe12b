"""The request bodies of `POST /v1/completions` and `/v1/chat/completions`, as in OpenAI's API, of `/tokenize`
and `/detokenize` (as in vLLM), and what is wrong with a bad one.

Validation is strict (a string is not a number, unknown fields are refused, as OpenAI refuses them) so that a typo
gets a 400 that names the field instead of a silently ignored setting. OpenAI fields that this server does not
implement (suffix, best_of > n) are accepted only at their neutral values.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .engine import Limits

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions
MAX_STOP_STRINGS = 4  # OpenAI's limit
MAX_LOGPROBS = 5  # OpenAI's limit for completions
MAX_LOGIT_BIAS = 100  # OpenAI's range for a logit_bias value: [-100, 100]


class BadRequest(Exception):
    """A request the server will not run; the app answers 400 with this message and the parameter's name."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message, self.param = message, param


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class Sampling(BaseModel):
    """The fields that completions and chat completions share: length, sampling, stops, penalties, streaming."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    model: str | None = None
    max_tokens: int | None = Field(None, ge=0)  # 0 only with echo: score the prompt, generate nothing
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)  # not in OpenAI's API; vLLM's extension, 0 = no limit
    ignore_eos: bool = False  # vLLM's extension: always max_tokens tokens (load tests, benchmarks)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = Field(None, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (value or {}).items():
            if not key.isdigit():
                raise ValueError(f"keys must be token ids (as strings), got {key!r}")
            if not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                raise ValueError(f"values must lie in [-{MAX_LOGIT_BIAS}, {MAX_LOGIT_BIAS}], got {bias}")
        return value

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, value: Any) -> Any:
        stops = [value] if isinstance(value, str) else value
        if stops is None:
            return value
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
            raise ValueError("must be a non-empty string or a list of non-empty strings")
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"takes at most {MAX_STOP_STRINGS} strings, got {len(stops)}")
        return value

    @property
    def stops(self) -> list[str]:
        return [] if self.stop is None else [self.stop] if isinstance(self.stop, str) else self.stop

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def check(self, limits: Limits, prompts: int = 1) -> None:
        """Raises `BadRequest` for what the types alone cannot say: server limits."""
        if self.max_tokens is not None and self.max_tokens > limits.max_new_tokens:
            raise BadRequest(
                f"max_tokens is {self.max_tokens}, above this server's limit of {limits.max_new_tokens}", "max_tokens"
            )
        slots = prompts * (self.n or 1)
        if slots > limits.max_batch_size:
            raise BadRequest(
                f"this request needs {slots} sequences (prompts x n), above the server's {limits.max_batch_size}", "n"
            )

    def check_bias(self, vocab_size: int) -> None:
        if any(int(k) >= vocab_size for k in self.logit_bias or {}):
            raise BadRequest(f"logit_bias: token ids must lie in [0, {vocab_size})", "logit_bias")


class CompletionRequest(Sampling):
    prompt: Any  # a string, a list of strings, a list of token ids, or a list of such lists (checked below)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, value: Any) -> Any:
        if isinstance(value, list) and value and all(is_id(t) for t in value):
            return [value]  # one prompt of token ids
        prompts = [value] if isinstance(value, str) else value
        if not isinstance(prompts, list) or not prompts or not all(is_prompt(p) for p in prompts):
            raise ValueError("must be a string, a list of strings, a list of token ids or a list of lists of token ids")
        if any(not p or (isinstance(p, str) and not p.strip()) for p in prompts):
            raise ValueError("must not be empty: give some text to continue")
        return prompts

    @property
    def prompts(self) -> list[str | list[int]]:
        """Each prompt: a string to tokenize, or token ids to use as they are."""
        return self.prompt

    def check(self, limits: Limits, prompts: int = 1) -> None:
        """Raises `BadRequest` for what the types alone cannot say: server limits and unsupported features."""
        if self.max_tokens == 0 and not self.echo:
            raise BadRequest("max_tokens may be 0 only with echo (to score the prompt)", "max_tokens")
        super().check(limits, len(self.prompts))
        if self.best_of is not None and self.best_of != (self.n or 1):
            raise BadRequest("best_of is not supported (only best_of == n)", "best_of")
        if self.suffix is not None:
            raise BadRequest("suffix is not supported by this server", "suffix")

    def check_ids(self, vocab_size: int) -> None:
        """Raises `BadRequest` for token ids (in the prompt or logit_bias) outside the vocabulary."""
        for p in self.prompts:
            if not isinstance(p, str) and not all(0 <= t < vocab_size for t in p):
                raise BadRequest(f"prompt: token ids must lie in [0, {vocab_size})", "prompt")
        self.check_bias(vocab_size)


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "user", "assistant"]
    content: str
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, value: Any) -> Any:
        """OpenAI's list of content parts, text parts only, joined."""
        if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in value):
            return "".join(str(p.get("text", "")) for p in value)
        return value


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # this server's limit, below OpenAI's 20

    def check(self, limits: Limits, prompts: int = 1) -> None:
        if self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        if self.max_tokens == 0:
            raise BadRequest("max_tokens must be at least 1", "max_tokens")
        super().check(limits)
        if self.top_logprobs is not None and not self.logprobs:
            raise BadRequest("top_logprobs needs logprobs: true", "top_logprobs")


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = None
    add_special_tokens: bool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    tokens: list[int]


def is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_prompt(value: Any) -> bool:
    return isinstance(value, str) or (isinstance(value, list) and all(is_id(t) for t in value))


def parse(body: Any, kind: type[BaseModel] = CompletionRequest) -> BaseModel:
    """The validated request, or `BadRequest` naming every wrong field."""
    try:
        return kind.model_validate(body)
    except ValidationError as err:
        problems, params = [], []
        for e in err.errors(include_url=False):
            param = ".".join(str(p) for p in e["loc"]) or None
            message = e["msg"].removeprefix("Value error, ")
            if e["type"] == "extra_forbidden":
                message = "unknown field"
            problems.append(f"{param}: {message}" if param else message)
            params.append(param)
        raise BadRequest("; ".join(problems), params[0]) from None
