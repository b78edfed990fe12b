"""The request body of `POST /v1/completions`, as in OpenAI's completions API, and what is wrong with a bad one.

Validation is strict (a string is not a number, unknown fields are refused, as OpenAI refuses them) so that a typo
gets a 400 that names the field instead of a silently ignored setting. OpenAI fields that this server does not
implement (suffix, best_of > n) are accepted only at their neutral values.
"""

from __future__ import annotations

from typing import Any

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


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    prompt: Any  # a string, a list of strings, a list of token ids, or a list of such lists (checked below)
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
    echo: bool = False
    user: str | None = None
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
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
    def prompts(self) -> list[str | list[int]]:
        """Each prompt: a string to tokenize, or token ids to use as they are."""
        return self.prompt

    @property
    def stops(self) -> list[str]:
        return [] if self.stop is None else [self.stop] if isinstance(self.stop, str) else self.stop

    def check(self, limits: Limits) -> None:
        """Raises `BadRequest` for what the types alone cannot say: server limits and unsupported features."""
        if self.max_tokens == 0 and not self.echo:
            raise BadRequest("max_tokens may be 0 only with echo (to score the prompt)", "max_tokens")
        if self.max_tokens is not None and self.max_tokens > limits.max_new_tokens:
            raise BadRequest(
                f"max_tokens is {self.max_tokens}, above this server's limit of {limits.max_new_tokens}", "max_tokens"
            )
        slots = len(self.prompts) * (self.n or 1)
        if slots > limits.max_batch_size:
            raise BadRequest(
                f"this request needs {slots} sequences (prompts x n), above the server's {limits.max_batch_size}", "n"
            )
        if self.best_of is not None and self.best_of != (self.n or 1):
            raise BadRequest("best_of is not supported (only best_of == n)", "best_of")
        if self.suffix is not None:
            raise BadRequest("suffix is not supported by this server", "suffix")

    def check_ids(self, vocab_size: int) -> None:
        """Raises `BadRequest` for token ids (in the prompt or logit_bias) outside the vocabulary."""
        for p in self.prompts:
            if not isinstance(p, str) and not all(0 <= t < vocab_size for t in p):
                raise BadRequest(f"prompt: token ids must lie in [0, {vocab_size})", "prompt")
        if any(int(k) >= vocab_size for k in self.logit_bias or {}):
            raise BadRequest(f"logit_bias: token ids must lie in [0, {vocab_size})", "logit_bias")


def is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_prompt(value: Any) -> bool:
    return isinstance(value, str) or (isinstance(value, list) and all(is_id(t) for t in value))


def parse(body: Any) -> CompletionRequest:
    """The validated request, or `BadRequest` naming every wrong field."""
    try:
        return CompletionRequest.model_validate(body)
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
