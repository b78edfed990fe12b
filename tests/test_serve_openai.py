"""The completions API as OpenAI's own client and lm-eval use it: logprobs, echo, token-id prompts, logit_bias,
penalties and the usage chunk, against the server on 127.0.0.1 (the tiny model of `test_serve`)."""

from __future__ import annotations

import json
import math
from collections import Counter

import httpx
import pytest
import torch
from transformers import AutoTokenizer

from modeling_itera import IteraLiteForCausalLM
from serve.sampling import Penalties, adjust_logits
from tests import test_serve
from tests.test_serve import complete

# The tiny model and its server, as module fixtures of this file too (one server per module).
model_dir, backend, server, url = test_serve.model_dir, test_serve.backend, test_serve.server, test_serve.url

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def lm(model_dir):
    return IteraLiteForCausalLM.from_pretrained(model_dir).eval()


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


def model_logprobs(lm, ids: list[int]) -> torch.Tensor:
    """(l, v) log-probabilities of the next token at every position, from a plain forward."""
    with torch.no_grad():
        return lm(torch.tensor([ids])).logits[0].log_softmax(-1)


def greedy_ids(url: str, prompt, max_tokens: int = 8, **extra) -> dict:
    return complete(url, prompt=prompt, max_tokens=max_tokens, temperature=0, ignore_eos=True, **extra)


def test_echo_with_logprobs_scores_the_prompt_as_the_model_does(url, lm):
    ids = [1, 40, 41, 42, 43, 44]
    body = complete(url, prompt=ids, max_tokens=0, echo=True, logprobs=0)
    [choice] = body["choices"]
    lp = choice["logprobs"]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None and len(lp["tokens"]) == len(ids)
    expected = model_logprobs(lm, ids)[:-1].gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1)
    torch.testing.assert_close(torch.tensor(lp["token_logprobs"][1:]), expected, atol=1e-4, rtol=1e-4)
    assert body["usage"] == {"prompt_tokens": 6, "completion_tokens": 0, "total_tokens": 6}
    assert choice["finish_reason"] == "length"


