"""The generation engine: continuous batching of decode steps for a recurrent-state model, in one thread.

Itera-Lite carries a fixed-size state per sequence (per layer: a conv window and an SSM state) instead of a KV cache
that grows with the text. Every sequence therefore fits the same slot, and a running batch is just those slots
stacked along dim 0 of each cache tensor. Between two decode steps, sequences join (their batch-1 prefill state is
concatenated) and leave (the remaining rows are `index_select`ed): no padding, no recomputation, no waiting for
the longest sequence of a batch.

Each iteration admits queued requests up to a budget of prompt tokens to prefill (`Limits.max_prefill_tokens`, at
least one request), prefills them (`serve.prefill`: the fresh prompts together, left-padded, in groups of similar
length; a prompt that resumes from the prefix cache alone, from its own state), and then runs one decode step of
all active sequences, one token each, before it admits more: a running stream waits for at most one budget of
prefill per token. The model's rows do not interact, so a greedy completion is the same whether it ran alone or
batched (up to the float rounding of a batched matmul, which does not change an argmax in practice).

The engine thread owns the model, the caches and its own copy of the tokenizer; the web app talks to it through
`submit`/`cancel` and receives events through each job's `sink`, which must be thread-safe.
"""

from __future__ import annotations

import copy
import logging
import math
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from modeling_itera.generation import compiled_decode_step

from .metrics import Metrics
from .prefill import Prefiller, Prompt, fresh_groups
from .sampling import Penalties, SamplingParams, TokenLogprob, adjust_logits, next_tokens, token_logprobs
from .state_cache import StateCache
from .text import TextStream

logger = logging.getLogger(__name__)

IDLE_WAIT_S = 0.5  # how often an idle engine wakes up to notice a stop request it might have missed


class QueueFull(Exception):
    """The waiting queue holds `queue_size` jobs already: the caller should answer 429."""


class EngineStopped(Exception):
    """The engine is not running (stopped, or not started yet): the caller should answer 503."""


@dataclass(frozen=True)
class Limits:
    """What protects the server: batch slots, lengths, the waiting queue and the time a request may take."""

    max_batch_size: int = 32
    max_prompt_tokens: int = 2048
    max_new_tokens: int = 512
    queue_size: int = 64
    request_timeout: float = 120.0
    state_cache_bytes: int = 64 << 20  # prefix cache of prompt states (0: off); ~0.6 MB each, bundled model
    # Also keep a checkpoint every this many tokens of a prompt (0: prompt ends only). PyTorch takes them from the
    # chunked scan's chunk boundaries (free; the interval is rounded up to whole chunks); ONNX prefills in pieces.
    state_cache_interval: int = 64
    # Prompt tokens to prefill per iteration, before the next decode step (a longer prompt still runs, alone): the
    # longest a running stream waits between two tokens while new requests join.
    max_prefill_tokens: int = 2048


# Events a job's sink receives, in order: PromptScored per prompt (if asked), Delta*, Finished per choice, then Done;
# or a single Failed at any point.
@dataclass(frozen=True)
class PromptScored:
    prompt: int
    logprobs: list[TokenLogprob | None]  # one per prompt token; None for the first, which nothing predicts


@dataclass(frozen=True)
class Delta:
    index: int
    text: str
    logprobs: tuple[TokenLogprob, ...] = ()  # the tokens whose text this delta completes (if the job asked)


@dataclass(frozen=True)
class Finished:
    index: int
    reason: str  # "stop" (EOS or a stop string) or "length" (max_tokens)
    tokens: int


@dataclass(frozen=True)
class Done:
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    status: int
    message: str
    kind: str


