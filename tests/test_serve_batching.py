"""Batched prefill in the engine: fresh prompts that join together share one left-padded forward and give the texts
they give alone; the states it keeps (prompt ends and checkpoints of padded rows) equal the prefixes prefilled alone
and let a later prompt resume; a failing batch fails only the job that fails alone; the prefill budget spreads a
burst over several iterations with decode steps between them.

The engine runs without HTTP here: jobs are submitted while the test holds the engine's lock, so that its thread
takes them all in one iteration, which a burst of HTTP requests cannot promise.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from transformers import DynamicCache

from serve.engine import Delta, Done, Engine, Failed, Job, Limits, PromptScored
from serve.metrics import Metrics
from serve.model import load
from serve.onnx_model import load_onnx
from serve.prefill import MAX_PADDING, Prompt, fresh_groups
from serve.sampling import SamplingParams
from tests import test_serve

model_dir, backend = test_serve.model_dir, test_serve.backend
GREEDY = SamplingParams(temperature=0.0)
# 51, 34, 31, 30, 22, 21, 21, 11, 5 and 2 tokens with the test tokenizer: prefilled together as [51, 34],
# [31, 30, 22, 21, 21], then [11], [5] and [2] alone (each further prompt would pad more than MAX_PADDING).
STORIES = [
    "Once upon a time there was a little cat who liked to play in the sun with a big red ball.",
    "The dog ran to the park and found a big red ball under a tree.",
    "Lily and Tom went to the sea. They saw a boat and a fish.",
    "The little cat ran to the sea and saw a fish under a boat.",
    "Tom found a big red ball in the park.",
    "Once upon a time there was a dog.",
    "Lily saw a little fish in the sun.",
    "They saw a big tree",
    "The sun",
    "a",
]


@dataclass
class Events:
    """A job's sink: the events in order, and a flag set by the last one."""

    received: list = field(default_factory=list)
    ended: threading.Event = field(default_factory=threading.Event)

    def __call__(self, event) -> None:
        self.received.append(event)
        if isinstance(event, (Done, Failed)):
            self.ended.set()

    def text(self) -> str:
        return "".join(event.text for event in self.received if isinstance(event, Delta) and event.index == 0)


def job(ids: list[int] | list[list[int]], **fields) -> Job:
    prompts = ids if isinstance(ids[0], list) else [ids]
    return Job(prompts, Events(), **({"max_tokens": 12, "sampling": GREEDY, "ignore_eos": True} | fields))


def run_together(engine: Engine, jobs: list[Job]) -> list[Job]:
    """Submits the jobs at once (the engine's thread waits for its lock) and waits for each to end."""
    with engine._cond:  # a Condition's lock is reentrant: `submit` takes it again
        for j in jobs:
            engine.submit(j)
    for j in jobs:
        assert j.sink.ended.wait(60), "the engine did not finish the job"
    return jobs


def run_alone(engine: Engine, jobs: list[Job]) -> list[Job]:
    for j in jobs:
        run_together(engine, [j])
    return jobs


def outcome(j: Job) -> list:
    """What a client sees of a job: its events, with the tokens of its logprobs but not their values (a batched
    matmul rounds differently: `logprob_values`)."""
    seen = []
    for event in j.sink.received:
        if isinstance(event, PromptScored):
            seen.append(("scored", event.prompt, [lp and (lp.token, [t for t, _ in lp.top]) for lp in event.logprobs]))
        elif isinstance(event, Delta):
            seen.append(
                ("delta", event.index, event.text, [(lp.token, [t for t, _ in lp.top]) for lp in event.logprobs])
            )
        else:
            seen.append(event)
    return seen


def logprob_values(j: Job) -> list[float]:
    scored = [lp for e in j.sink.received if isinstance(e, (PromptScored, Delta)) for lp in e.logprobs if lp]
    return [lp.logprob for lp in scored] + [value for lp in scored for _, value in lp.top]


