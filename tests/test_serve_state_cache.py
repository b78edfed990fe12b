"""The prefix cache of prompt-end states: a prompt that extends a cached one prefills only its new tokens, and
gives the same greedy tokens as from zero (alone and under concurrency); eviction keeps the byte budget; prompts
that differ inside the prefix never share a state."""

from __future__ import annotations

import re
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from serve.state_cache import StateCache, state_bytes
from tests import test_serve
from tests.test_serve import greedy

model_dir, backend = test_serve.model_dir, test_serve.backend
LIMITS = dict(max_batch_size=8, max_prompt_tokens=64, max_new_tokens=48, queue_size=16, request_timeout=60)
STORY = "Once upon a time there was a little cat who liked to play"
PROMPTS = [STORY, STORY + " in the sun.", STORY + " with a ball.", "The dog ran", "The dog ran to the park"]


@pytest.fixture(scope="module")
def cold_url(backend):
    with test_serve.start(backend, state_cache_bytes=0, **LIMITS) as server:
        yield server.url


@pytest.fixture(scope="module")
def warm(backend):
    with test_serve.start(backend, **LIMITS) as server:
        yield server


def lookups(url: str) -> dict[str, int]:
    text = httpx.get(f"{url}/metrics").text
    return {k: int(v) for k, v in re.findall(r'^itera_state_cache_lookups_total\{outcome="(\w+)"\} (\d+)$', text, re.M)}


def test_prompts_that_extend_cached_ones_give_the_same_greedy_text(cold_url, warm):
    expected = [greedy(cold_url, p) for p in PROMPTS]
    assert [greedy(warm.url, p) for p in PROMPTS] == expected  # the 2nd, 3rd and 5th extend a cached prompt
    assert lookups(warm.url)["hit"] >= 3
    assert [greedy(warm.url, p) for p in PROMPTS] == expected  # now each prompt itself is cached
    barrier = threading.Barrier(len(PROMPTS))

    def together(prompt):
        barrier.wait()
        return greedy(warm.url, prompt + " and")

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        assert list(pool.map(together, PROMPTS)) == [greedy(cold_url, p + " and") for p in PROMPTS]
    text = httpx.get(f"{warm.url}/metrics").text
    assert re.search(r"^itera_state_cache_bytes [1-9]", text, re.M)


def tiny_state(engine, ids: list[int]) -> tuple[object, torch.Tensor]:
    """The backend's batch-1 state after `ids` (a `DynamicCache`, or the ONNX backend's arrays) and its logits."""
    with torch.inference_mode():
        out = engine.model(torch.tensor([ids]), cache=engine.new_cache(), use_cache=True, logits_to_keep=1)
    return out.cache, out.logits[0, -1]


def test_eviction_keeps_the_budget_and_a_different_prefix_shares_nothing(warm):
    engine = warm.app.state.engine
    one = state_bytes(tiny_state(engine, [1, 5])[0]) + engine.model.config.vocab_size * 4
    cache = StateCache(max_bytes=2 * one)
    for ids in ([1, 5], [1, 6], [1, 7]):
        cache.put(ids, *tiny_state(engine, ids))
    assert cache.bytes <= 2 * one and list(cache.entries) == [(1, 6), (1, 7)]  # the oldest went first
    assert cache.lookup([1, 5, 9])[0] == 0  # evicted
    length, state, logits = cache.lookup([1, 7, 9, 9])
    assert length == 2 and state is not cache.entries[(1, 7)].cache  # a copy: decoding cannot touch the entry
    torch.testing.assert_close(logits, tiny_state(engine, [1, 7])[1])
    assert cache.lookup([1, 8, 7])[0] == 0 and cache.lookup([2, 7])[0] == 0  # differs inside the prefix
    assert cache.lookup([1])[0] == 0  # shorter than every entry


def test_a_prompt_that_shares_only_the_beginning_of_a_long_one_resumes_from_an_interval_state(cold_url, backend):
    """States every 8 tokens of a long prompt: another prompt that leaves it after its first words resumes from the
    last of those states inside the shared words, not from zero."""
    long_story = STORY + " in the park."
    other = STORY[:30] + " dog ran."  # the same first words (> 8 tokens), then its own
    engine_limits = {**LIMITS, "state_cache_interval": 8}
    with test_serve.start(backend, **engine_limits) as server:
        engine = server.app.state.engine
        first = greedy(server.url, long_story)
        held = sorted(len(k) for k in engine.state_cache.entries)
        assert len(held) > 2 and held[:-1] == list(range(8, held[-1], 8))  # every 8 tokens, then the prompt's end
        before = lookups(server.url).get("hit", 0)
        assert greedy(server.url, other) == greedy(cold_url, other)
        assert lookups(server.url).get("hit", 0) == before + 1
    assert first == greedy(cold_url, long_story)
