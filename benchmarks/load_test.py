"""Load test of the HTTP server: requests/s and tokens/s at 1, 8, 32 and 64 concurrent clients, over loopback only.

    python -m benchmarks.load_test                                  # starts `python -m serve` on the bundled model
    python -m benchmarks.load_test --model FOLDER                   # ... on another model folder
    python -m benchmarks.load_test --url http://127.0.0.1:8000      # a server that is already running
    python -m benchmarks.load_test --tiny                           # a tiny random model: checks that it runs
    python -m benchmarks.load_test --duration 60                    # soak: each level runs 60 s of mixed traffic
    python -m benchmarks.load_test --distinct-prompts               # a cold ~100-300-token prompt per request

Each level sends a bounded number of requests (`--requests`, at least one per client) from that many concurrent
clients, each sending its next request as soon as the previous one is answered. Requests ask for exactly
`--max-tokens` tokens (`ignore_eos`), so tokens/s does not depend on where the model happens to stop. Prints a
table and the JSON; a run on a real model also writes benchmarks/results/load_test.json (unless `--no-save`).

With `--distinct-prompts`, every request has a prompt of its own (80-240 words drawn at random, seeded by
`--prompt-seed` and the request's index, so no two share more than a word or so of prefix): each one is a cold
prefill, which the four short prompts above (cached after their first request) never are. Those requests stream,
and the level also reports the time to the first byte of the stream (the prefill as the client sees it).

With `--duration`, each level is a bounded soak instead: its clients keep sending for that many seconds a mix that
looks like real traffic (prompts of ~4, 64 and 512 tokens; half of them streamed; every 8th stream hung up after its
first chunks), greedy, so that every completed answer must equal the prompt's answer computed alone beforehand: a
wrong text under load (a batching or state-cache bug) counts as "wrong", not as a success. It also reports the
server's RSS before and after the soak (own server only), where a leak of states or streams would show.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import httpx

from benchmarks.peers import machine, save
from modeling_itera.defaults import BUNDLED_MODEL

REPO = Path(__file__).resolve().parent.parent
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
PROMPTS = ["Once upon a time", "The little dog", "One day, Lily found", "Tom and his mom went to the park"]
STORY_WORDS = " ".join(PROMPTS).split()
SOAK_LENGTHS = (4, 64, 512)  # prompt tokens, roughly: a chat turn, a paragraph, a page
SOAK_VARIANTS = 4  # prompts per length, each starting at another story word: several distinct prefixes
DISCONNECT_EVERY = 8  # every 8th streamed request of a soak hangs up ...
DISCONNECT_AFTER = 2  # ... after this many chunks, as a client that closes its tab
# Words of --distinct-prompts: common TinyStories words, ~1.25 tokens each with the bundled tokenizer, so that a
# prompt of 80-240 of them is ~100-300 tokens.
DISTINCT_WORDS = (
    "once upon a time there was little girl boy named lily tom ben sue who liked to play with her his big red blue "
    "ball cat dog bird fish tree park sun sky house mom dad friend happy sad went saw found said wanted run jump "
    "under over in on and but then one day very good toy box car garden flower water rain cake smile help share"
).split()
DISTINCT_WORDS_PER_PROMPT = (80, 240)


def tiny_model(folder: Path) -> Path:
    """A random Itera-Lite with a small trained tokenizer: fast, and enough to exercise the server."""
    from modeling_itera import IteraLiteConfig, IteraLiteForCausalLM
    from training.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(PROMPTS * 20, vocab_size=300)
    config = IteraLiteConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        state_size=16,
        head_dim=32,
        intermediate_size=128,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=64,
        chunk_size=16,
    )
    IteraLiteForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def own_server(model: str, max_batch: int, max_tokens: int, threads: int | None, extra: tuple[str, ...] = ()):
    """`python -m serve` in a subprocess on a free loopback port; yields (its URL, its pid) once /health answers.
    `extra`: more server flags (say, a longer `--max-prompt-tokens`)."""
    port = free_port()
    command = [sys.executable, "-m", "serve", "--model", model, "--port", str(port), "--log-level", "warning"]
    command += ["--max-batch-size", str(max_batch), "--queue-size", str(4 * max_batch)]
    command += ["--max-new-tokens", str(max(max_tokens, 16))] + (["--threads", str(threads)] if threads else [])
    command += list(extra)
    process = subprocess.Popen(command, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if process.poll() is not None:
                raise SystemExit(f"the server exited with code {process.returncode}")
            if time.monotonic() > deadline:
                raise SystemExit("the server did not answer /health within 300 s")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        yield url, process.pid
    finally:
        process.terminate()
        process.wait(30)


def distinct_prompt(seed: int, i: int) -> str:
    """Request i's own prompt under `seed`: DISTINCT_WORDS_PER_PROMPT words drawn at random."""
    rng = random.Random(f"{seed}/{i}")
    return " ".join(rng.choice(DISTINCT_WORDS) for _ in range(rng.randint(*DISTINCT_WORDS_PER_PROMPT)))