def test_generated_logprobs_are_the_models_and_top_logprobs_rank_them(url, lm, tokenizer):
    prompt = [1, 40, 41]
    lp = greedy_ids(url, prompt, max_tokens=6, logprobs=3)["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 6
    for logprob, top in zip(lp["token_logprobs"], lp["top_logprobs"]):
        assert 3 <= len(top) <= 4 and logprob == pytest.approx(max(top.values()))  # greedy: the best token
        assert sum(math.exp(v) for v in top.values()) <= 1 + 1e-5
    assert lp["token_logprobs"][0] == pytest.approx(model_logprobs(lm, prompt)[-1].max().item(), abs=1e-4)
    # Offsets count from the start of the prompt (not echoed here), each token adding its text's length.
    assert lp["text_offset"][0] == len(tokenizer.decode(prompt, skip_special_tokens=True))
    steps = [b - a for a, b in zip(lp["text_offset"], lp["text_offset"][1:])]
    assert all(step in (0, len(t)) for step, t in zip(steps, lp["tokens"])) and sum(steps) > 0


def test_echo_offsets_index_the_returned_text(url):
    body = greedy_ids(url, "The dog ran", max_tokens=4, echo=True, logprobs=1)
    [choice] = body["choices"]
    lp, text = choice["logprobs"], choice["text"]
    assert text.startswith("The dog ran") and lp["tokens"][0] == "<s>" and lp["token_logprobs"][0] is None
    assert len(lp["tokens"]) == body["usage"]["prompt_tokens"] + 4
    prompt = slice(1, body["usage"]["prompt_tokens"])  # ASCII tokens, each one its own text
    for token, offset in zip(lp["tokens"][prompt], lp["text_offset"][prompt]):
        assert text[offset : offset + len(token)] == token
    assert lp["text_offset"][body["usage"]["prompt_tokens"]] == len("The dog ran")


def test_token_id_prompts_and_lists_of_them_equal_their_text(url, tokenizer):
    text = greedy_ids(url, "The dog")["choices"][0]["text"]
    ids = tokenizer.encode("The dog")
    assert greedy_ids(url, ids)["choices"][0]["text"] == text
    both = greedy_ids(url, [ids, ids[:2]])
    assert [c["index"] for c in both["choices"]] == [0, 1] and both["choices"][0]["text"] == text
    assert greedy_ids(url, ids, max_tokens=1, echo=True)["choices"][0]["text"].startswith("The dog")


def test_logit_bias_forces_and_bans_tokens(url, lm, tokenizer):
    ids = [1, 40, 41]
    a = tokenizer.convert_tokens_to_ids("a")
    forced = greedy_ids(url, ids, logprobs=0, logit_bias={str(a): 100})["choices"][0]["logprobs"]
    assert forced["tokens"] == ["a"] * 8
    logp = model_logprobs(lm, ids)[-1]
    best, second = logp.topk(2).indices.tolist()
    banned = greedy_ids(url, ids, max_tokens=1, logprobs=0, logit_bias={str(best): -100})["choices"][0]["logprobs"]
    # The runner-up was chosen, and its logprob is the model's own (logprobs are taken before the bias).
    assert banned["token_logprobs"] == [pytest.approx(logp[second].item(), abs=1e-4)]


def test_penalties_follow_openais_formula():
    logits = torch.zeros(2, 10)
    counts = [Counter({3: 2, 5: 1}), Counter({3: 2})]
    penalties = [Penalties(frequency=0.5, presence=1.0, logit_bias={7: 2.0}), Penalties()]
    out = adjust_logits(logits, penalties, counts)
    expected = torch.zeros(2, 10)
    expected[0, 3], expected[0, 5], expected[0, 7] = -(0.5 * 2 + 1.0), -(0.5 + 1.0), 2.0
    torch.testing.assert_close(out, expected)
    assert adjust_logits(logits, [Penalties()] * 2, counts) is logits  # nothing to do: no copy


def test_a_frequency_penalty_breaks_greedy_repetition(url):
    body = dict(prompt=[1, 40, 41], max_tokens=40, logprobs=0)
    repeats = Counter(greedy_ids(url, **body)["choices"][0]["logprobs"]["tokens"]).most_common(1)[0][1]
    penalized = greedy_ids(url, frequency_penalty=2.0, **body)["choices"][0]["logprobs"]["tokens"]
    assert Counter(penalized).most_common(1)[0][1] < repeats or repeats == 1


def test_the_openai_client_gets_logprobs_echo_and_token_prompts(client, url):
    out = client.completions.create(model="tiny", prompt="The dog", max_tokens=5, temperature=0, logprobs=2)
    [choice] = out.choices
    assert len(choice.logprobs.tokens) == out.usage.completion_tokens and len(choice.logprobs.top_logprobs[0]) >= 2
    echoed = client.completions.create(model="tiny", prompt=[[1, 40, 41]], max_tokens=0, echo=True, logprobs=1)
    assert echoed.choices[0].logprobs.token_logprobs[0] is None and len(echoed.choices[0].logprobs.tokens) == 3
    biased = client.completions.create(
        model="tiny", prompt="The dog", max_tokens=3, temperature=0, logit_bias={"67": 100}, presence_penalty=0.5
    )
    assert biased.choices[0].text == "aaa"  # id 67 is "a" in the byte-level alphabet


def test_the_openai_client_streams_logprobs_and_the_usage_chunk(client):
    chunks = list(
        client.completions.create(
            model="tiny",
            prompt="The dog",
            max_tokens=6,
            temperature=0,
            logprobs=1,
            echo=True,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert all(c.usage is None for c in chunks[:-1])
    text = "".join(c.choices[0].text for c in chunks[:-1])
    tokens = [t for c in chunks[:-1] for t in c.choices[0].logprobs.tokens]
    same = dict(model="tiny", prompt="The dog", max_tokens=6, temperature=0, logprobs=1, echo=True)
    whole = client.completions.create(**same, extra_body={"ignore_eos": True})
    assert text == whole.choices[0].text and tokens == whole.choices[0].logprobs.tokens
    assert tokens[0] == "<s>" and chunks[0].choices[0].logprobs.token_logprobs[0] is None


def test_the_exact_json_of_a_streamed_chunk_with_logprobs(url):
    body = {"prompt": [1, 40], "max_tokens": 2, "temperature": 0, "ignore_eos": True, "logprobs": 0, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
        lines = [line.removeprefix("data: ") for line in response.iter_lines() if line]
    assert lines[-1] == "[DONE]"
    chunk = json.loads(lines[0])
    assert set(chunk) == {"id", "object", "created", "model", "choices"}  # no usage field without include_usage
    [choice] = chunk["choices"]
    assert set(choice) == {"text", "index", "logprobs", "finish_reason"}
    assert set(choice["logprobs"]) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}


def test_a_text_prompt_that_starts_with_bos_gets_no_second_one(url, tokenizer):
    """lm-eval's local-completions sends the decoded `<s>` + story: the story is still scored after one `<s>`."""
    once = complete(url, prompt="<s>The dog", max_tokens=0, echo=True, logprobs=0)
    assert once["usage"]["prompt_tokens"] == len(tokenizer.encode("The dog"))
    assert once["choices"][0]["logprobs"]["tokens"][:2] == ["<s>", "The"]


def test_a_generated_eos_has_its_logprob_entry(url, tokenizer):
    """lm-eval takes the last entry as the generated token: an EOS must be listed, or a prompt token is lost."""
    eos = tokenizer.eos_token_id
    body = complete(url, prompt=[1, 40, 41], max_tokens=4, logprobs=0, logit_bias={str(eos): 100})
    [choice] = body["choices"]
    assert choice["finish_reason"] == "stop" and choice["text"] == "" and body["usage"]["completion_tokens"] == 1
    assert choice["logprobs"]["tokens"] == ["</s>"] and len(choice["logprobs"]["token_logprobs"]) == 1