@dataclass(eq=False)
class Job:
    """One completion request: `n` choices for each prompt (token ids), all admitted to the batch together."""

    prompts: list[list[int]]
    sink: Callable[[object], None]
    max_tokens: int = 16
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: list[str] = field(default_factory=list)
    n: int = 1
    seed: int | None = None
    ignore_eos: bool = False
    logprobs: int | None = None  # top tokens per generated token (0-5); None: no logprobs
    prompt_logprobs: bool = False  # score the prompt's own tokens (echo with logprobs)
    penalties: Penalties = field(default_factory=Penalties)
    arrived: float = field(default_factory=time.monotonic)
    deadline: float = math.inf
    cancelled: bool = False
    ended: bool = False
    remaining: int = 0
    completion_tokens: int = 0
    first_token_at: float | None = None

    @property
    def slots(self) -> int:
        return len(self.prompts) * self.n


@dataclass(eq=False)
class Sequence:
    """One choice of one job: its slot in the batch is its row in the engine's cache."""

    job: Job
    index: int
    text: TextStream
    generator: torch.Generator
    last: int = 0
    generated: int = 0
    done: bool = False
    counts: Counter = field(default_factory=Counter)  # generated tokens, for the frequency/presence penalties
    pending: list[TokenLogprob] = field(default_factory=list)  # logprobs not yet sent with a delta


def concat_caches(caches: list) -> DynamicCache:
    """Stacks the per-sequence states of several recurrent caches into the first one, along the batch dim (another
    backend's state type stacks itself: `concatenate`)."""
    base = caches[0]
    if not isinstance(base, DynamicCache):
        return type(base).concatenate(caches)
    for i, layer in enumerate(base.layers):
        for name in ("conv_states", "recurrent_states"):
            held = getattr(layer, name)
            for k, state in held.items():
                if state is not None:
                    held[k] = torch.cat([getattr(c.layers[i], name)[k] for c in caches])
    return base


