"""The prefix cache of prompt-end states: a prompt that extends a cached one prefills only its new tokens, and
gives the same greedy tokens as from zero (alone and under concurrency); eviction keeps the byte budget; prompts
that differ inside the prefix never share a state."""

from __future__ import annotations

import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from serve.state_cache import KEY_BYTES_PER_TOKEN, StateCache, state_bytes
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
    one = state_bytes(tiny_state(engine, [1, 5])[0]) + engine.model.config.vocab_size * 4 + KEY_BYTES_PER_TOKEN * 2
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


def nodes(cache: StateCache) -> int:
    stack, count = [cache.root], 0
    while stack:
        node = stack.pop()
        count += 1
        stack += node.children.values()
    return count


def test_the_radix_tree_finds_the_deepest_entry_and_prunes_what_eviction_leaves(warm):
    engine = warm.app.state.engine
    state, logits = tiny_state(engine, [1, 5])
    one = state_bytes(state) + logits.nbytes + KEY_BYTES_PER_TOKEN * 6
    cache = StateCache(max_bytes=4 * one)
    cache.put([1, 5, 6, 7, 8, 9], state, logits)
    cache.put([1, 5, 6], state, None)  # a checkpoint inside the first: splits its edge
    cache.put([1, 5, 2, 2], state, logits)  # branches off at the third token
    assert nodes(cache) == 5  # root, [1 5] (branching), [6], [7 8 9], [2 2]
    assert cache.lookup([1, 5, 6, 7, 8, 9, 4])[0] == 6
    assert cache.lookup([1, 5, 6, 7, 3])[0] == 3  # leaves inside an edge: the checkpoint before
    assert cache.lookup([1, 5, 6])[0] == 0  # a checkpoint has no logits: it cannot end a prompt
    assert cache.lookup([1, 5, 2, 2])[0] == 4 and cache.lookup([1, 5])[0] == 0
    cache.put([1, 5, 6], state, logits)  # a prompt's end replaces the checkpoint at the same prefix
    assert cache.lookup([1, 5, 6])[0] == 3 and len(cache.entries) == 3
    for key in list(cache.entries):
        cache._remove(key)
    assert nodes(cache) == 1 and cache.bytes == 0


def prompt_tokens(url: str) -> int:
    return int(re.search(r"^itera_prompt_tokens_total (\d+)", httpx.get(f"{url}/metrics").text, re.M).group(1))


def test_a_prompt_that_leaves_a_cached_one_resumes_within_one_chunk(cold_url, backend):
    """Checkpoints on the chunk grid (8 tokens here): a second ending of a long story reads again only what lies
    after the last boundary before the two part, and gives the text that it gives without the cache."""
    story = "Once upon a time there was a little cat who liked to play. The dog ran to the park and found"
    first, second = story + " a big red ball.", story + " the sun under a tree."
    with test_serve.start(backend, **{**LIMITS, "state_cache_interval": 8}) as server:
        tokenizer = server.app.state.engine.tokenizer
        shared = len(os.path.commonprefix([tokenizer.encode(first), tokenizer.encode(second)]))
        assert shared > 16
        assert greedy(server.url, first) == greedy(cold_url, first)
        before = prompt_tokens(server.url)
        assert greedy(server.url, second) == greedy(cold_url, second)
        read = prompt_tokens(server.url) - before
    assert read == len(tokenizer.encode(second)) - shared // 8 * 8