def prefill_batches(engine: Engine) -> tuple[int, int]:
    """(prefill forwards so far, of which with one prompt), from the engine's Prometheus text."""
    text = engine.metrics.render()
    ones = re.search(r'^itera_prefill_batch_size_bucket\{le="1"\} (\d+)$', text, re.M)
    total = re.search(r"^itera_prefill_batch_size_count (\d+)$", text, re.M)
    return int(total.group(1)), int(ones.group(1))


@pytest.fixture(scope="module")
def loaded(backend):
    return load_onnx(backend.folder) if backend.name == "onnx" else load(backend.folder)


@pytest.fixture
def engines(loaded):
    """Starts engines over the module's model; stops them after the test."""
    started = []

    def start(metrics: Metrics | None = None, **limits) -> Engine:
        engine = Engine(*loaded, Limits(**({"max_prompt_tokens": 128} | limits)), metrics=metrics)
        engine.start()
        started.append(engine)
        return engine

    yield start
    for engine in started:
        engine.stop()


@pytest.fixture(scope="module")
def prompts(loaded) -> list[list[int]]:
    tokenizer = loaded[1]
    return [tokenizer.encode(story) for story in STORIES]


def test_fresh_prompts_submitted_together_share_a_prefill_and_give_what_they_give_alone(engines, prompts):
    """Greedy texts, seeded n=2 choices, a job of two prompts, a scoring-only and an echo-scoring job: the events of
    each equal those of the same job run alone on a server without the prefix cache."""

    def jobs() -> list[Job]:
        greedy = [job(ids) for ids in prompts]
        sampled = job(prompts[1], n=2, seed=3, sampling=SamplingParams(1.0, 0.9, 20), ignore_eos=False)
        two = job([prompts[2], prompts[4]], logprobs=2)
        scored = job(prompts[0], max_tokens=0, logprobs=1, prompt_logprobs=True)
        return [*greedy, sampled, two, scored, job(prompts[3], max_tokens=0)]

    alone = run_alone(engines(state_cache_bytes=0), jobs())
    engine = engines()
    together = run_together(engine, jobs())
    assert [outcome(j) for j in together] == [outcome(j) for j in alone]
    for a, b in zip(together, alone):
        assert logprob_values(a) == pytest.approx(logprob_values(b), abs=1e-4)
    assert len({j.sink.text() for j in alone[: len(prompts)]}) > len(prompts) // 2  # not one repeated token
    forwards, alone_forwards = prefill_batches(engine)
    assert forwards - alone_forwards >= 2, "the fresh prompts were not batched"
    assert forwards <= sum(len(j.prompts) for j in together) // 2


def state_arrays(cache) -> list[np.ndarray]:
    if isinstance(cache, DynamicCache):
        return [t.numpy() for layer in cache.layers for t in (layer.conv_states[0], layer.recurrent_states[0])]
    return cache.arrays


def test_the_states_a_batched_prefill_keeps_are_those_of_their_prefixes_alone(engines, prompts):
    """Every prompt end and every checkpoint (8 tokens apart on the padded batch's grid, so at other lengths in a
    padded row) holds the state and logits of its prefix prefilled alone from zero."""
    engine = engines(state_cache_interval=8)
    run_together(engine, [job(ids) for ids in prompts])
    held, whole = engine.state_cache.entries, {tuple(ids) for ids in prompts}
    assert whole <= held.keys()
    assert any(len(key) % 8 for key in held.keys() - whole)  # a padded row's checkpoint
    model = engine.model
    with torch.inference_mode():
        for key, entry in held.items():
            out = model(torch.tensor([key]), cache=engine.new_cache(), use_cache=True, logits_to_keep=1)
            for kept, alone in zip(state_arrays(entry.cache), state_arrays(out.cache)):
                np.testing.assert_allclose(kept, alone, rtol=1e-4, atol=1e-4 * np.abs(alone).max())
            if entry.logits is not None:
                torch.testing.assert_close(entry.logits, out.logits[0, -1], rtol=1e-4, atol=1e-3)