class Engine:
    """Runs every generation of the server in one background thread.

    Args:
        model: an Itera-Lite causal LM in eval mode (any model whose cache layers are all recurrent), or another
            backend's model with the same call and a `new_cache()` (`serve.onnx_model.OnnxLM`).
        tokenizer: decodes generated ids; the engine keeps its own copy, used from its thread only.
        limits: batch slots, queue size and request timeout (lengths are checked by the web app).
        compile: run the batched decode step compiled (`torch.compile`, one graph); prefill stays eager.
    """

    def __init__(self, model, tokenizer, limits: Limits, metrics: Metrics | None = None, compile: bool = False):
        torch_model = isinstance(model, torch.nn.Module)
        if torch_model and not all(DynamicCache(config=model.config).is_linear):
            raise ValueError("the engine batches fixed-size recurrent states: every cache layer must be linear")
        if compile and not torch_model:
            raise ValueError("compile applies to the PyTorch backend only")
        self.model, self.limits = model, limits
        self.new_cache = model.new_cache if not torch_model else lambda: DynamicCache(config=model.config)
        self._step = compiled_decode_step(model) if compile else model
        self.tokenizer = copy.deepcopy(tokenizer)
        self.metrics = metrics or Metrics()
        eos = model.generation_config.eos_token_id
        eos = model.config.eos_token_id if eos is None else eos
        self.eos = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.device = next(model.parameters()).device if torch_model else model.device
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._active: list[Sequence] = []
        self._cache: DynamicCache | None = None
        self.state_cache = StateCache(limits.state_cache_bytes)
        self.prefiller = Prefiller(model, self.new_cache, self.state_cache, limits.state_cache_interval)
        self._stopping = False
        self._thread: threading.Thread | None = None

    # ---- the web app's side -------------------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def active(self) -> int:
        return sum(not seq.done for seq in self._active)  # a finished sequence leaves at the end of the step

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="itera-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        """Queues a job. Raises `QueueFull` or `EngineStopped` instead of waiting."""
        with self._cond:
            if not self.alive:
                raise EngineStopped("the generation engine is not running")
            if len(self._queue) >= self.limits.queue_size:
                raise QueueFull(f"the server is busy: {len(self._queue)} requests are already waiting")
            job.deadline = job.arrived + self.limits.request_timeout
            job.remaining = job.slots
            self._queue.append(job)
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        """Drops a job (client gone); the engine frees its slots before its next step."""
        job.cancelled = True

    # ---- the engine thread --------------------------------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while (jobs := self._take_jobs()) is not None:
                try:
                    self._iteration(jobs)
                except Exception:  # a bug or an out-of-memory must not kill the server: fail the batch, go on
                    logger.exception("generation failed; failing the %d active sequences", len(self._active))
                    for job in jobs + [seq.job for seq in self._active]:
                        self._fail(job, 500, "internal error during generation", "server_error")
                    self._active, self._cache = [], None
        self._shutdown()

    def _iteration(self, jobs: list[Job]) -> None:
        """New jobs join the batch, all in one concatenation of the states (each join copies the whole batch's
        state, so jobs that arrive together join together); then one decode step for every active sequence."""
        prompts = self._prefill(jobs)
        joining = [joined for job in jobs if (joined := self._join(job, prompts)) is not None]
        if joining:
            caches = [cache for cache, _ in joining]
            self._cache = concat_caches(([self._cache] if self._active else []) + caches)
            seqs = [seq for _, job_seqs in joining for seq in job_seqs]
            self._active += [seq for seq, _, _ in seqs]
            for seq, token, logprob in seqs:
                self._advance(seq, token, logprob)
            self.metrics.tokens(len(seqs))
        self._retire()
        if self._active:
            self._decode_step()
            self._retire()

    def _take_jobs(self) -> list[Job] | None:
        """The queued jobs that fit in the free slots and the prefill budget (at least one job), oldest first;
        waits while there is nothing to do."""
        with self._cond:
            while not (self._stopping or self._queue or self._active):
                self._cond.wait(IDLE_WAIT_S)
            if self._stopping:
                return None
            free, jobs, now = self.limits.max_batch_size - len(self._active), [], time.monotonic()
            budget = self.limits.max_prefill_tokens
            while self._queue:
                job = self._queue[0]
                if job.cancelled or now > job.deadline:
                    self._queue.popleft()
                    self._expire(job)
                    continue
                cost = self._prefill_cost(job)
                # First come, first served: a job that does not fit is not overtaken by smaller ones. Past the budget,
                # the decode step of the running streams comes first; the first job runs whatever its length.
                if job.slots > free or (jobs and cost > budget):
                    break
                free, budget = free - job.slots, budget - cost
                jobs.append(self._queue.popleft())
            return jobs

    def _prefill_cost(self, job: Job) -> int:
        """The prompt tokens that `job` will prefill: those after the prefix each prompt resumes from."""
        if job.prompt_logprobs:  # scored from the start, no lookup
            return sum(len(ids) for ids in job.prompts)
        return sum(len(ids) - self.state_cache.cached_length(ids) for ids in job.prompts)

    def _prefill(self, jobs: list[Job]) -> dict[Job, list[Prompt]]:
        """Every prompt of `jobs` into a batch-1 state with its last logits: resumed from the state cache where a
        prefix of it is there, else from zero, the fresh ones batched. The prompts of each job that did not fail."""
        prompts = [self._resume(job, p, ids) for job in jobs for p, ids in enumerate(job.prompts)]
        alone = [[prompt] for prompt in prompts if not prompt.batchable and not prompt.prefilled]
        fresh = fresh_groups([prompt for prompt in prompts if prompt.batchable])
        for group in alone + fresh:
            self._run_group(group)
        by_job: dict[Job, list[Prompt]] = {}
        for prompt in prompts:
            if not prompt.job.ended:
                by_job.setdefault(prompt.job, []).append(prompt)
        return by_job

    def _resume(self, job: Job, p: int, ids: list[int]) -> Prompt:
        """Prompt p of `job`, with the longest prefix of it that the state cache holds (a whole prompt: nothing left
        to run). A job that scores its prompt needs every position's logits: it starts from zero."""
        start, cache, last = (0, None, None) if job.prompt_logprobs else self.state_cache.lookup(ids)
        if self.state_cache.max_bytes and not job.prompt_logprobs:
            self.metrics.state_lookup(hit=cache is not None)
        prompt = Prompt(job, p, ids, start, cache)
        if start == len(ids):
            prompt.last = last
        return prompt

    def _run_group(self, group: list[Prompt]) -> None:
        """Prefills a group of prompts (`Prefiller.run`). Where a batch fails, its prompts are run again one by
        one, so that only the job whose prompt fails alone fails."""
        group = [prompt for prompt in group if not prompt.job.ended]
        if not group:
            return
        try:
            logits = self.prefiller.run(group)
        except Exception:
            if len(group) > 1:
                logger.exception("batched prefill failed; prefilling its %d prompts one by one", len(group))
                for prompt in group:
                    self._run_group([prompt])
            else:
                logger.exception("prefill failed")
                self._fail(group[0].job, 500, "internal error during prefill", "server_error")
            return
        self.metrics.prefill_batch(len(group))
        self.metrics.count_prompt(sum(len(prompt.ids) - prompt.start for prompt in group))
        if group[0].job.prompt_logprobs:  # alone, from the start: every position's logits
            prompt = group[0]
            ids = torch.tensor(prompt.ids[1:], device=logits.device)
            scored = token_logprobs(logits[0, :-1], ids, prompt.job.logprobs or 0)
            self._send(prompt.job, PromptScored(prompt.index, [None, *scored]))

    def _join(self, job: Job, prompts: dict[Job, list[Prompt]]) -> tuple[object, list] | None:
        """Picks every choice's first token from its prompt's state: (the job's states, one row per choice, and its
        [(sequence, first token, logprob)]) to join the batch, or None (failed, or scoring only)."""
        if job not in prompts:
            return None
        try:
            seqs, caches = [], []
            for prompt in prompts[job]:
                rows = [self._new_sequence(job, prompt.index * job.n + i) for i in range(job.n)]
                if job.max_tokens == 0:  # scoring only: nothing to generate, the state is not kept
                    for seq in rows:
                        self._finish(seq, "length", "")
                    continue
                cache = prompt.cache
                if job.n > 1:  # n copies of the prompt's state, one slot per choice
                    cache.reorder_cache(torch.zeros(job.n, dtype=torch.long, device=self.device))
                tokens, logprobs = self._choose(prompt.last[None].expand(job.n, -1), rows)
                caches.append(cache)
                seqs += zip(rows, tokens, logprobs)
        except Exception:
            logger.exception("prefill failed")
            self._fail(job, 500, "internal error during prefill", "server_error")
            return None
        if not caches:
            return None
        return (concat_caches(caches) if len(caches) > 1 else caches[0]), seqs

    def _choose(self, logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[TokenLogprob | None]]:
        """Each row's next token (after its bias and penalties) and, where its job asks, the token's logprob
        under the model. logits: (b, v), one row per sequence."""
        adjusted = adjust_logits(logits, [s.job.penalties for s in seqs], [s.counts for s in seqs])
        tokens = next_tokens(adjusted, [s.job.sampling for s in seqs], [s.generator for s in seqs])
        logprobs: list[TokenLogprob | None] = [None] * len(seqs)
        rows = [i for i, s in enumerate(seqs) if s.job.logprobs is not None]
        if rows:
            k = max(seqs[i].job.logprobs for i in rows)
            chosen = torch.tensor([tokens[i] for i in rows], device=logits.device)
            for i, lp in zip(rows, token_logprobs(logits[rows], chosen, k)):
                logprobs[i] = TokenLogprob(lp.token, lp.logprob, lp.top[: seqs[i].job.logprobs])
        return tokens, logprobs

    def _new_sequence(self, job: Job, index: int) -> Sequence:
        generator = torch.Generator(device=self.device)
        if job.seed is None:
            generator.seed()
        else:  # each choice its own stream: n seeded choices differ, and each is reproducible on its own
            generator.manual_seed(job.seed + index)
        return Sequence(job, index, TextStream(self.tokenizer, job.stop), generator)

    def _decode_step(self) -> None:
        """One token for every active sequence, in one forward of the whole batch."""
        tokens = torch.tensor([[seq.last] for seq in self._active], device=self.device)  # (b, 1)
        out = self._step(input_ids=tokens, cache=self._cache, use_cache=True, logits_to_keep=1)
        self._cache = out.cache
        self.metrics.decode_step(len(self._active))
        chosen, logprobs = self._choose(out.logits[:, -1], self._active)
        for seq, token, logprob in zip(self._active, chosen, logprobs):
            self._advance(seq, token, logprob)
        self.metrics.tokens(len(chosen))

    def _advance(self, seq: Sequence, token: int, logprob: TokenLogprob | None = None) -> None:
        """Takes one generated token: sends the text it completes, and ends the choice on EOS, stop or length."""
        job = seq.job
        seq.generated += 1
        seq.counts[token] += 1
        if job.first_token_at is None:
            job.first_token_at = time.monotonic()
            self.metrics.first_token_after(job.first_token_at - job.arrived)
        if logprob is not None:  # EOS too (as OpenAI and vLLM list it): lm-eval drops the last entry as generated
            seq.pending.append(logprob)
        if token in self.eos and not job.ignore_eos:
            return self._finish(seq, "stop", seq.text.finish())
        seq.last = token
        delta = seq.text.add(token)
        if seq.text.stopped:
            return self._finish(seq, "stop", delta)
        if seq.generated >= job.max_tokens:
            return self._finish(seq, "length", delta + seq.text.finish())
        if delta:
            self._send(job, self._delta(seq, delta))

    def _delta(self, seq: Sequence, text: str) -> Delta:
        delta, seq.pending = Delta(seq.index, text, tuple(seq.pending)), []
        return delta

    def _finish(self, seq: Sequence, reason: str, delta: str) -> None:
        job, seq.done = seq.job, True
        if delta or seq.pending:
            self._send(job, self._delta(seq, delta))
        self._send(job, Finished(seq.index, reason, seq.generated))
        job.remaining -= 1
        job.completion_tokens += seq.generated
        if job.remaining == 0 and not job.ended:
            job.ended = True
            self._send(job, Done(sum(len(ids) for ids in job.prompts), job.completion_tokens))
            self.metrics.completion("ok", time.monotonic() - job.arrived)

    def _retire(self) -> None:
        """Frees the slots of finished, cancelled and timed-out sequences: the other rows of the cache stay."""
        now = time.monotonic()
        for seq in self._active:
            if not seq.done and (seq.job.cancelled or now > seq.job.deadline):
                self._expire(seq.job)
        keep = [i for i, seq in enumerate(self._active) if not (seq.done or seq.job.ended)]
        if len(keep) == len(self._active):
            return
        if keep:
            self._cache.reorder_cache(torch.tensor(keep, device=self.device))
        else:
            self._cache = None
        self._active = [self._active[i] for i in keep]

    def _expire(self, job: Job) -> None:
        if job.cancelled:  # 499: nginx's "client closed request"; the handler waiting on it returns at once
            self._fail(job, 499, "the client closed the request", "cancelled")
        else:
            timeout = self.limits.request_timeout
            self._fail(job, 504, f"the request took longer than the server's timeout of {timeout:g} s", "timeout")

    def _fail(self, job: Job, status: int, message: str, kind: str) -> None:
        if not job.ended:
            job.ended = True
            self._send(job, Failed(status, message, kind))
            self.metrics.completion(kind)

    def _send(self, job: Job, event: object) -> None:
        try:
            job.sink(event)
        except Exception:  # the client's event loop is gone: nobody is listening any more
            job.cancelled = True

    def _shutdown(self) -> None:
        with self._cond:
            pending, self._queue = list(self._queue), deque()
        for job in pending + [seq.job for seq in self._active]:
            self._fail(job, 503, "the server is shutting down", "unavailable")
        self._active, self._cache = [], None
