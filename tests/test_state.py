"""`save_state` / `load_state`: a story stopped, saved, and continued in another process gives the tokens of one
uninterrupted run; a file that is not a state, or a state of another model, gets a clear error."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from modeling_itera import IteraLiteConfig, IteraLiteForCausalLM, load_state, save_state

from .conftest import TINY

GREEDY = dict(do_sample=False, eos_token_id=None, pad_token_id=0)


@pytest.fixture
def varied_model(tmp_path):
    """A random model whose greedy text does not collapse to one repeated token (a wider init)."""
    model = IteraLiteForCausalLM(IteraLiteConfig(**{**TINY, "initializer_range": 0.3})).eval()
    model.save_pretrained(tmp_path / "model")
    return model, tmp_path / "model"


@torch.no_grad()
def test_a_story_continued_in_another_process_equals_one_uninterrupted_run(varied_model, tmp_path):
    model, folder = varied_model
    prompt = torch.tensor([[1, 5, 17, 42, 8, 23]])
    whole = model.generate(prompt, max_new_tokens=16, **GREEDY)
    assert len(set(whole[0, 6:].tolist())) > 3  # the check below means something
    first = model.generate(prompt, max_new_tokens=7, return_dict_in_generate=True, **GREEDY)
    state = tmp_path / "story.safetensors"
    save_state(first.cache, state, first.sequences)

    script = textwrap.dedent(f"""
        import torch
        from modeling_itera import IteraLiteForCausalLM, load_state
        model = IteraLiteForCausalLM.from_pretrained({str(folder)!r}).eval()
        cache, ids = load_state({str(state)!r}, model)
        out = model.generate(ids, cache=cache, max_new_tokens=9, do_sample=False, eos_token_id=None, pad_token_id=0)
        print(out[0].tolist())
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == str(whole[0].tolist())


@torch.no_grad()
def test_a_loaded_state_gives_the_logits_of_the_saved_one(varied_model, tmp_path):
    model, _ = varied_model
    prompt, more = torch.tensor([[1, 5, 17, 42], [1, 9, 9, 3]]), torch.tensor([[7, 8], [30, 31]])
    out = model(prompt, use_cache=True)
    save_state(out.cache, tmp_path / "s.safetensors")
    cache, ids = load_state(tmp_path / "s.safetensors", model)
    assert ids is None
    if hasattr(cache.layers[0], "cumulative_length_linear"):  # transformers >= 5.25 counts the tokens a state has read
        assert cache.get_seq_length() == prompt.shape[1]
    expected = model(torch.cat([prompt, more], 1), use_cache=False).logits[:, -2:]
    torch.testing.assert_close(model(more, cache=cache).logits, expected, rtol=1e-4, atol=1e-5)


def test_bad_state_files_get_errors_that_say_what_is_wrong(varied_model, tmp_path):
    model, _ = varied_model
    with pytest.raises(FileNotFoundError, match="state file not found"):
        load_state(tmp_path / "missing.safetensors", model)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a safetensors file"):
        load_state(tmp_path / "junk.safetensors", model)
    model.save_pretrained(tmp_path / "weights")  # safetensors, but weights, not a state
    with pytest.raises(ValueError, match="not an Itera-Lite state file"):
        load_state(tmp_path / "weights" / "model.safetensors", model)
    other = IteraLiteForCausalLM(IteraLiteConfig(**{**TINY, "state_size": 4})).eval()
    save_state(other(torch.tensor([[1, 2, 3]]), use_cache=True).cache, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="another model"):
        load_state(tmp_path / "other.safetensors", model)
    with pytest.raises(ValueError, match="input_ids must have shape"):
        save_state(model(torch.tensor([[1, 2, 3]]), use_cache=True).cache, tmp_path / "x", torch.tensor([1, 2]))


@torch.no_grad()
def test_generate_given_its_own_cache_back_with_the_whole_sequence_reads_only_the_new_tokens(varied_model):
    """As with a KV cache: `generate(sequences, cache=out.cache)` continues the text, without reading it twice."""
    model, _ = varied_model
    prompt = torch.tensor([[1, 5, 17, 42, 8, 23]])
    whole = model.generate(prompt, max_new_tokens=12, **GREEDY)
    first = model.generate(prompt, max_new_tokens=5, return_dict_in_generate=True, **GREEDY)
    assert model.generate(first.sequences, cache=first.cache, max_new_tokens=7, **GREEDY).tolist() == whole.tolist()