def quantile(values: list[float], q: int) -> float | None:
    """The q-th percentile, rounded to ms (None for fewer than two values)."""
    return round(statistics.quantiles(values, n=100)[q - 1], 3) if len(values) > 1 else None


async def run_level(url: str, clients: int, requests: int, max_tokens: int, temperature: float, prompt_of=None) -> dict:
    """`requests` completions from `clients` concurrent clients; their rates, latencies and failures. With
    `prompt_of` (request index -> prompt), each request sends its own prompt and streams it (for the first byte);
    else the requests go round PROMPTS, unstreamed."""
    latencies, first_bytes, tokens, failures = [], [], 0, {}
    todo = iter(range(requests))

    async def client(http: httpx.AsyncClient):
        nonlocal tokens
        for i in todo:
            prompt = PROMPTS[i % len(PROMPTS)] if prompt_of is None else prompt_of(i)
            body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": temperature, "ignore_eos": True}
            result = await (plain(http, url, body) if prompt_of is None else streamed(http, url, body, False))
            if result.kind != "ok":
                failures[result.code] = failures.get(result.code, 0) + 1
                continue
            latencies.append(result.seconds)
            tokens += result.tokens
            if result.first_byte_s is not None:
                first_bytes.append(result.first_byte_s)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        wall = time.perf_counter() - started
    ok = len(latencies)
    return {
        "clients": clients,
        "requests": requests,
        "ok": ok,
        "failed": failures,
        "seconds": round(wall, 3),
        "requests_per_s": round(ok / wall, 3),
        "tokens_per_s": round(tokens / wall, 1),
        "latency_p50_s": round(statistics.median(latencies), 3) if latencies else None,
        "latency_p95_s": quantile(latencies, 95),
        "latency_p99_s": quantile(latencies, 99),
        "first_byte_p50_s": round(statistics.median(first_bytes), 3) if first_bytes else None,
        "first_byte_p99_s": quantile(first_bytes, 99),
    }


def table(levels: list[dict]) -> str:
    names = ("clients", "ok/sent", "req/s", "tokens/s", "p50 s", "p95 s", "p99 s", "TTFB p50", "TTFB p99")
    widths = (7, 9, 7, 9, 6, 6, 6, 8, 8)
    rows = ["| " + " | ".join(f"{n:>{w}}" for n, w in zip(names, widths)) + " |"]
    rows.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in levels:
        cells = [r["clients"], f"{r['ok']}/{r['requests']}", f"{r['requests_per_s']:.2f}", f"{r['tokens_per_s']:.1f}"]
        keys = ("latency_p50_s", "latency_p95_s", "latency_p99_s", "first_byte_p50_s", "first_byte_p99_s")
        cells += ["-" if r.get(k) is None else f"{r[k]:.3f}" for k in keys]
        rows.append("| " + " | ".join(f"{c:>{w}}" for c, w in zip(cells, widths)) + " |")
    return "\n".join(rows)


