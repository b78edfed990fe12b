"""lm-eval's `local-completions` backend scores the repository's perplexity task through the server as its `hf`
backend scores it on the model itself (the tiny model of `test_serve`, a few stories)."""

from __future__ import annotations

import pytest

from tests import test_serve

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("tenacity")  # lm-eval[api]: what its API backends need
pytest.importorskip("aiohttp")

model_dir, backend = test_serve.model_dir, test_serve.backend
MAX_LENGTH = 2048  # no story of the task is longer: one window each, the same for both backends

STORIES = 6
METRICS = ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none")


def scores(model: str, model_args: str) -> dict:
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=["tinystories_ppl"],
        task_manager=TaskManager(include_path="lm_eval_tasks"),
        limit=STORIES,
        batch_size=1,
        device="cpu",
    )
    return {m: out["results"]["tinystories_ppl"][m] for m in METRICS}


@pytest.fixture(scope="module")
def url(backend):
    with test_serve.start(backend, max_prompt_tokens=MAX_LENGTH, max_new_tokens=8) as server:
        yield server.url


def test_local_completions_through_the_server_agrees_with_hf(url, model_dir):
    # lm-eval's API backends keep 2 tokens of max_length for themselves (windows of max_length - 2), hf none.
    through_server = scores(
        "local-completions",
        f"base_url={url}/v1/completions,tokenizer={model_dir},tokenizer_backend=huggingface,"
        f"tokenized_requests=False,model=tiny,max_length={MAX_LENGTH}",
    )
    on_model = scores("hf", f"pretrained={model_dir},max_length={MAX_LENGTH - 2},add_bos_token=False")
    assert through_server == pytest.approx(on_model, rel=1e-3)
