"""Prometheus metrics of the server, written in the text exposition format (version 0.0.4) by hand.

Hand-written rather than `prometheus_client`: the server needs five counters and four histograms, which is less
code than the dependency's setup. Every update takes one lock, so the engine thread and the event loop can both
record; a scrape renders a consistent snapshot.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(labels: tuple[tuple[str, str], ...]) -> str:
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels) + "}" if labels else ""


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


class Counter:
    def __init__(self, name: str, help_text: str):
        self.name, self.help, self.values = name, help_text, {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        self.values[key] = self.values.get(key, 0) + amount

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        values = self.values or {(): 0}
        lines += [f"{self.name}{_labels(k)} {_number(v)}" for k, v in sorted(values.items())]
        return lines


class Histogram:
    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...]):
        self.name, self.help, self.buckets = name, help_text, buckets
        self.counts, self.sum, self.count = [0] * len(buckets), 0.0, 0

    def observe(self, value: float) -> None:
        for i, upper in enumerate(self.buckets):
            if value <= upper:
                self.counts[i] += 1
        self.sum += value
        self.count += 1

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        lines += [f'{self.name}_bucket{{le="{_number(b)}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        lines += [f'{self.name}_bucket{{le="+Inf"}} {self.count}', f"{self.name}_sum {_number(self.sum)}"]
        return lines + [f"{self.name}_count {self.count}"]


class Metrics:
    """The server's metrics. `gauges` are read at scrape time (queue depth, active sequences), never stored."""

    def __init__(self, gauges: dict[str, tuple[str, Callable[[], float]]] | None = None):
        self._lock = threading.Lock()
        self.gauges = gauges or {}
        self.requests = Counter("itera_http_requests_total", "HTTP requests answered, by path and status code.")
        self.prompt_tokens = Counter("itera_prompt_tokens_total", "Prompt tokens prefilled.")
        self.generated_tokens = Counter("itera_generated_tokens_total", "Tokens generated (all choices).")
        self.completions = Counter("itera_completions_total", "Completion requests ended, by outcome.")
        self.state_lookups = Counter("itera_state_cache_lookups_total", "Prefix state cache lookups, by outcome.")
        self.latency = Histogram(
            "itera_request_latency_seconds", "Completion latency, arrival to last token.", LATENCY_BUCKETS
        )
        self.first_token = Histogram(
            "itera_time_to_first_token_seconds", "Arrival to the first generated token.", LATENCY_BUCKETS
        )
        self.batch_size = Histogram("itera_decode_batch_size", "Sequences in each batched decode step.", BATCH_BUCKETS)
        self.prefill_size = Histogram(
            "itera_prefill_batch_size", "Prompts in each prefill forward (fresh prompts share one).", BATCH_BUCKETS
        )

    def count_request(self, path: str, status: int) -> None:
        with self._lock:
            self.requests.inc(path=path, status=str(status))

    def count_prompt(self, tokens: int) -> None:
        with self._lock:
            self.prompt_tokens.inc(tokens)

    def state_lookup(self, hit: bool) -> None:
        with self._lock:
            self.state_lookups.inc(outcome="hit" if hit else "miss")

    def decode_step(self, batch: int) -> None:
        with self._lock:
            self.batch_size.observe(batch)

    def prefill_batch(self, prompts: int) -> None:
        with self._lock:
            self.prefill_size.observe(prompts)

    def tokens(self, count: int) -> None:
        with self._lock:
            self.generated_tokens.inc(count)

    def first_token_after(self, seconds: float) -> None:
        with self._lock:
            self.first_token.observe(seconds)

    def completion(self, outcome: str, seconds: float | None = None) -> None:
        with self._lock:
            self.completions.inc(outcome=outcome)
            if seconds is not None:
                self.latency.observe(seconds)

    def render(self) -> str:
        with self._lock:
            metrics = (self.requests, self.completions, self.prompt_tokens, self.generated_tokens, self.state_lookups)
            lines = [line for metric in metrics for line in metric.render()]
            for hist in (self.latency, self.first_token, self.batch_size, self.prefill_size):
                lines += hist.render()
        for name, (help_text, read) in self.gauges.items():
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name} {_number(read())}"]
        return "\n".join(lines) + "\n"
