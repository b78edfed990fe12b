"""`/v1/chat/completions` (through the chat template; the story template for a model without one), `/tokenize`
and `/detokenize`, with the official openai client and httpx, against the tiny model's server on 127.0.0.1."""

from __future__ import annotations

import copy
import json

import httpx
import pytest
from transformers import AutoTokenizer

from serve.chat import chat_prompt
from tests import test_serve
from tests.test_serve import complete

openai = pytest.importorskip("openai")

# The tiny model and its server, as module fixtures of this file too (one server per module).
model_dir, backend, server, url = test_serve.model_dir, test_serve.backend, test_serve.server, test_serve.url

STORY = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Once upon a time "},
    {"role": "assistant", "content": "there was a cat."},
    {"role": "user", "content": "The cat"},
]


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def test_the_story_template_joins_the_turns_after_one_bos(tokenizer):
    assert tokenizer.chat_template is None  # the tiny model, like the bundled one, has no template of its own
    assert chat_prompt(tokenizer, STORY) == tokenizer.encode("Once upon a time there was a cat. The cat")
    assert chat_prompt(tokenizer, STORY).count(tokenizer.bos_token_id) == 1


def test_a_tokenizers_own_template_or_the_servers_wins_over_the_story_template(tokenizer):
    own = copy.deepcopy(tokenizer)
    own.chat_template = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
    messages = STORY[1:2]
    assert chat_prompt(own, messages) == own.encode("[user]Once upon a time ", add_special_tokens=False)
    assert chat_prompt(tokenizer, messages, "{{ messages[0]['content'] }}!") == tokenizer.encode(
        "Once upon a time !", add_special_tokens=False
    )


def test_a_chat_reply_continues_the_story_as_a_completion_would(client, url, tokenizer):
    ids = chat_prompt(tokenizer, STORY)
    expected = complete(url, prompt=ids, max_tokens=12, temperature=0, ignore_eos=True)["choices"][0]["text"]
    reply = client.chat.completions.create(
        model="tiny", messages=STORY, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    [choice] = reply.choices
    assert choice.message.role == "assistant" and choice.message.content == expected
    assert choice.finish_reason == "length" and reply.usage.prompt_tokens == len(ids)
    assert reply.usage.completion_tokens == 12


def test_a_streamed_chat_reply_adds_up_to_the_whole_one(client):
    request = dict(model="tiny", messages=STORY, max_completion_tokens=12, temperature=0)
    whole = client.chat.completions.create(**request, extra_body={"ignore_eos": True})
    chunks = list(
        client.chat.completions.create(
            **request, stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True}
        )
    )
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == whole.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == "length" and chunks[-1].usage.completion_tokens == 12


def test_chat_logprobs_are_the_completions_ones_in_openais_chat_form(client, url, tokenizer):
    request = dict(model="tiny", messages=STORY, max_tokens=12, temperature=0, logprobs=True, top_logprobs=2)
    reply = client.chat.completions.create(**request, extra_body={"ignore_eos": True})
    [choice] = reply.choices
    content = choice.logprobs.content
    # the tokens' own bytes add up to the reply (special tokens, which add no text, are left out); the random tiny
    # model writes invalid UTF-8 too, which the reply's text shows as U+FFFD, as any decoder would
    joined = b"".join(bytes(e.bytes) for e in content)
    assert joined.decode("utf-8", errors="replace") == choice.message.content
    assert 0 < len(content) <= 12 and all(len(e.top_logprobs) == 2 for e in content)
    for e in content:  # greedy: the chosen token is the most likely one
        assert e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob
        assert e.logprob == pytest.approx(e.top_logprobs[0].logprob, abs=1e-6)
    # the same numbers as the completions endpoint gives for the same prompt
    ids = chat_prompt(tokenizer, STORY)
    completion = complete(url, prompt=ids, max_tokens=12, temperature=0, ignore_eos=True, logprobs=2)["choices"][0]
    scored, special = completion["logprobs"], set(tokenizer.all_special_tokens)
    kept = [lp for t, lp in zip(scored["tokens"], scored["token_logprobs"]) if t not in special]
    assert [e.logprob for e in content] == pytest.approx(kept, abs=1e-5)

    chunks = list(client.chat.completions.create(**request, stream=True, extra_body={"ignore_eos": True}))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.bytes) for e in streamed] == [(e.token, e.bytes) for e in content]
    plain = client.chat.completions.create(model="tiny", messages=STORY, max_tokens=2)
    assert plain.choices[0].logprobs is None


def test_tokenize_and_detokenize_round_trip(url, tokenizer):
    body = httpx.post(f"{url}/tokenize", json={"prompt": "The dog ran"}).json()
    assert body["tokens"] == tokenizer.encode("The dog ran") and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == 32  # the server's --max-prompt-tokens
    bare = httpx.post(f"{url}/tokenize", json={"prompt": "The dog ran", "add_special_tokens": False}).json()
    assert bare["tokens"] == body["tokens"][1:]
    chat = httpx.post(f"{url}/tokenize", json={"messages": STORY}).json()
    assert chat["tokens"] == chat_prompt(tokenizer, STORY)
    assert httpx.post(f"{url}/detokenize", json={"tokens": bare["tokens"]}).json() == {"prompt": "The dog ran"}


BAD = {
    "no messages": ("/v1/chat/completions", {"messages": []}, "messages"),
    "unknown role": ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "a"}]}, "messages.0.role"),
    "content a number": ("/v1/chat/completions", {"messages": [{"role": "user", "content": 3}]}, "messages.0.content"),
    "chat top_logprobs alone": ("/v1/chat/completions", {"messages": STORY, "top_logprobs": 2}, "top_logprobs"),
    "chat top_logprobs above 5": (
        "/v1/chat/completions",
        {"messages": STORY, "logprobs": True, "top_logprobs": 6},
        "top_logprobs",
    ),
    "chat too long": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "cat " * 40}]}, "messages"),
    "tokenize both": ("/tokenize", {"prompt": "a", "messages": STORY}, "prompt"),
    "tokenize neither": ("/tokenize", {}, "prompt"),
    "detokenize outside the vocabulary": ("/detokenize", {"tokens": [1, 10**6]}, "tokens"),
}


@pytest.mark.parametrize("path, body, param", BAD.values(), ids=BAD.keys())
def test_a_bad_chat_or_tokenize_request_gets_a_400_that_names_the_field(url, path, body, param):
    response = httpx.post(f"{url}{path}", content=json.dumps(body), headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
