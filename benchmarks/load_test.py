"""Load test of the HTTP server: requests/s and tokens/s at 1, 8 and 32 concurrent clients, over loopback only.

    python -m benchmarks.load_test                                  # starts `python -m serve` on the bundled model
    python -m benchmarks.load_test --model FOLDER                   # ... on another model folder
    python -m benchmarks.load_test --url http://127.0.0.1:8000      # a server that is already running
    python -m benchmarks.load_test --tiny                           # a tiny random model: checks that it runs

Each level sends a bounded number of requests (`--requests`, at least one per client) from that many concurrent
clients, each sending its next request as soon as the previous one is answered. Requests ask for exactly
`--max-tokens` tokens (`ignore_eos`), so tokens/s does not depend on where the model happens to stop. Prints a
table and the JSON; a run on a real model also writes benchmarks/results/load_test.json (unless `--no-save`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import httpx

from benchmarks.peers import machine, save
from modeling_itera.defaults import BUNDLED_MODEL

REPO = Path(__file__).resolve().parent.parent
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
PROMPTS = ["Once upon a time", "The little dog", "One day, Lily found", "Tom and his mom went to the park"]


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
def own_server(model: str, max_batch: int, max_tokens: int, threads: int | None):
    """`python -m serve` in a subprocess on a free loopback port; yields its URL once /health answers."""
    port = free_port()
    command = [sys.executable, "-m", "serve", "--model", model, "--port", str(port), "--log-level", "warning"]
    command += ["--max-batch-size", str(max_batch), "--queue-size", str(4 * max_batch)]
    command += ["--max-new-tokens", str(max(max_tokens, 16))] + (["--threads", str(threads)] if threads else [])
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
        yield url
    finally:
        process.terminate()
        process.wait(30)


async def run_level(url: str, clients: int, requests: int, max_tokens: int, temperature: float) -> dict:
    """`requests` completions from `clients` concurrent clients; their rates, latencies and failures."""
    latencies, tokens, failures = [], 0, {}
    todo = iter(range(requests))

    async def client(http: httpx.AsyncClient):
        nonlocal tokens
        for i in todo:
            body = {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens, "temperature": temperature}
            started = time.perf_counter()
            response = await http.post(f"{url}/v1/completions", json=body | {"ignore_eos": True})
            if response.status_code != 200:
                failures[response.status_code] = failures.get(response.status_code, 0) + 1
                continue
            latencies.append(time.perf_counter() - started)
            tokens += response.json()["usage"]["completion_tokens"]

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
        "latency_p95_s": round(statistics.quantiles(latencies, n=20)[-1], 3) if len(latencies) > 1 else None,
    }


def table(levels: list[dict]) -> str:
    rows = [f"| {'clients':>7} | {'ok/sent':>9} | {'req/s':>7} | {'tokens/s':>9} | {'p50 s':>6} | {'p95 s':>6} |"]
    rows.append("|" + "|".join("-" * (w + 2) for w in (7, 9, 7, 9, 6, 6)) + "|")
    for r in levels:
        sent = f"{r['ok']}/{r['requests']}"
        p50, p95 = (r[k] if r[k] is not None else float("nan") for k in ("latency_p50_s", "latency_p95_s"))
        rows.append(
            f"| {r['clients']:>7} | {sent:>9} | {r['requests_per_s']:>7.2f} | {r['tokens_per_s']:>9.1f} "
            f"| {p50:>6.3f} | {p95:>6.3f} |"
        )
    return "\n".join(rows)


def measure(url: str, args: argparse.Namespace) -> dict:
    httpx.post(f"{url}/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 2}, timeout=120)  # warm-up
    levels = []
    for clients in args.clients:
        requests = max(args.requests, clients)
        levels.append(asyncio.run(run_level(url, clients, requests, args.max_tokens, args.temperature)))
        print(f"{clients} clients: {levels[-1]['tokens_per_s']} tokens/s", file=sys.stderr)
    health = httpx.get(f"{url}/health", timeout=10).json()
    settings = {"max_tokens": args.max_tokens, "temperature": args.temperature, "model": health.get("model")}
    settings["server_threads"] = None if args.url else args.server_threads
    return {"settings": settings, "client_machine": machine(), "levels": levels}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--url", help="a running server on this machine (loopback only)")
    source.add_argument("--model", default=str(BUNDLED_MODEL))
    source.add_argument("--tiny", action="store_true", help="a tiny random model in a temporary folder")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=64, help="per level (at least one per client)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--no-save", action="store_true", help="print only; do not write benchmarks/results/")
    parser.add_argument("--server-threads", type=int, default=None, help="the server's --threads, if it is ours")
    args = parser.parse_args(argv)

    if args.url:
        if urlparse(args.url).hostname not in LOOPBACK:
            parser.error(f"--url must be on this machine ({', '.join(sorted(LOOPBACK))}), got {args.url}")
        result = measure(args.url.rstrip("/"), args)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            model = str(tiny_model(Path(tmp))) if args.tiny else args.model
            with own_server(model, max(args.clients), args.max_tokens, args.server_threads) as url:
                result = measure(url, args)
    print(table(result["levels"]))
    print(json.dumps(result, indent=2))
    if not (args.tiny or args.no_save):
        print(f"wrote {save('load_test', result)}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
