"""The generation engine: continuous batching of decode steps for a recurrent-state model, in one thread.

Itera-Lite carries a fixed-size state per sequence (per layer: a conv window and an SSM state) instead of a KV cache
that grows with the text. Every sequence therefore fits the same slot, and a running batch is just those slots
stacked along dim 0 of each cache tensor. Between two decode steps, sequences join (their batch-1 prefill state is
concatenated) and leave (the remaining rows are `index_select`ed): no padding, no recomputation, no waiting for
the longest sequence of a batch.

A new request is prefilled alone (batch 1) into its own state, then decoded together with all active sequences,
one token each per step. The model's rows do not interact, so a greedy completion is the same whether it ran alone
or batched (up to the float rounding of a batched matmul, which does not change an argmax in practice).

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
        joining = [joined for job in jobs if (joined := self._prefill(job)) is not None]
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
        """The queued jobs that fit in the free slots, oldest first; waits while there is nothing to do."""
        with self._cond:
            while not (self._stopping or self._queue or self._active):
                self._cond.wait(IDLE_WAIT_S)
            if self._stopping:
                return None
            free, jobs, now = self.limits.max_batch_size - len(self._active), [], time.monotonic()
            while self._queue:
                job = self._queue[0]
                if job.cancelled or now > job.deadline:
                    self._queue.popleft()
                    self._expire(job)
                    continue
                if job.slots > free:  # first come, first served: a big job is not overtaken by small ones
                    break
                free -= job.slots
                jobs.append(self._queue.popleft())
            return jobs

    def _prefill(self, job: Job) -> tuple[object, list] | None:
        """Runs each prompt alone into its own state and picks every choice's first token: (the job's states, one
        row per choice, and its [(sequence, first token, logprob)]) to join the batch, or None (failed, or scoring
        only)."""
        try:
            seqs, caches = [], []
            for p, ids in enumerate(job.prompts):
                cache, last = self._prefill_prompt(job, p, ids)
                rows = [self._new_sequence(job, p * job.n + i) for i in range(job.n)]
                if job.max_tokens == 0:  # scoring only: nothing to generate, the state is not kept
                    for seq in rows:
                        self._finish(seq, "length", "")
                    continue
                if job.n > 1:  # n copies of the prompt's state, one slot per choice
                    cache.reorder_cache(torch.zeros(job.n, dtype=torch.long, device=self.device))
                tokens, logprobs = self._choose(last[None].expand(job.n, -1), rows)
                caches.append(cache)
                seqs += zip(rows, tokens, logprobs)
        except Exception:
            logger.exception("prefill failed")
            self._fail(job, 500, "internal error during prefill", "server_error")
            return None
        if not caches:
            return None
        return (concat_caches(caches) if len(caches) > 1 else caches[0]), seqs

    def _prefill_prompt(self, job: Job, p: int, ids: list[int]) -> tuple[DynamicCache, torch.Tensor]:
        """One prompt's batch-1 state and (v,) last logits: from the state cache where a prefix of it is there
        (only the rest is run), else from zero; the result goes into the cache for later prompts, with checkpoints
        along the prompt, so that a later prompt that leaves this one anywhere resumes within an interval of it."""
        start, cache, last = (0, None, None) if job.prompt_logprobs else self.state_cache.lookup(ids)
        caching = bool(self.state_cache.max_bytes and not job.prompt_logprobs)
        if caching:
            self.metrics.state_lookup(hit=cache is not None)
        if cache is None:
            cache = self.new_cache()
        read = len(ids) - start
        if start < len(ids):
            if caching and self.limits.state_cache_interval and isinstance(cache, DynamicCache):
                cache.chunk_checkpoints = {}  # the scan records its chunk-boundary states (`_keep_checkpoints`)
            elif caching and self.limits.state_cache_interval:  # another backend: prefill in pieces
                for end in self._interval_ends(start, len(ids)):
                    chunk = torch.tensor([ids[start:end]], device=self.device)
                    out = self.model(chunk, cache=cache, use_cache=True, logits_to_keep=1)
                    cache, start = out.cache, end
                    self.state_cache.put(ids[:end], cache, out.logits[0, -1])
            ids_t = torch.tensor([ids[start:]], device=self.device)
            out = self.model(
                ids_t, cache=cache, use_cache=True, logits_to_keep=0 if job.prompt_logprobs else 1
            )  # logits_to_keep 0: every position's logits
            cache, last = out.cache, out.logits[0, -1]
            if getattr(cache, "chunk_checkpoints", None) is not None:
                self._keep_checkpoints(ids, start, cache)
            if job.prompt_logprobs:
                scored = token_logprobs(out.logits[0, :-1], ids_t[0, 1:], job.logprobs or 0)
                self._send(job, PromptScored(p, [None, *scored]))
            if self.state_cache.max_bytes:
                self.state_cache.put(ids, cache, last)
        self.metrics.count_prompt(read)
        return cache, last

    def _keep_checkpoints(self, ids: list[int], start: int, cache: DynamicCache) -> None:
        """Puts the chunk-boundary states that the mixers recorded during the prefill of `ids[start:]` into the state
        cache, every `state_cache_interval` tokens (rounded up to whole chunks) from `start`: each a copy of the
        final cache with the boundary's conv window and SSM state in place of the last ones."""
        recorded = cache.chunk_checkpoints
        del cache.chunk_checkpoints  # before any copy of the cache, and so that nothing else records into it
        layers = range(len(cache.layers))
        # Nothing to keep where a layer has no mixer, or the prefill was one token (a decode step records nothing).
        if sorted(recorded) != list(layers) or any(recorded[i].keys() != {"conv", "ssm"} for i in layers):
            return
        chunk = self.model.config.chunk_size
        every = -(-self.limits.state_cache_interval // chunk) * chunk
        for j in range(recorded[0]["ssm"].shape[1]):
            if ((j + 1) * chunk) % every:
                continue
            memo = {}  # deepcopy puts these in place of the final state's tensors, and copies the rest
            for i, layer in enumerate(cache.layers):
                memo[id(layer.conv_states[0])] = recorded[i]["conv"][:, j].clone()
                memo[id(layer.recurrent_states[0])] = recorded[i]["ssm"][:, j].clone()
            self.state_cache.put(ids[: start + (j + 1) * chunk], copy.deepcopy(cache, memo), None, owned=True)

    def _interval_ends(self, start: int, length: int) -> range:
        """The multiples of the state interval strictly between `start` and `length` (none if the interval is 0)."""
        interval = self.limits.state_cache_interval
        if not interval:
            return range(0)
        return range((start // interval + 1) * interval, length, interval)

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
