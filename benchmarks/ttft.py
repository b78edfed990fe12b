"""Time to first token of the HTTP server with its prefix state cache: short, long cold, and long cached prompts.

    python -m benchmarks.ttft                          # starts `python -m serve` on the bundled model
    python -m benchmarks.ttft --model FOLDER           # ... on another model folder
    python -m benchmarks.ttft --tiny --repeats 3       # a tiny random model: checks that it runs

What the state cache is for: a client that sends the same long context again with a new question at the end (a
document, a chat history) should wait about as long as for a short prompt alone, since only the new tokens are
prefilled from the cached state. Three cases, each prompt built from story words in an order of its own:

    alone   a ~20-token prompt that nothing has cached (a miss)
    cold    a ~2000-token prompt that nothing has cached (a miss)
    hit     the cold case's prompt again, plus a new ~20-token suffix (a hit: only the suffix is prefilled)
    branch  a new ~2000-token prefix with one ~20-token ending (sent first, not timed), then with another: the
            branching of a "regenerate" or a chat; it resumes from the last chunk-grid checkpoint inside the prefix

After the timed runs, each branch prompt's greedy text (32 tokens) is compared with that of a second server without
the cache (`--state-cache-bytes 0`): `greedy_equal_to_no_cache` in the result.

Each repetition runs alone, cold, hit streamed (seconds from sending to the first `data:` chunk with text), then
again non-streamed (the whole one-token request), each with prompts of its own. The cases are interleaved so that a
drift of the machine (another job, a thermal limit) touches all three alike. Reports the medians in ms, the ratios
cold/hit and cold/branch (target >= 10) and
hit/alone and branch/alone (target <= 1.5), and the server's cache hits and misses during the run
(GET /metrics). Prints a table and the JSON; a run on a real model also writes benchmarks/results/ttft.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.load_test import STORY_WORDS, own_server, tiny_model, token_count
from benchmarks.peers import machine, save
from modeling_itera.defaults import BUNDLED_MODEL

CASES = ("alone", "cold", "hit", "branch")
TARGETS = {"cold_over_hit": 10.0, "hit_over_alone": 1.5}  # cold/hit at least, hit/alone at most; branch alike
CHECK_TOKENS = 32  # greedy tokens compared with and without the cache


def words(seed: int, count: int) -> str:
    """`count` story words in an order of their own: another seed, another prompt, whose state nothing has cached."""
    return " ".join(random.Random(seed).choices(STORY_WORDS, k=count))


def word_counts(url: str, short_tokens: int, long_tokens: int) -> tuple[int, int]:
    """The words that make prompts of about `short_tokens` and `long_tokens`, with the server's own tokenizer."""
    per_word = token_count(url, words(0, 1000)) / 1000
    return max(1, round(short_tokens / per_word)), max(1, round(long_tokens / per_word))


def prompts(fresh: itertools.count, short: int, long: int) -> dict[str, str]:
    """One repetition's prompts, in the order they must be sent: the hit extends the cold prompt sent just before;
    `setup` (not timed) is the branch's prefix with another ending."""
    prefix, other = words(next(fresh), long), words(next(fresh), long)
    return {
        "alone": words(next(fresh), short),
        "cold": prefix,
        "hit": f"{prefix} {words(next(fresh), short)}",
        "setup": f"{other} {words(next(fresh), short)}",
        "branch": f"{other} {words(next(fresh), short)}",
    }


def body(prompt: str) -> dict:
    return {"prompt": prompt, "max_tokens": 1, "temperature": 0}


