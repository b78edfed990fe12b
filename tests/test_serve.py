"""The HTTP server over real HTTP on 127.0.0.1: completions, streaming, continuous batching, limits and errors.

The model is tiny and random (no checkpoint needed); its init is widened so that greedy decoding does not repeat
one token, which would make "batched equals alone" trivially true.

Every test that takes the `backend` fixture (through `server`, `url`, ...) runs against both backends: the model in
PyTorch and its fp32 ONNX export in onnxruntime (exported once per test session, ~30 s).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from modeling_itera import IteraLiteConfig, IteraLiteForCausalLM
from serve import Limits, create_app
from serve.__main__ import main, parse_args
from serve.model import load
from serve.onnx_model import load_onnx
from serve.sampling import SamplingParams, filter_probs
from serve.text import TextStream
from tests.conftest import TINY
from training.tokenizer import train_tokenizer

TEXTS = [
    "Once upon a time there was a little cat who liked to play in the sun.",
    "The dog ran to the park and found a big red ball under a tree.",
    "Lily and Tom went to the sea. They saw a boat and a fish.",
] * 10
PROMPTS = ["Once upon a time", "The dog", "Lily and Tom went", "a big red", "They saw", "The sun"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-itera")
    torch.manual_seed(0)  # module fixtures are built before the autouse per-test seed
    tokenizer = train_tokenizer(TEXTS, vocab_size=300)
    config = IteraLiteConfig(**{**TINY, "vocab_size": len(tokenizer), "initializer_range": 0.5})
    IteraLiteForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


HAVE_ONNX = all(importlib.util.find_spec(m) for m in ("onnxruntime", "onnxscript"))
BACKENDS = ["torch", pytest.param("onnx", marks=pytest.mark.skipif(not HAVE_ONNX, reason="no [onnx] extra"))]
EXPORTS: dict[str, Path] = {}  # the fp32 export of each tiny model (by its files' hash): one export per session


@dataclass(frozen=True)
class Backend:
    name: str  # "torch" or "onnx"
    folder: Path  # the model folder, or its ONNX export


def onnx_export(model_dir: Path, tmp_path_factory) -> Path:
    from modeling_itera.export import export

    digest = hashlib.sha256(b"".join((model_dir / f).read_bytes() for f in ("model.safetensors", "tokenizer.json")))
    if digest.hexdigest() not in EXPORTS:
        EXPORTS[digest.hexdigest()] = export(model_dir, tmp_path_factory.mktemp("tiny-onnx"))
    return EXPORTS[digest.hexdigest()]


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request, model_dir, tmp_path_factory) -> Backend:
    if request.param == "torch":
        return Backend("torch", model_dir)
    return Backend("onnx", onnx_export(model_dir, tmp_path_factory))


class Server:
    """uvicorn in a thread, on a socket bound to an ephemeral loopback port."""

    def __init__(self, app):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.app = app
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def start(backend: Backend, compile: bool = False, api_key: str | None = None, **limits):
    if backend.name == "onnx":
        model, tokenizer = load_onnx(backend.folder)
    else:
        model, tokenizer = load(backend.folder)
    app = create_app(model, tokenizer, Limits(**limits), model_name="tiny", compile=compile, api_key=api_key)
    return Server(app)


@pytest.fixture(scope="module")
def server(backend):
    limits = dict(max_batch_size=8, max_prompt_tokens=32, max_new_tokens=48, queue_size=16, request_timeout=30)
    with start(backend, **limits) as server:
        yield server


@pytest.fixture(scope="module")
def url(server):
    return server.url


@pytest.fixture(scope="module")
def small_url(backend):
    """One slot, one waiting place and a 1 s timeout: a burst overflows it, a long request times out."""
    limits = dict(max_batch_size=1, max_prompt_tokens=32, max_new_tokens=100_000, queue_size=1, request_timeout=1.0)
    with start(backend, **limits) as server:
        yield server.url


def complete(url: str, **body) -> dict:
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def greedy(url: str, prompt: str, max_tokens: int = 24, **extra) -> str:
    """The text of exactly `max_tokens` greedy tokens (a random model may emit EOS anywhere)."""
    body = complete(url, prompt=prompt, max_tokens=max_tokens, temperature=0, ignore_eos=True, **extra)
    return body["choices"][0]["text"]


def batch_steps(url: str) -> tuple[int, int]:
    """(decode steps so far, of which with a batch of 1), from /metrics."""
    text = httpx.get(f"{url}/metrics").text
    ones = re.search(r'^itera_decode_batch_size_bucket\{le="1"\} (\d+)$', text, re.M)
    total = re.search(r"^itera_decode_batch_size_count (\d+)$", text, re.M)
    return int(total.group(1)), int(ones.group(1))


def test_a_completion_has_the_openai_shape(url):
    body = complete(url, prompt="Once upon a time", max_tokens=5, temperature=0)
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-") and body["model"] == "tiny"
    [choice] = body["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] in ("length", "stop") and choice["text"]
    usage = body["usage"]
    assert 1 <= usage["completion_tokens"] <= 5 and usage["prompt_tokens"] > 1
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_a_stream_arrives_event_by_event_and_adds_up_to_the_completion(url):
    events = []
    body = {"prompt": "Once upon a time", "max_tokens": 24, "temperature": 0, "ignore_eos": True, "stream": True}
    body["stream_options"] = {"include_usage": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line:
                assert line.startswith("data: ")
                events.append(line.removeprefix("data: "))
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len(chunks) > 3 and {c["object"] for c in chunks} == {"text_completion"}
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert text == greedy(url, "Once upon a time")
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 24


def test_concurrent_greedy_requests_equal_the_same_prompts_run_alone(url):
    alone = [greedy(url, p) for p in PROMPTS]
    steps_before, ones_before = batch_steps(url)
    barrier = threading.Barrier(len(PROMPTS))

    def together(prompt):
        barrier.wait()
        return greedy(url, prompt)

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        batched = list(pool.map(together, PROMPTS))
    assert batched == alone
    steps, ones = batch_steps(url)
    assert steps - steps_before > ones - ones_before, "no decode step ran more than one sequence"


def test_the_compiled_decode_step_serves_the_same_greedy_text_alone_and_batched(url, backend):
    if backend.name != "torch":
        pytest.skip("compile applies to the PyTorch backend (test_both_backends_serve_the_same_greedy_text)")
    alone = [greedy(url, p) for p in PROMPTS]  # the eager server
    limits = dict(max_batch_size=8, max_prompt_tokens=32, max_new_tokens=48, queue_size=16, request_timeout=120)
    with start(backend, compile=True, **limits) as compiled:
        assert [greedy(compiled.url, p) for p in PROMPTS] == alone
        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            assert list(pool.map(lambda p: greedy(compiled.url, p), PROMPTS)) == alone


@pytest.mark.skipif(not HAVE_ONNX, reason="no [onnx] extra")
def test_both_backends_serve_the_same_greedy_text(model_dir, tmp_path_factory):
    """The fp32 export gives PyTorch's greedy tokens: prompts shorter and longer than a chunk (8 tokens), from zero
    and resumed from the prefix cache (whole chunks in the prefill graph, the rest in decode steps), streamed."""
    limits = dict(max_batch_size=8, max_prompt_tokens=128, max_new_tokens=48, queue_size=16, request_timeout=60)
    onnx = Backend("onnx", onnx_export(model_dir, tmp_path_factory))
    prompts = PROMPTS + [TEXTS[0], TEXTS[0] + " " + TEXTS[1], TEXTS[1] + " The cat"]
    texts = {}
    for backend in (Backend("torch", model_dir), onnx):
        with start(backend, **limits) as server:
            texts[backend.name] = [greedy(server.url, p, max_tokens=40) for p in prompts + prompts]
            with ThreadPoolExecutor(len(prompts)) as pool:
                texts[backend.name] += list(pool.map(lambda p: greedy(server.url, p, max_tokens=40), prompts))
            assert server.app.state.engine.state_cache.hits >= len(prompts)  # the repeats resumed from states
    assert texts["onnx"] == texts["torch"] and len(set(texts["torch"])) > len(PROMPTS)


def test_a_stop_string_ends_the_text_before_it(url):
    text = greedy(url, "The dog")
    stop = next(text[i : i + 2] for i in range(3, len(text) - 2) if "\ufffd" not in text[i : i + 2])
    body = complete(url, prompt="The dog", max_tokens=24, temperature=0, ignore_eos=True, stop=[stop, "never-seen"])
    assert body["choices"][0] == {
        "text": text[: text.index(stop)],
        "index": 0,
        "logprobs": None,
        "finish_reason": "stop",
    }


def test_seeded_sampling_repeats_and_n_gives_distinct_choices(url):
    request = dict(prompt=["The dog", "The sun"], max_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=7, n=2)
    first, second = complete(url, **request), complete(url, **request)
    assert first["choices"] == second["choices"]
    assert [c["index"] for c in first["choices"]] == [0, 1, 2, 3]
    assert len({c["text"] for c in first["choices"]}) > 1


BAD_REQUESTS = {
    "empty prompt": ({"prompt": ""}, "prompt"),
    "blank prompt": ({"prompt": "   "}, "prompt"),
    "no prompt": ({"max_tokens": 5}, "prompt"),
    "token id outside the vocabulary": ({"prompt": [1, 2, 10**6]}, "prompt"),
    "empty token-id prompt": ({"prompt": [[1, 2], []]}, "prompt"),
    "a bool as a token id": ({"prompt": [True, 2]}, "prompt"),
    "max_tokens 0 without echo": ({"prompt": "a", "max_tokens": 0}, "max_tokens"),
    "max_tokens negative": ({"prompt": "a", "max_tokens": -1}, "max_tokens"),
    "max_tokens too large": ({"prompt": "a", "max_tokens": 49}, "max_tokens"),
    "max_tokens a string": ({"prompt": "a", "max_tokens": "ten"}, "max_tokens"),
    "negative temperature": ({"prompt": "a", "temperature": -0.5}, "temperature"),
    "top_p 0": ({"prompt": "a", "top_p": 0}, "top_p"),
    "unknown field": ({"prompt": "a", "max_token": 5}, "max_token"),
    "n above the batch": ({"prompt": "a", "n": 9}, "n"),
    "prompt too long": ({"prompt": "the cat " * 40}, "prompt"),
    "five stop strings": ({"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    "logprobs 6": ({"prompt": "a", "logprobs": 6}, "logprobs"),
    "presence_penalty 3": ({"prompt": "a", "presence_penalty": 3}, "presence_penalty"),
    "logit_bias key not an id": ({"prompt": "a", "logit_bias": {"cat": 1}}, "logit_bias"),
    "logit_bias over 100": ({"prompt": "a", "logit_bias": {"5": 101}}, "logit_bias"),
    "logit_bias id outside the vocabulary": ({"prompt": "a", "logit_bias": {"99999": 1}}, "logit_bias"),
    "suffix": ({"prompt": "a", "suffix": "end"}, "suffix"),
    "body not an object": ([1, 2], None),
}


@pytest.mark.parametrize("body, param", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_a_bad_request_gets_a_400_that_names_the_problem(url, body, param):
    response = httpx.post(f"{url}/v1/completions", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]
    assert param is None or param in error["message"]


def test_a_body_that_is_not_json_gets_a_400_and_the_server_lives_on(url):
    response = httpx.post(f"{url}/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]
    assert httpx.get(f"{url}/health").json()["status"] == "ok"


@pytest.mark.parametrize(
    "content",
    [b'{"prompt": "caf\xe9"}', b"\xff\xfe{}", b'{"prompt": "a", "max_tokens": 1e999}'],
    ids=["latin-1 byte in a string", "not UTF-8 at all", "a number that overflows"],
)
def test_bytes_that_are_not_a_valid_request_get_a_400_and_the_server_lives_on(url, content):
    response = httpx.post(f"{url}/v1/completions", content=content, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["message"]
    assert httpx.post(f"{url}/v1/completions", json={"prompt": "the cat", "max_tokens": 2}).status_code == 200


def test_a_failing_decode_step_answers_500_and_the_engine_lives_on(server):
    model = server.app.state.engine.model
    forward = model.forward

    def fails_on_decode(input_ids, **kwargs):
        if input_ids.shape[1] == 1:
            raise RuntimeError("injected failure")
        return forward(input_ids, **kwargs)

    model.forward = fails_on_decode
    try:
        response = httpx.post(
            f"{server.url}/v1/completions", json={"prompt": "The dog", "max_tokens": 5, "ignore_eos": True}, timeout=60
        )
    finally:
        del model.forward
    assert response.status_code == 500 and response.json()["error"]["type"] == "server_error"
    assert complete(server.url, prompt="The dog", max_tokens=5)["usage"]["completion_tokens"] >= 1


def test_health_and_metrics(url):
    complete(url, prompt="The sun", max_tokens=3)
    assert httpx.get(f"{url}/health").json() == {
        "status": "ok",
        "model": "tiny",
        "active_sequences": 0,
        "queued_requests": 0,
    }
    response = httpx.get(f"{url}/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert re.search(r'^itera_http_requests_total\{path="/v1/completions",status="200"\} [1-9]', text, re.M)
    assert re.search(r"^itera_generated_tokens_total [1-9]", text, re.M)
    assert re.search(r'^itera_request_latency_seconds_bucket\{le="\+Inf"\} [1-9]', text, re.M)


def test_a_burst_beyond_the_queue_gets_429(small_url):
    def post(_):
        return httpx.post(
            f"{small_url}/v1/completions", json={"prompt": "The dog", "max_tokens": 200, "ignore_eos": True}, timeout=60
        )

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(post, range(8)))
    statuses = [r.status_code for r in responses]
    assert statuses.count(429) >= 1 and set(statuses) <= {200, 429, 504}, statuses
    rejected = next(r for r in responses if r.status_code == 429)
    assert rejected.json()["error"]["type"] == "rate_limit_exceeded" and rejected.headers["retry-after"]


def test_a_request_past_the_timeout_gets_504_and_frees_its_slot(small_url):
    started = time.monotonic()
    response = httpx.post(
        f"{small_url}/v1/completions", json={"prompt": "a", "max_tokens": 100_000, "ignore_eos": True}, timeout=60
    )
    assert response.status_code == 504 and response.json()["error"]["type"] == "timeout"
    assert time.monotonic() - started < 10
    assert complete(small_url, prompt="a", max_tokens=2)["usage"]["completion_tokens"] <= 2


def outcomes(url: str) -> dict[str, int]:
    found = re.findall(r'^itera_completions_total\{outcome="(\w+)"\} (\d+)$', httpx.get(f"{url}/metrics").text, re.M)
    return {name: int(count) for name, count in found}


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_a_client_that_hangs_up_frees_its_slot_at_once(small_url, stream):
    before = outcomes(small_url)
    body = {"prompt": "a", "max_tokens": 100_000, "ignore_eos": True, "stream": stream}
    if stream:
        with httpx.stream("POST", f"{small_url}/v1/completions", json=body, timeout=5) as response:
            assert next(response.iter_lines()).startswith("data: ")  # leaving the block closes the connection
    else:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{small_url}/v1/completions", json=body, timeout=0.3)
    deadline = time.monotonic() + 5
    while outcomes(small_url).get("cancelled", 0) == before.get("cancelled", 0):
        assert time.monotonic() < deadline, "the engine did not notice the client leaving"
        time.sleep(0.05)
    assert outcomes(small_url).get("timeout", 0) == before.get("timeout", 0)


class ByteTokenizer:
    """Each id is one byte: enough to split characters and stop strings across tokens."""

    def decode(self, ids, **kwargs):
        return bytes(ids).decode("utf-8", errors="replace")


def stream_text(text: str, stop: list[str]) -> tuple[list[str], TextStream]:
    stream = TextStream(ByteTokenizer(), stop)
    deltas = [stream.add(b) for b in text.encode()]
    return deltas + [stream.finish()], stream


def test_text_stream_holds_back_split_characters_and_stop_strings():
    deltas, stream = stream_text("ab€cd<|eXend", stop=["<|end"])
    assert "".join(deltas) == "ab€cd<|eXend" and not stream.stopped
    assert "\ufffd" not in "".join(deltas[:-1])  # the 3 bytes of € were released together
    deltas, stream = stream_text("ab<|en<|end|>tail", stop=["<|end"])
    assert "".join(deltas) == "ab<|en" and stream.stopped


SAMPLING = [
    SamplingParams(0.7, 0.9, 0),
    SamplingParams(1.3, 1.0, 5),
    SamplingParams(0.5, 0.8, 20),
    SamplingParams(1.0, 0.3, 0),
    SamplingParams(2.0, 0.95, 300),
]


def test_batched_filtering_equals_generates_warpers_row_by_row():
    logits = torch.randn(len(SAMPLING), 1000) * 3
    temperature = torch.tensor([p.temperature for p in SAMPLING])
    weights, order = filter_probs((logits / temperature[:, None]).softmax(-1), SAMPLING)
    ours = torch.zeros_like(logits).scatter(1, order, weights)
    for row, p in enumerate(SAMPLING):
        warped = TemperatureLogitsWarper(p.temperature)(None, logits[row : row + 1])
        warped = TopKLogitsWarper(p.top_k)(None, warped) if p.top_k else warped
        warped = TopPLogitsWarper(p.top_p)(None, warped) if p.top_p < 1 else warped
        torch.testing.assert_close(ours[row] / ours[row].sum(), warped.softmax(-1)[0])


@pytest.mark.parametrize(
    "argv",
    [
        ["--backend", "onnx"],
        ["--backend", "onnx", "--model", "x", "--compile"],
        ["--backend", "onnx", "--dtype", "bfloat16"],
    ],
    ids=["no export folder", "compile", "dtype"],
)
def test_the_onnx_backend_refuses_what_it_cannot_honour(argv, capsys):
    with pytest.raises(SystemExit):
        parse_args(argv)
    err = capsys.readouterr().err
    assert "--backend onnx" in err or "apply to --backend torch only" in err


def test_a_folder_that_is_not_an_export_is_a_clear_error(model_dir, capsys):
    assert main(["--backend", "onnx", "--model", str(model_dir)]) == 2
    assert "not an Itera-Lite ONNX export" in capsys.readouterr().err
