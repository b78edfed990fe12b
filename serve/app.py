"""The HTTP API: OpenAI-style `POST /v1/completions` and `/v1/chat/completions` (plain and server-sent events),
`GET /v1/models`, vLLM-style `POST /tokenize` and `/detokenize`, `GET /health` and `GET /metrics`, in front of
one `Engine`.

Handlers never run the model: they validate, tokenize, hand a `Job` to the engine thread and await its events on
an asyncio queue, so many requests wait at once without blocking the event loop. Every error is a JSON body in
OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, so clients show the reason.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections import defaultdict
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from .chat import ChatChoices, chat_prompt
from .engine import Delta, Done, Engine, EngineStopped, Failed, Finished, Job, Limits, PromptScored, QueueFull
from .logprobs import Logprobs
from .metrics import CONTENT_TYPE, Metrics
from .sampling import Penalties, SamplingParams
from .schemas import (
    DEFAULT_MAX_TOKENS,
    BadRequest,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    Message,
    Sampling,
    TokenizeRequest,
    parse,
)

logger = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"  # the page at `/`: plain HTML, CSS and JS, no build step
MAX_BODY_BYTES = 1 << 20  # a request body above 1 MiB is refused before it is parsed (413)
EVENT_GRACE_S = 5.0  # how long past a request's deadline a handler waits for the engine before giving up itself
# metric labels; anything else counts as "other"
PATHS = (
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/models",
    "/tokenize",
    "/detokenize",
    "/health",
    "/metrics",
    "/",
)
OPEN_PATHS = ("/health", "/")  # answered without the API key: liveness probes, and the page (it asks for the key)


def error(
    status: int, message: str, kind: str = "invalid_request_error", param: str | None = None, code=None, **kw
) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status, **kw)


class CountRequests:
    """ASGI middleware: counts every answered HTTP request by path and status code (streams at their start)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def send_and_note(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            self.metrics.count_request(scope["path"] if scope["path"] in PATHS else "other", status)


class RequireKey:
    """ASGI middleware: every request but `OPEN_PATHS` (and the page's files) must carry `Authorization: Bearer
    KEY`, compared in constant time (`hmac.compare_digest`), else 401 in OpenAI's shape, as OpenAI and vLLM answer."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.strip().encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self.open(scope["path"]) or self.authorized(scope):
            return await self.app(scope, receive, send)
        message = "a valid API key is required: send it as the header `Authorization: Bearer KEY`"
        response = error(401, message, "invalid_request_error", code="invalid_api_key")
        response.headers["WWW-Authenticate"] = "Bearer"
        await response(scope, receive, send)

    @staticmethod
    def open(path: str) -> bool:
        return path in OPEN_PATHS or path.startswith("/static/")

    def authorized(self, scope) -> bool:
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        # compare_digest on the whole token: a wrong key of any length takes the time of a wrong one of the same
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)


async def read_json(request: Request):
    """The parsed body, or `BadRequest`; refuses bodies over `MAX_BODY_BYTES` without reading them whole."""
    size, chunks = 0, []
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise BadRequest(f"the request body is larger than {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError) as err:
        raise BadRequest(f"the request body is not valid JSON: {err}") from None


def create_app(
    model,
    tokenizer,
    limits: Limits,
    model_name: str = "itera-lite",
    compile: bool = False,
    chat_template: str | None = None,
    api_key: str | None = None,
) -> FastAPI:
    """The web app around a new engine for `model`; the engine thread starts and stops with the app.
    `compile` runs the engine's batched decode step compiled; `chat_template` (Jinja) replaces the tokenizer's
    (or, where it has none, `chat.STORY_TEMPLATE`); `api_key`, if given, is required of every request but
    `/health` and the page's files."""
    engine = Engine(model, tokenizer, limits, compile=compile)
    metrics = engine.metrics
    metrics.gauges = {
        "itera_queued_requests": ("Requests waiting for batch slots.", lambda: engine.queued),
        "itera_active_sequences": ("Sequences in the running batch.", lambda: engine.active),
        "itera_state_cache_bytes": ("Bytes of prompt states in the prefix cache.", lambda: engine.state_cache.bytes),
        "itera_state_cache_entries": ("Prompt states in the prefix cache.", lambda: len(engine.state_cache.entries)),
    }

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        await run_in_threadpool(engine.stop)

    app = FastAPI(title="Itera-Lite", lifespan=lifespan)
    app.state.engine = engine
    if api_key:
        app.add_middleware(RequireKey, key=api_key)
    app.add_middleware(CountRequests, metrics=metrics)  # added last, so outermost: it counts the 401s too

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return error(exc.status_code, str(exc.detail), "invalid_request_error", headers=exc.headers)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        logger.exception("unhandled error on %s", request.url.path)
        return error(500, "internal server error", "server_error")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html")

    @app.get("/health")
    async def health():
        body = {"status": "ok" if engine.alive else "down", "model": model_name}
        body |= {"active_sequences": engine.active, "queued_requests": engine.queued}
        return JSONResponse(body, 200 if engine.alive else 503)

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models():
        card = {"id": model_name, "object": "model", "created": 0, "owned_by": "itera-lite"}
        return {"object": "list", "data": [card]}

    def check_length(prompts: list[list[int]], param: str) -> None:
        longest = max(len(ids) for ids in prompts)
        if longest > limits.max_prompt_tokens:
            msg = f"the prompt is {longest} tokens long, above this server's limit of {limits.max_prompt_tokens}"
            raise BadRequest(msg, param)

    async def run(request: Request, req: Sampling, job: Job, events: asyncio.Queue, out, head: dict):
        """Submits the job; answers with the whole result, or streams it."""
        try:
            engine.submit(job)
        except QueueFull as err:
            return error(429, str(err), "rate_limit_exceeded", headers={"Retry-After": "1"})
        except EngineStopped as err:
            return error(503, str(err), "server_error")
        if req.stream:
            stream = sse(engine, job, events, out, head, req.include_usage)
            return StreamingResponse(stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await collect(request, engine, job, events, out, head)

    @app.post("/v1/completions")
    async def completions(request: Request):
        try:
            req = parse(await read_json(request))
            req.check(limits)
            req.check_ids(len(tokenizer))
            prompts = [encode(tokenizer, p) if isinstance(p, str) else p for p in req.prompts]
            check_length(prompts, "prompt")
        except BadRequest as err:
            return error(400, err.message, param=err.param)
        events, job = new_job(req, prompts, limits)
        job.logprobs, job.prompt_logprobs = req.logprobs, req.echo and req.logprobs is not None
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time())}
        head["model"] = model_name
        texts = [p if isinstance(p, str) else tokenizer.decode(p, skip_special_tokens=True) for p in req.prompts]
        return await run(request, req, job, events, Choices(tokenizer, job, req, texts, prompts), head)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            req = parse(await read_json(request), ChatRequest)
            req.check(limits)
            req.check_bias(len(tokenizer))
            prompt = conversation(req.messages)
            check_length([prompt], "messages")
        except BadRequest as err:
            return error(400, err.message, param=err.param)
        events, job = new_job(req, [prompt], limits)
        job.logprobs = (req.top_logprobs or 0) if req.logprobs else None
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time())}
        head["model"] = model_name
        if req.stream:
            head["object"] = "chat.completion.chunk"
        return await run(request, req, job, events, ChatChoices(job, tokenizer, req.logprobs), head)

    def conversation(messages: list[Message]) -> list[int]:
        return chat_prompt(tokenizer, [m.model_dump(exclude_none=True) for m in messages], chat_template)

    @app.post("/tokenize")
    async def tokenize(request: Request):
        try:
            req = parse(await read_json(request), TokenizeRequest)
            if (req.prompt is None) == (req.messages is None):
                raise BadRequest("give exactly one of prompt and messages", "prompt")
            if req.prompt is not None:
                ids = tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
            else:
                ids = conversation(req.messages)
        except BadRequest as err:
            return error(400, err.message, param=err.param)
        return {"count": len(ids), "max_model_len": limits.max_prompt_tokens, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        try:
            req = parse(await read_json(request), DetokenizeRequest)
            if not all(0 <= t < len(tokenizer) for t in req.tokens):
                raise BadRequest(f"tokens: token ids must lie in [0, {len(tokenizer)})", "tokens")
        except BadRequest as err:
            return error(400, err.message, param=err.param)
        return {"prompt": tokenizer.decode(req.tokens)}

    return app


def encode(tokenizer, text: str) -> list[int]:
    """The text's token ids with the tokenizer's special tokens, but one `<s>` only where the text already starts
    with it (as lm-eval's local-completions sends decoded `<s>` + story): each story is scored after exactly one."""
    ids = tokenizer.encode(text)
    bos = tokenizer.bos_token_id
    if bos is not None and ids[:2] == [bos, bos] and text.startswith(tokenizer.bos_token):
        return ids[1:]
    return ids


def new_job(req: Sampling, prompts: list[list[int]], limits: Limits) -> tuple[asyncio.Queue, Job]:
    """The job for a request's prompts (token ids), and the queue that its engine events arrive on."""
    loop, events = asyncio.get_running_loop(), asyncio.Queue()
    job = Job(
        prompts=prompts,
        sink=lambda event: loop.call_soon_threadsafe(events.put_nowait, event),
        max_tokens=min(DEFAULT_MAX_TOKENS, limits.max_new_tokens) if req.max_tokens is None else req.max_tokens,
        sampling=SamplingParams(
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=req.top_k or 0,
        ),
        stop=req.stops,
        n=req.n or 1,
        seed=req.seed,
        ignore_eos=req.ignore_eos,
        penalties=Penalties(
            frequency=req.frequency_penalty or 0.0,
            presence=req.presence_penalty or 0.0,
            logit_bias={int(k): v for k, v in (req.logit_bias or {}).items()},
        ),
    )
    return events, job


async def next_event(job: Job, events: asyncio.Queue):
    """The engine's next event for `job`; a `Failed` if the engine does not answer within the request's time."""
    try:
        return await asyncio.wait_for(events.get(), max(0.0, job.deadline - time.monotonic()) + EVENT_GRACE_S)
    except asyncio.TimeoutError:
        return Failed(504, "the generation engine did not answer in time", "timeout")


def choice(index: int, text: str, reason: str | None, logprobs: dict | None = None) -> dict:
    return {"text": text, "index": index, "logprobs": logprobs, "finish_reason": reason}


class Choices:
    """Turns a job's events into OpenAI choices (whole or as stream chunks): the echoed prompt, text, logprobs."""

    def __init__(self, tokenizer, job: Job, req: CompletionRequest, texts: list[str], prompts: list[list[int]]):
        self.job, self.echo, self.texts, self.prompts = job, req.echo, texts, prompts
        self.text: dict[int, str] = defaultdict(str)
        self.reasons: dict[int, str] = {}
        self.logprobs = None
        if req.logprobs is not None:  # offsets count from the prompt's start; an echoed prompt is in the text
            start = [0 if req.echo else len(texts[i // job.n]) for i in range(job.slots)]
            self.logprobs = [Logprobs(tokenizer, start[i]) for i in range(job.slots)]

    def echoed(self) -> list[dict]:
        """The chunks of the echoed prompts, when they come without logprobs (else `on` sends them)."""
        if not self.echo or self.job.prompt_logprobs:
            return []
        return [self.on(Delta(i, self.texts[i // self.job.n]))[0] for i in range(self.job.slots)]

    def on(self, event) -> list[dict]:
        """The stream chunks' choices that an engine event makes (and their parts, kept for `whole`)."""
        if isinstance(event, PromptScored):
            n, p = self.job.n, event.prompt
            chunks = []
            for i in range(p * n, (p + 1) * n):
                lp = self.logprobs[i].add(event.logprobs, self.prompts[p])
                chunks.append(choice(i, self.texts[p], None, lp))
                self.text[i] += self.texts[p]
            return chunks
        if isinstance(event, Finished):
            self.reasons[event.index] = event.reason
            return [choice(event.index, "", event.reason, None if self.logprobs is None else Logprobs.empty())]
        self.text[event.index] += event.text
        lp = None if self.logprobs is None else self.logprobs[event.index].add(list(event.logprobs))
        return [choice(event.index, event.text, None, lp)]

    def whole(self) -> list[dict]:
        lp = [None] * self.job.slots if self.logprobs is None else [b.whole for b in self.logprobs]
        return [choice(i, self.text[i], self.reasons.get(i), lp[i]) for i in range(self.job.slots)]


def usage(done: Done) -> dict:
    total = done.prompt_tokens + done.completion_tokens
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens, "total_tokens": total}


async def cancel_on_disconnect(request: Request, engine: Engine, job: Job) -> None:
    """Frees a job's slots as soon as its client hangs up (the body is read: the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    engine.cancel(job)


async def collect(request: Request, engine: Engine, job: Job, events: asyncio.Queue, out, head: dict):
    """The whole completion as one JSON response."""
    out.echoed()
    watcher = asyncio.create_task(cancel_on_disconnect(request, engine, job))
    try:
        while not isinstance(event := await next_event(job, events), (Done, Failed)):
            out.on(event)
    finally:
        watcher.cancel()
        engine.cancel(job)  # a no-op once the job is done; frees the slots if this task was cancelled
    if isinstance(event, Failed):
        return error(event.status, event.message, event.kind)
    return JSONResponse(head | {"choices": out.whole(), "usage": usage(event)})


async def sse(engine: Engine, job: Job, events: asyncio.Queue, out, head: dict, include_usage: bool):
    """Server-sent events: a `data: {chunk}` per piece of text, one with each choice's finish_reason, then
    `data: [DONE]`. An error after the stream started arrives as `data: {"error": ...}`, as OpenAI sends it."""

    def data(payload: dict) -> str:
        return f"data: {json.dumps(payload)}\n\n"

    if include_usage:  # as OpenAI does: every chunk has the field, null until the last one
        head = head | {"usage": None}
    try:
        for chunk in out.echoed():
            yield data(head | {"choices": [chunk]})
        while not isinstance(event := await next_event(job, events), (Done, Failed)):
            for chunk in out.on(event):
                yield data(head | {"choices": [chunk]})
        if isinstance(event, Failed):
            yield data({"error": {"message": event.message, "type": event.kind, "param": None, "code": None}})
        elif include_usage:
            yield data(head | {"choices": [], "usage": usage(event)})
        yield "data: [DONE]\n\n"
    finally:
        engine.cancel(job)
