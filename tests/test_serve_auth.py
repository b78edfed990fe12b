"""`--api-key`: every request but `/health` and the page needs `Authorization: Bearer KEY`; the official OpenAI client
gets through with the key and raises `AuthenticationError` without it or with a wrong one."""

from __future__ import annotations

import httpx
import pytest

from serve.__main__ import main, parse_args
from tests import test_serve

openai = pytest.importorskip("openai")

model_dir = test_serve.model_dir
KEY = "sk-itera-test-0123456789"
LIMITS = dict(max_batch_size=4, max_prompt_tokens=32, max_new_tokens=16, queue_size=8, request_timeout=30)


@pytest.fixture(scope="module")
def url(model_dir):
    with test_serve.start(test_serve.Backend("torch", model_dir), api_key=KEY, **LIMITS) as server:
        yield server.url


def client(url: str, key: str):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def test_the_right_key_gets_completions_chat_and_streams(url):
    ai = client(url, KEY)
    assert [m.id for m in ai.models.list()] == ["tiny"]
    done = ai.completions.create(model="tiny", prompt="The dog", max_tokens=4, temperature=0)
    assert done.usage.completion_tokens >= 1
    stream = ai.completions.create(model="tiny", prompt="The dog", max_tokens=4, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == done.choices[0].text
    chat = ai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "a cat"}], max_tokens=3)
    assert chat.choices[0].message.role == "assistant"


@pytest.mark.parametrize(
    "key", ["sk-wrong", KEY[:-1], KEY + "9", KEY.upper()], ids=["wrong", "prefix", "longer", "case"]
)
def test_a_wrong_key_gets_an_authentication_error(url, key):
    with pytest.raises(openai.AuthenticationError) as err:
        client(url, key).completions.create(model="tiny", prompt="The dog", max_tokens=4)
    assert err.value.status_code == 401 and err.value.code == "invalid_api_key"


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"}, {"X-Api-Key": KEY}],
    ids=["none", "no scheme", "basic", "another header"],
)
@pytest.mark.parametrize("method, path", [("POST", "/v1/completions"), ("GET", "/v1/models"), ("GET", "/metrics")])
def test_without_a_bearer_key_every_api_path_answers_401_in_openais_shape(url, headers, method, path):
    response = httpx.request(method, f"{url}{path}", json={"prompt": "a", "max_tokens": 2}, headers=headers)
    assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_api_key" and error["message"]


def test_health_and_the_page_stay_open(url):
    assert httpx.get(f"{url}/health").json()["status"] == "ok"
    assert httpx.get(f"{url}/").status_code == 200
    assert httpx.get(f"{url}/static/app.js").status_code == 200


def test_the_key_comes_from_the_flag_or_the_environment(monkeypatch):
    monkeypatch.setenv("ITERA_API_KEY", "from-env")
    assert parse_args([]).api_key == "from-env"
    assert parse_args(["--api-key", "from-flag"]).api_key == "from-flag"
    monkeypatch.delenv("ITERA_API_KEY")
    assert parse_args([]).api_key is None


def test_an_empty_key_is_refused_before_the_model_loads(monkeypatch, capsys):
    monkeypatch.setenv("ITERA_API_KEY", " ")
    assert main(["--model", "/nonexistent"]) == 2
    assert "API key" in capsys.readouterr().err