def first_chunk(http: httpx.Client, url: str, prompt: str) -> tuple[float, int]:
    """(seconds from sending a streamed one-token request to its first `data:` chunk with text, prompt tokens).
    A token without text (a special one) sends none: then the first chunk with a choice, sent in the same step."""
    started, first_text, first_any, tokens = time.perf_counter(), None, None, 0
    request = body(prompt) | {"stream": True, "stream_options": {"include_usage": True}}
    with http.stream("POST", f"{url}/v1/completions", json=request) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk, now = json.loads(line[len("data: ") :]), time.perf_counter() - started
            if "error" in chunk:
                raise SystemExit(f"the stream failed: {chunk['error']}")
            if chunk["choices"]:
                first_any = now if first_any is None else first_any
                if first_text is None and any(c["text"] for c in chunk["choices"]):
                    first_text = now
            tokens = (chunk.get("usage") or {}).get("prompt_tokens", tokens)
    return (first_any if first_text is None else first_text), tokens


def one_token(http: httpx.Client, url: str, prompt: str) -> tuple[float, int]:
    """(seconds of a whole non-streamed one-token request, prompt tokens)."""
    started = time.perf_counter()
    response = http.post(f"{url}/v1/completions", json=body(prompt))
    response.raise_for_status()
    return time.perf_counter() - started, response.json()["usage"]["prompt_tokens"]


ASKS = (first_chunk, one_token)


def state_cache(url: str) -> dict:
    """The server's prefix cache counters and gauges, from its Prometheus text at GET /metrics."""
    values = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    lookups = "itera_state_cache_lookups_total"
    return {
        "hits": int(values.get(f'{lookups}{{outcome="hit"}}', 0)),
        "misses": int(values.get(f'{lookups}{{outcome="miss"}}', 0)),
        "entries": int(values.get("itera_state_cache_entries", 0)),
        "bytes": int(values.get("itera_state_cache_bytes", 0)),
    }


def ms(seconds: list[float]) -> float:
    return round(statistics.median(seconds) * 1000, 2)


def ratios(medians: dict[str, float]) -> dict[str, float]:
    return {
        "cold_over_hit": round(medians["cold"] / medians["hit"], 2),
        "hit_over_alone": round(medians["hit"] / medians["alone"], 2),
        "cold_over_branch": round(medians["cold"] / medians["branch"], 2),
        "branch_over_alone": round(medians["branch"] / medians["alone"], 2),
    }


def meets(found: dict[str, float]) -> bool:
    return all(
        found[f"cold_over_{case}"] >= TARGETS["cold_over_hit"]
        and found[f"{case}_over_alone"] <= TARGETS["hit_over_alone"]
        for case in ("hit", "branch")
    )


def greedy_texts(url: str, texts: list[str]) -> list[str]:
    request = {"max_tokens": CHECK_TOKENS, "temperature": 0, "ignore_eos": True}
    with httpx.Client(timeout=600) as http:
        return [
            http.post(f"{url}/v1/completions", json=request | {"prompt": t}).json()["choices"][0]["text"] for t in texts
        ]


def measure(url: str, args: argparse.Namespace) -> dict:
    """A warm-up repetition each way (not counted), then `args.repeats` counted ones; medians per case."""
    short, long = word_counts(url, args.short_tokens, args.long_tokens)
    fresh = itertools.count(1)
    times = {ask.__name__: {case: [] for case in CASES} for ask in ASKS}
    tokens = {case: [] for case in CASES}
    branches = []
    with httpx.Client(timeout=600) as http:
        for ask in ASKS:
            for prompt in prompts(fresh, short, long).values():
                ask(http, url, prompt)
        before = state_cache(url)
        for _ in range(args.repeats):
            for ask in ASKS:
                for case, prompt in prompts(fresh, short, long).items():
                    seconds, count = ask(http, url, prompt)
                    if case == "setup":
                        continue
                    times[ask.__name__][case].append(seconds)
                    tokens[case].append(count)
                    branches += [prompt] if case == "branch" else []
    after = state_cache(url)
    cached_texts = greedy_texts(url, branches)
    streamed = {case: ms(times["first_chunk"][case]) for case in CASES}
    plain = {case: ms(times["one_token"][case]) for case in CASES}
    found = ratios(streamed)
    cache = {k: after[k] - before[k] for k in ("hits", "misses")} | {"expected_hits": 2 * len(ASKS) * args.repeats}
    cache |= {"entries_at_end": after["entries"], "bytes_at_end": after["bytes"]}
    health = httpx.get(f"{url}/health", timeout=10).json()
    settings = {"repeats": args.repeats, "short_tokens": args.short_tokens, "long_tokens": args.long_tokens}
    settings |= {"model": health.get("model"), "server_threads": args.server_threads}
    return {
        "settings": settings,
        "client_machine": machine(),
        "prompt_tokens": {case: round(statistics.median(tokens[case])) for case in CASES},
        "first_chunk_ms": streamed,
        "one_token_ms": plain,
        "ratios": found,
        "one_token_ratios": ratios(plain),
        "targets": TARGETS,
        "meets_targets": meets(found),
        "state_cache": cache,
        "branch_prompts": branches,
        "branch_texts": cached_texts,
    }


