"""How Itera-Lite generates: token-id checks that cost nothing per step, and a compiled decode step on any device.

`generate` in transformers compiles the decode step's forward only on accelerators and only with a cache whose type
is not exactly `DynamicCache`. A recurrent model is where a compiled step pays most on a CPU too (its step is a few
hundred small ops, bound by per-op overhead, not FLOPs), so an explicit `compile_config` here means "compile", on
the CPU as well: the model then generates with a `DynamicCache` subclass that `generate` agrees to compile (the
same fixed-size recurrent layers, and the cache type users get without a `compile_config`).
Without a `compile_config`, behaviour is transformers' default. Where no C++ compiler exists, it warns once and runs
eager.
"""

from __future__ import annotations

import contextlib
import os
import shutil

import torch
from transformers import DynamicCache
from transformers.utils import logging

logger = logging.get_logger(__name__)

# Up to this many cores, Inductor compiles in the calling process (see `inductor_cpu_settings`).
FEW_CORES = 4
TOKEN_ID_DTYPES = (torch.long, torch.int, torch.int16, torch.int8, torch.uint8)
# The token ids a recurrent cache has read, kept on the cache object by `generate` and `load_state`. A recurrent
# state cannot tell how many tokens it has seen (transformers' `get_seq_length` raises on it), so without this a
# cache passed back to `generate` with the whole sequence, as with a KV cache, would read that sequence twice.
READ_IDS = "itera_read_ids"


def remember_read_ids(cache, read: torch.Tensor) -> None:
    """Notes on `cache` that it has read the (b, n) token ids `read`."""
    setattr(cache, READ_IDS, read.detach())


def unread_length(input_ids: torch.Tensor, cache) -> int | None:
    """How many trailing tokens of `input_ids` `cache` has not read, where `input_ids` start with exactly the ids it
    has read; None where it does not know what it read, or `input_ids` are something else (only new tokens)."""
    read = getattr(cache, READ_IDS, None)
    if read is None or input_ids.shape[0] != read.shape[0] or input_ids.shape[1] <= read.shape[1]:
        return None
    if not torch.equal(input_ids[:, : read.shape[1]], read.to(input_ids.device)):
        return None
    return input_ids.shape[1] - read.shape[1]


def check_token_ids(input_ids: torch.Tensor, vocab_size: int, check_range: bool = True) -> None:
    """A clear ValueError for ids that the embedding cannot take. The range check reads two numbers back from the
    device: `generate` runs it once on the prompt, and the decode steps (whose ids come from the LM head) skip it."""
    if input_ids.dtype not in TOKEN_ID_DTYPES:
        raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    if not check_range:
        return
    lo, hi = (int(v) for v in torch.aminmax(input_ids))
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(f"input_ids contains token id {bad}, outside [0, vocab_size={vocab_size})")


def have_cpp_compiler() -> bool:
    """Whether Inductor can build CPU kernels here: it needs a C++ compiler ($CXX, or g++ / clang++ / c++)."""
    from torch._inductor import config as inductor_config

    try:
        configured = inductor_config.cpp.cxx or ()
    except AttributeError:  # the key can be gone from torch's config proxy (a deleted override): use the defaults
        configured = ()
    if isinstance(configured, str):
        configured = (configured,)
    candidates = [c for c in configured if c] + ["g++", "clang++", "c++"]
    return any(shutil.which(c) for c in candidates)


@contextlib.contextmanager
def prompt_checked_once(model):
    """Inside: the model's forward skips the per-step token-id range check (the prompt was checked already)."""
    previous = model.model.skip_token_range_check
    model.model.skip_token_range_check = True
    try:
        yield
    finally:
        model.model.skip_token_range_check = previous


class CompilableDynamicCache(DynamicCache):
    """A `DynamicCache` that `generate` compiles the decode step with. transformers never compiles a cache whose type
    is exactly `DynamicCache` (so that linear-attention models do not always compile), but any other compileable
    cache it does; the layers, their fixed-size states and every method are `DynamicCache`'s own, so callers get
    the cache type that transformers returns for the same call without a `compile_config`."""


def prepare_compiled_generation(model, kwargs: dict) -> contextlib.AbstractContextManager:
    """Turns an explicit `compile_config` into a compiled decode step on this device; edits `kwargs` of `generate`.

    Returns the context in which `generate` must run (`inductor_cpu_settings` on CPU, or nothing).
    """
    generation_config = kwargs.get("generation_config") or model.generation_config
    compile_config = kwargs.get("compile_config", getattr(generation_config, "compile_config", None))
    if compile_config is None or kwargs.get("disable_compile", generation_config.disable_compile):
        return contextlib.nullcontext()
    on_cpu = model.device.type == "cpu"
    if on_cpu and not have_cpp_compiler():
        logger.warning_once(
            "compile_config was given, but no C++ compiler (g++, clang++ or $CXX) was found, which torch.compile needs "
            "on CPU: generating without compilation (eager)."
        )
        kwargs["disable_compile"] = True
        return contextlib.nullcontext()
    compile_config = type(compile_config)(**compile_config.to_dict())  # the user's object stays as it was
    compile_config._compile_all_devices = True
    kwargs["compile_config"] = compile_config
    if (
        kwargs.get("cache") is None
        and kwargs.get("past_key_values") is None
        and kwargs.get("cache_implementation") is None
    ):
        kwargs["cache"] = CompilableDynamicCache(config=model.config)
    return inductor_cpu_settings() if on_cpu else contextlib.nullcontext()


def inductor_cpu_settings() -> contextlib.AbstractContextManager:
    """Inductor's settings for a CPU decode step. On a machine of few cores, compilation runs in this process: the
    pool of compile workers otherwise keeps competing for the cores with the first few hundred decode steps
    (measured: 25 instead of 250 tok/s on 2 cores). Not the C++ wrapper: in torch 2.13 it gives wrong logits from
    the second decode step on for this model (tests/test_generation.py compares every step's logits with eager)."""
    from torch._inductor import config as inductor_config

    return inductor_config.patch(compile_threads=1) if (os.cpu_count() or 1) <= FEW_CORES else contextlib.nullcontext()


def compiled_decode_step(model):
    """`model`'s forward compiled into one graph, for callers that run their own decode loop (a serving engine):
    call it as the model. The first call at a new batch size compiles (a second one makes the batch size dynamic);
    on CPU, with `inductor_cpu_settings`. Without a C++ compiler on CPU: the eager model, with one warning."""
    on_cpu = model.device.type == "cpu"
    if on_cpu and not have_cpp_compiler():
        logger.warning_once("no C++ compiler (g++, clang++ or $CXX) was found, which torch.compile needs on CPU: eager")
        return model
    compiled = torch.compile(model.__call__, fullgraph=True)
    if not on_cpu:
        return compiled

    def step(*args, **kwargs):
        with inductor_cpu_settings():
            return compiled(*args, **kwargs)

    return step