def test_a_prompt_that_branches_off_a_padded_row_resumes_from_its_checkpoint(engines, prompts):
    """A prompt that leaves a batched prompt after its first words resumes from the checkpoint of that row (at a
    length off the 8-token grid: the row was padded), reads only the rest, and gives the text it gives cold."""
    engine = engines(state_cache_interval=8)
    run_together(engine, [job(ids) for ids in prompts])
    story = prompts[1]  # padded: the first story is longer
    branch = story[:14] + prompts[2][3:9]
    resumed = engine.state_cache.cached_length(branch)
    assert 0 < resumed <= 14 and resumed % 8, "no checkpoint of the padded row on the branch's path"
    hits, read = engine.state_cache.hits, engine.metrics.prompt_tokens.values[()]
    [warm] = run_together(engine, [job(branch)])
    assert engine.state_cache.hits == hits + 1
    assert engine.metrics.prompt_tokens.values[()] - read == len(branch) - resumed
    [cold] = run_alone(engines(state_cache_bytes=0), [job(branch)])
    assert outcome(warm) == outcome(cold)


def test_a_batch_that_fails_is_prefilled_again_row_by_row_and_fails_only_the_bad_job(engines, prompts):
    engine = engines(state_cache_bytes=0)
    model, forward = engine.model, engine.model.forward
    bad_token = prompts[0][5]

    def fails_on_the_bad_prompt(input_ids, **kwargs):
        if input_ids.shape[1] > 1 and bool((input_ids == bad_token).any()):
            raise RuntimeError("injected failure")
        return forward(input_ids, **kwargs)

    good = [ids for ids in prompts[1:] if bad_token not in ids]
    expected = run_alone(engine, [job(ids) for ids in good])
    model.forward = fails_on_the_bad_prompt
    try:
        bad, *others = run_together(engine, [job(prompts[0]), *(job(ids) for ids in good)])
    finally:
        del model.forward
    assert isinstance(bad.sink.received[-1], Failed) and bad.sink.received[-1].status == 500
    assert [outcome(j) for j in others] == [outcome(j) for j in expected]


class Recorded(Metrics):
    """The metrics, and the batch size of every prefill forward and decode step in order."""

    def __init__(self):
        super().__init__()
        self.prefills, self.steps = [], []

    def prefill_batch(self, prompts: int) -> None:
        self.prefills.append(prompts)
        super().prefill_batch(prompts)

    def decode_step(self, batch: int) -> None:
        self.steps.append(batch)
        super().decode_step(batch)


def test_the_prefill_budget_spreads_a_burst_over_iterations_with_decode_steps_between(engines, prompts):
    """A budget of 45 prompt tokens per iteration: the 51-token prompt runs first anyway (alone) and decodes a token,
    then the 22- and 21-token ones join (one forward) and decode with it, then the last 21-token one. The texts
    are those of the prompts alone."""
    order = [prompts[0], prompts[4], prompts[5], prompts[6]]
    assert [len(ids) for ids in order] == [51, 22, 21, 21]
    alone = run_alone(engines(state_cache_bytes=0), [job(ids) for ids in order])
    metrics = Recorded()
    engine = engines(metrics, max_prefill_tokens=45, state_cache_bytes=0)
    together = run_together(engine, [job(ids) for ids in order])
    assert [outcome(j) for j in together] == [outcome(j) for j in alone]
    assert metrics.prefills == [1, 2, 1]
    assert metrics.steps[:3] == [1, 3, 4]


def lengths(groups: list[list[Prompt]]) -> list[list[int]]:
    return [[len(p.ids) for p in group] for group in groups]


def test_fresh_groups_bound_the_padding_and_the_tokens_of_a_forward():
    prompts = [Prompt(job([1] * n), 0, [1] * n) for n in (10, 40, 9, 100, 36, 1, 8, 33)]
    groups = fresh_groups(prompts, max_tokens=150)
    assert lengths(groups) == [[100], [40, 36, 33], [10, 9, 8], [1]]
    for group in groups:
        width, real = len(group[0].ids), sum(len(p.ids) for p in group)
        assert width * len(group) <= max((1 + MAX_PADDING) * real, width) and width * len(group) <= max(150, width)
    assert lengths(fresh_groups(prompts, max_tokens=80)) == [[100], [40, 36], [33], [10, 9, 8], [1]]