def table(result: dict) -> str:
    rows = [f"| {'case':<6} | {'prompt tokens':>13} | {'first chunk ms':>14} | {'1 token ms':>10} |"]
    rows.append("|" + "|".join("-" * (w + 2) for w in (6, 13, 14, 10)) + "|")
    for case in CASES:
        tokens, first, whole = (
            result["prompt_tokens"][case],
            result["first_chunk_ms"][case],
            result["one_token_ms"][case],
        )
        rows.append(f"| {case:<6} | {tokens:>13} | {first:>14.2f} | {whole:>10.2f} |")
    r, t, cache = result["ratios"], result["targets"], result["state_cache"]
    rows.append(
        f"cold/hit {r['cold_over_hit']:.2f}, cold/branch {r['cold_over_branch']:.2f} "
        f"(target >= {t['cold_over_hit']:g}); "
        f"hit/alone {r['hit_over_alone']:.2f}, branch/alone {r['branch_over_alone']:.2f} (target <= "
        f"{t['hit_over_alone']:g}); state cache during the run: {cache['hits']} hits "
        f"(expected {cache['expected_hits']}), {cache['misses']} misses; branch greedy text equal to no cache: "
        f"{result.get('greedy_equal_to_no_cache')}"
    )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", default=str(BUNDLED_MODEL))
    source.add_argument("--tiny", action="store_true", help="a tiny random model in a temporary folder")
    parser.add_argument("--repeats", type=int, default=7, help="of each case, streamed and not")
    parser.add_argument("--short-tokens", type=int, default=20, help="the short prompt and the suffix, roughly")
    parser.add_argument("--long-tokens", type=int, default=2000, help="the long prompt, roughly")
    parser.add_argument("--no-save", action="store_true", help="print only; do not write benchmarks/results/")
    parser.add_argument("--server-threads", type=int, default=None, help="the server's --threads")
    parser.add_argument("--backend", choices=("torch", "onnx"), default="torch", help="with onnx, --model is an export")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")

    # twice the prompt lengths asked for: the words per token are an estimate, the server must not refuse the prompt
    extra = ("--max-prompt-tokens", str(2 * (args.long_tokens + args.short_tokens)), "--backend", args.backend)
    with tempfile.TemporaryDirectory() as tmp:
        model = str(tiny_model(Path(tmp))) if args.tiny else args.model
        with own_server(model, 1, CHECK_TOKENS, args.server_threads, extra) as (url, _):
            result = measure(url, args)
        with own_server(model, 1, CHECK_TOKENS, args.server_threads, extra + ("--state-cache-bytes", "0")) as (url, _):
            result["greedy_equal_to_no_cache"] = greedy_texts(url, result["branch_prompts"]) == result["branch_texts"]
    result["meets_targets"] = result["meets_targets"] and result["greedy_equal_to_no_cache"]
    result["settings"]["backend"] = args.backend
    print(table(result))
    print(json.dumps(result, indent=2))
    if not (args.tiny or args.no_save):
        print(f"wrote {save('ttft', result)}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
