"""Generation as transformers users drive it: the compiled decode step (one graph, no recompilation, the same tokens
as eager), the prompt checked once, and the argument names users bring from other models."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import CompileConfig, DynamicCache, StaticCache
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging

from modeling_itera import IteraLiteConfig, IteraLiteForCausalLM, generation

from .conftest import TINY

NEW_TOKENS = 256


def left_padded_batch(lengths=(7, 3, 5)):
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = torch.randint(3, TINY["vocab_size"], (n,))
        mask[row, width - n :] = 1
    return ids, mask


@pytest.fixture
def sharp_model() -> IteraLiteForCausalLM:
    """Large random weights: logits that depend strongly on the state, so a wrong state update shows at once (with
    the default init a random model's next token hardly depends on its context)."""
    return IteraLiteForCausalLM(IteraLiteConfig(**{**TINY, "initializer_range": 0.5})).eval()


@torch.no_grad()
@pytest.mark.parametrize("batch", ["batch-1", "left-padded-batch"])
def test_compiled_generation_is_one_graph_without_recompiles_and_equals_eager(sharp_model, batch):
    if batch == "batch-1":
        ids = torch.randint(3, TINY["vocab_size"], (1, 16))
        mask = torch.ones_like(ids)
    else:
        ids, mask = left_padded_batch()
    kwargs = dict(
        attention_mask=mask,
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        do_sample=False,
        return_dict_in_generate=True,
        output_logits=True,
    )
    eager = sharp_model.generate(ids, **kwargs)
    torch._dynamo.reset()
    counters.clear()
    compiled = sharp_model.generate(ids, compile_config=CompileConfig(fullgraph=True), **kwargs)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])  # compiled once, for all 255 steps
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert not counters["recompiles"], dict(counters["recompiles"])
    assert compiled.sequences.tolist() == eager.sequences.tolist()
    torch.testing.assert_close(torch.stack(compiled.logits), torch.stack(eager.logits), rtol=1e-4, atol=1e-4)
    assert isinstance(compiled.cache, type(eager.cache))  # the cache type transformers returns (see the next test)


@torch.no_grad()
def test_compile_config_returns_the_cache_type_transformers_returns(tiny_model):
    """transformers' own generation tests compare a compile_config call under `force_eager` with a plain one: the
    same (DynamicCache) cache comes back, and continuing from it gives the same tokens."""
    ids = torch.randint(3, TINY["vocab_size"], (2, 5))
    kwargs = dict(max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    plain = tiny_model.generate(ids, **kwargs)
    with torch.compiler.set_stance("force_eager"):
        eager = tiny_model.generate(ids, compile_config=CompileConfig(), **kwargs)
    assert type(plain.cache) is DynamicCache
    assert isinstance(eager.cache, DynamicCache) and not isinstance(eager.cache, StaticCache)
    assert eager.sequences.tolist() == plain.sequences.tolist()
    more = dict(max_new_tokens=4, do_sample=False)
    continued = tiny_model.generate(eager.sequences, cache=eager.cache, **more)
    assert continued.tolist() == tiny_model.generate(plain.sequences, cache=plain.cache, **more).tolist()


@torch.no_grad()
def test_compiled_decode_step_of_a_serving_loop_equals_eager(sharp_model):
    ids = torch.randint(3, TINY["vocab_size"], (3, 6))
    steps = {}
    for name, step in (("eager", sharp_model), ("compiled", generation.compiled_decode_step(sharp_model))):
        cache = DynamicCache(config=sharp_model.config)
        token = sharp_model(ids, cache=cache).logits[:, -1:].argmax(-1)
        logits = []
        for _ in range(20):
            logits.append(step(input_ids=token, cache=cache, use_cache=True).logits[:, -1])
            token = logits[-1].argmax(-1, keepdim=True)
        steps[name] = torch.stack(logits)
    torch.testing.assert_close(steps["compiled"], steps["eager"], rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_without_a_cpp_compiler_compiled_generation_warns_once_and_runs_eager(tiny_model, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no g++, clang++ or c++ to be found
    # torch's own patch, undone by torch: monkeypatch's undo would delete the key from the config proxy for good.
    with torch._inductor.config.patch({"cpp.cxx": (None, "no-such-compiler")}):
        check_without_a_cpp_compiler(tiny_model)
    assert torch._inductor.config.cpp.cxx is not None  # the setting is there for the tests that follow


def check_without_a_cpp_compiler(tiny_model):
    assert not generation.have_cpp_compiler()
    ids = torch.randint(3, TINY["vocab_size"], (1, 5))
    eager = tiny_model.generate(ids, max_new_tokens=8, do_sample=False)
    torch._dynamo.reset()
    counters.clear()
    logger = logging.get_logger(generation.__name__)
    logger.warning_once.cache_clear()
    with CaptureLogger(logger) as captured:
        for _ in range(2):
            out = tiny_model.generate(ids, max_new_tokens=8, do_sample=False, compile_config=CompileConfig())
    assert captured.out.count("no C++ compiler") == 1
    assert out.tolist() == eager.tolist()
    assert not counters["stats"]  # nothing was compiled


@torch.no_grad()
def test_generate_checks_the_prompt_once_with_the_same_clear_error(tiny_model):
    bad = torch.tensor([[5, TINY["vocab_size"] + 3]])
    with pytest.raises(ValueError, match=rf"token id {TINY['vocab_size'] + 3}, outside \[0, vocab_size="):
        tiny_model.generate(bad, max_new_tokens=2)
    assert tiny_model.model.skip_token_range_check is False  # generate leaves the forward's check on afterwards
    with pytest.raises(ValueError, match="token id -1"):
        tiny_model(torch.tensor([[3, -1]]))


@torch.no_grad()
@pytest.mark.parametrize("old_name", ["past_key_values", "cache_params"])
def test_old_cache_argument_names_are_deprecated_aliases_of_cache(tiny_model, old_name):
    ids = torch.randint(3, TINY["vocab_size"], (2, 9))
    full = tiny_model(ids).logits
    first = tiny_model(ids[:, :4])
    with pytest.warns(FutureWarning, match=old_name):
        second = tiny_model(ids[:, 4:], **{old_name: first.cache})
    torch.testing.assert_close(second.logits, full[:, 4:], rtol=1e-4, atol=1e-5)
    with pytest.warns(FutureWarning, match=old_name):
        inputs = tiny_model.prepare_inputs_for_generation(ids, **{old_name: first.cache})
    assert inputs["cache"] is first.cache


@torch.no_grad()
def test_output_flags_set_on_the_config_are_honoured(tiny_model):
    ids = torch.randint(3, TINY["vocab_size"], (1, 6))
    tiny_model.config.output_hidden_states = True
    hidden = tiny_model(ids).hidden_states
    assert len(hidden) == TINY["num_hidden_layers"] + 1
    tiny_model.config.return_dict = False
    as_tuple = tiny_model(ids)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], tiny_model(ids, return_dict=True).logits)


def test_have_cpp_compiler_answers_where_the_config_key_was_deleted():
    """What a `monkeypatch.setattr` undo leaves: `cpp.cxx` gone from torch's config. Run apart, so as not to do it
    to this process."""
    script = (
        "from torch._inductor import config\n"
        "from modeling_itera import generation\n"
        "config.cpp.cxx = (None, 'x')\n"
        "del config.cpp.cxx\n"
        "print(generation.have_cpp_compiler())\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() in ("True", "False")