def measure(url: str, args: argparse.Namespace) -> dict:
    httpx.post(f"{url}/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 2}, timeout=120)  # warm-up
    if getattr(args, "compile", False):  # a second batch size compiles the step once more, for any batch size
        asyncio.run(run_level(url, 4, 4, 8, args.temperature))
    levels, sent = [], 0
    for clients in args.clients:
        requests = max(args.requests, clients)
        # numbered on from the previous levels' requests: no level finds another's prompts in the prefix cache
        prompt_of = (
            (lambda i, first=sent: distinct_prompt(args.prompt_seed, first + i)) if args.distinct_prompts else None
        )
        level = asyncio.run(run_level(url, clients, requests, args.max_tokens, args.temperature, prompt_of))
        if prompt_of is not None:
            level["prompt_tokens_mean"] = round(
                statistics.mean(token_count(url, prompt_of(i)) for i in range(requests))
            )
        levels.append(level)
        sent += requests
        print(f"{clients} clients: {levels[-1]['tokens_per_s']} tokens/s", file=sys.stderr)
    health = httpx.get(f"{url}/health", timeout=10).json()
    settings = {"max_tokens": args.max_tokens, "temperature": args.temperature, "model": health.get("model")}
    settings |= {"distinct_prompts": args.distinct_prompts, "prompt_seed": args.prompt_seed}
    settings["server_threads"] = None if args.url else args.server_threads
    settings["server_compiled"] = None if args.url else args.compile
    settings["server_backend"] = None if args.url else args.backend
    return {"settings": settings, "client_machine": machine(), "levels": levels}


# ---- soak (--duration) -----------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """One soak request: "ok" (the whole answer), "disconnected" (the client hung up on purpose) or "failed"
    (`code`: the HTTP status, the error type of a stream that broke after it started, or the exception's name)."""

    kind: str
    code: int | str | None = None
    text: str = ""
    tokens: int = 0
    seconds: float = 0.0
    first_byte_s: float | None = None  # streamed: sending to the first `data:` chunk


def rss_mb(pid: int | None) -> float | None:
    """The resident memory of process `pid` in MB (Linux /proc); None without a pid (a server given by --url)."""
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def story(words: int, start: int = 0) -> str:
    """`words` story words in their order from word `start` on, repeated from the first as often as needed."""
    return " ".join(itertools.islice(itertools.cycle(STORY_WORDS), start, start + words))


def token_count(url: str, text: str) -> int:
    response = httpx.post(f"{url}/tokenize", json={"prompt": text}, timeout=60)
    response.raise_for_status()
    return response.json()["count"]


def soak_prompts(url: str) -> list[str]:
    """SOAK_VARIANTS prompts of each of SOAK_LENGTHS tokens, roughly: the words per token are measured with the
    server's own tokenizer, so the lengths hold for any model. Prompt k: length k % 3, variant k // 3."""
    per_word = token_count(url, story(1000)) / 1000
    return [story(max(1, round(n / per_word)), v) for v in range(SOAK_VARIANTS) for n in SOAK_LENGTHS]


def soak_plan(i: int, prompts: int) -> tuple[int, bool, bool]:
    """Request i of a level: (its prompt, streamed?, hangs up mid-stream?). Odd requests stream and request pairs
    walk through the prompts, so that every prompt is asked both ways; every DISCONNECT_EVERY-th stream hangs up."""
    k, streamed = i // 2, i % 2 == 1
    return k % prompts, streamed, streamed and k % DISCONNECT_EVERY == 0


def greedy_body(prompt: str, max_tokens: int) -> dict:
    """Greedy and exactly `max_tokens` long: the one answer a prompt has, however the server batches it."""
    return {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}


def references(url: str, prompts: list[str], max_tokens: int) -> list[str]:
    """Each prompt's answer asked alone (nothing else running): what every answer under load must equal."""
    texts = []
    for prompt in prompts:
        response = httpx.post(f"{url}/v1/completions", json=greedy_body(prompt, max_tokens), timeout=600)
        response.raise_for_status()
        texts.append(response.json()["choices"][0]["text"])
    return texts


async def plain(http: httpx.AsyncClient, url: str, body: dict) -> Outcome:
    started = time.perf_counter()
    response = await http.post(f"{url}/v1/completions", json=body)
    if response.status_code != 200:
        return Outcome("failed", response.status_code)
    answer = response.json()
    text, tokens = answer["choices"][0]["text"], answer["usage"]["completion_tokens"]
    return Outcome("ok", text=text, tokens=tokens, seconds=time.perf_counter() - started)


async def streamed(http: httpx.AsyncClient, url: str, body: dict, hang_up: bool) -> Outcome:
    """Reads the server-sent events until `[DONE]`; with `hang_up`, closes the response after DISCONNECT_AFTER
    chunks (the server must notice and free the slot). A stream that ends without `[DONE]` failed."""
    body = body | {"stream": True, "stream_options": {"include_usage": True}}
    started, first, chunks, text, tokens = time.perf_counter(), None, 0, [], 0
    async with http.stream("POST", f"{url}/v1/completions", json=body) as response:
        if response.status_code != 200:
            return Outcome("failed", response.status_code)
        async for line in response.aiter_lines():
            if line == "data: [DONE]":
                seconds = time.perf_counter() - started
                return Outcome("ok", text="".join(text), tokens=tokens, seconds=seconds, first_byte_s=first)
            if not line.startswith("data: "):
                continue
            chunk = json.loads(line[len("data: ") :])
            if "error" in chunk:
                return Outcome("failed", chunk["error"]["type"], first_byte_s=first)
            first = time.perf_counter() - started if first is None else first
            chunks += 1
            text += [c["text"] for c in chunk["choices"]]
            tokens = (chunk.get("usage") or {}).get("completion_tokens", tokens)
            if hang_up and chunks >= DISCONNECT_AFTER:
                return Outcome("disconnected", first_byte_s=first)
    return Outcome("failed", "no [DONE]", first_byte_s=first)


async def soak_request(http: httpx.AsyncClient, url: str, body: dict, stream: bool, hang_up: bool) -> Outcome:
    try:
        return await (streamed(http, url, body, hang_up) if stream else plain(http, url, body))
    except httpx.HTTPError as err:  # a broken connection is a failure of the server too, not of the benchmark
        return Outcome("failed", type(err).__name__)


async def soak_level(url: str, clients: int, seconds: float, prompts: list[str], refs: list[str], max_tokens: int):
    """`clients` concurrent clients sending the soak mix for `seconds` (the requests then in flight are awaited)."""
    done: list[tuple[int, Outcome]] = []
    indices = itertools.count()

    async def client(http: httpx.AsyncClient):
        while time.perf_counter() < deadline:
            p, stream, hang_up = soak_plan(next(indices), len(prompts))
            done.append((p, await soak_request(http, url, greedy_body(prompts[p], max_tokens), stream, hang_up)))

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        started = time.perf_counter()
        deadline = started + seconds
        await asyncio.gather(*(client(http) for _ in range(clients)))
        wall = time.perf_counter() - started
    return soak_summary(clients, wall, done, refs)


def soak_summary(clients: int, wall: float, done: list[tuple[int, Outcome]], refs: list[str]) -> dict:
    """A level's counts (ok, wrong, disconnected and failed are disjoint), rates and latencies."""
    completed = [(p, o) for p, o in done if o.kind == "ok"]
    wrong = sum(o.text != refs[p] for p, o in completed)
    failed = {}
    for code in sorted((o.code for _, o in done if o.kind == "failed"), key=str):
        failed[code] = failed.get(code, 0) + 1
    latencies = [o.seconds for _, o in completed]
    first = [o.first_byte_s for _, o in done if o.first_byte_s is not None]
    return {
        "clients": clients,
        "sent": len(done),
        "ok": len(completed) - wrong,
        "wrong": wrong,
        "disconnected": sum(o.kind == "disconnected" for _, o in done),
        "failed": failed,
        "seconds": round(wall, 3),
        "requests_per_s": round(len(completed) / wall, 3),
        "tokens_per_s": round(sum(o.tokens for _, o in completed) / wall, 1),
        "latency_p50_s": round(statistics.median(latencies), 3) if latencies else None,
        "latency_p99_s": round(statistics.quantiles(latencies, n=100)[-1], 3) if len(latencies) > 1 else None,
        "first_byte_p50_s": round(statistics.median(first), 3) if first else None,
    }


def soak(url: str, args: argparse.Namespace, pid: int | None) -> dict:
    """Every level of the soak, each after its prompts' answers alone. The references of later levels are compared
    with the first level's too: they come from the state cache then, which a soak could have corrupted."""
    httpx.post(f"{url}/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 2}, timeout=120)  # warm-up
    prompts = soak_prompts(url)
    rss_start, levels, first = rss_mb(pid), [], None
    for clients in args.clients:
        refs = references(url, prompts, args.max_tokens)
        first = first or refs
        level = asyncio.run(soak_level(url, clients, args.duration, prompts, refs, args.max_tokens))
        level["references_changed"] = sum(a != b for a, b in zip(refs, first))
        levels.append(level)
        print(f"{clients} clients: {level['ok']} ok, {level['wrong']} wrong, {level['failed']}", file=sys.stderr)
    health = httpx.get(f"{url}/health", timeout=10).json()
    settings = {"duration_s": args.duration, "max_tokens": args.max_tokens, "temperature": 0.0}
    settings |= {"prompt_tokens": [token_count(url, p) for p in prompts], "model": health.get("model")}
    settings["server_threads"] = None if args.url else args.server_threads
    settings["server_compiled"] = None if args.url else args.compile
    settings["server_backend"] = None if args.url else args.backend
    return {
        "settings": settings,
        "client_machine": machine(),
        "rss_start_mb": rss_start,
        "rss_end_mb": rss_mb(pid),
        "levels": levels,
    }


def soak_table(result: dict) -> str:
    def number(value, digits: int) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    mb = f"{number(result['rss_start_mb'], 1)} -> {number(result['rss_end_mb'], 1)} MB"
    head = f"soak: {result['settings']['duration_s']:g} s per level; server RSS {mb}"
    names = ("clients", "ok", "wrong", "disconn.", "failed", "tokens/s", "p50 s", "p99 s", "TTFB p50 s")
    widths = (7, 6, 5, 8, 14, 9, 6, 6, 10)
    rows = [head, "| " + " | ".join(f"{n:>{w}}" for n, w in zip(names, widths)) + " |"]
    rows.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in result["levels"]:
        failed = " ".join(f"{code}:{n}" for code, n in r["failed"].items()) or "-"
        cells = (r["clients"], r["ok"], r["wrong"], r["disconnected"], failed, number(r["tokens_per_s"], 1))
        cells += tuple(number(r[k], 3) for k in ("latency_p50_s", "latency_p99_s", "first_byte_p50_s"))
        rows.append("| " + " | ".join(f"{c:>{w}}" for c, w in zip(cells, widths)) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--url", help="a running server on this machine (loopback only)")
    source.add_argument("--model", default=str(BUNDLED_MODEL))
    source.add_argument("--tiny", action="store_true", help="a tiny random model in a temporary folder")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--requests", type=int, default=64, help="per level (at least one per client)")
    parser.add_argument("--duration", type=float, default=None, help="soak: seconds per level instead of --requests")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0, help="(a soak is greedy: temperature 0)")
    parser.add_argument(
        "--distinct-prompts",
        action="store_true",
        help="every request its own ~100-300-token prompt (a cold prefill each), streamed for the time to first byte",
    )
    parser.add_argument(
        "--prompt-seed", type=int, default=0, help="draws other --distinct-prompts (repeated runs against one server)"
    )
    parser.add_argument("--no-save", action="store_true", help="print only; do not write benchmarks/results/")
    parser.add_argument("--server-threads", type=int, default=None, help="the server's --threads, if it is ours")
    parser.add_argument("--compile", action="store_true", help="start our server with --compile (compiled decode)")
    parser.add_argument("--backend", choices=("torch", "onnx"), default="torch", help="with onnx, --model is an export")
    args = parser.parse_args(argv)
    if args.compile and args.backend == "onnx":
        parser.error("--compile applies to --backend torch only")
    if args.duration is not None and args.duration <= 0:
        parser.error(f"--duration must be > 0, got {args.duration:g}")
    if args.distinct_prompts and args.duration is not None:
        parser.error("--distinct-prompts applies to the request levels, not to a soak (--duration)")

    def run(url: str, pid: int | None) -> dict:
        return soak(url, args, pid) if args.duration else measure(url, args)

    if args.url:
        if urlparse(args.url).hostname not in LOOPBACK:
            parser.error(f"--url must be on this machine ({', '.join(sorted(LOOPBACK))}), got {args.url}")
        result = run(args.url.rstrip("/"), None)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            model = str(tiny_model(Path(tmp))) if args.tiny else args.model
            extra = (("--compile",) if args.compile else ()) + ("--backend", args.backend)
            with own_server(model, max(args.clients), args.max_tokens, args.server_threads, extra) as (url, pid):
                result = run(url, pid)
    print(soak_table(result) if args.duration else table(result["levels"]))
    print(json.dumps(result, indent=2))
    if not (args.tiny or args.no_save):
        print(f"wrote {save('load_test_soak' if args.duration else 'load_test', result)}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
