"""The model's contract with transformers: cache, generation, save/load, Auto classes, remote code, the checks that
transformers runs on its own models, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, DynamicCache

from modeling_itera import IteraLiteConfig, IteraLiteForCausalLM, IteraLiteModel
from modeling_itera.modeling_itera import cache_nbytes

from .conftest import TINY


def ids(b=2, l=12, vocab=TINY["vocab_size"]):
    return torch.randint(3, vocab, (b, l))


@torch.no_grad()
def test_full_forward_equals_prefill_then_token_by_token_decode(tiny_model):
    x = ids(l=20)
    full = tiny_model(x, use_cache=False).logits
    out = tiny_model(x[:, :9])
    steps, cache = [out.logits], out.cache
    for t in range(9, 20):
        out = tiny_model(x[:, t : t + 1], cache=cache)
        steps.append(out.logits)
        cache = out.cache
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_prompt_in_two_chunks_equals_one_chunk(tiny_model):
    x = ids(l=30)
    full = tiny_model(x).logits
    first = tiny_model(x[:, :13])
    second = tiny_model(x[:, 13:], cache=first.cache)
    torch.testing.assert_close(torch.cat([first.logits, second.logits], 1), full, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_greedy_generate_equals_manual_greedy_loop(tiny_model):
    prompt = ids(b=1, l=5)
    generated = tiny_model.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None)
    seq = prompt
    for _ in range(12):
        next_id = tiny_model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, next_id], 1)
    assert generated.tolist() == seq.tolist()


@torch.no_grad()
@pytest.mark.parametrize("num_beams", [2, 3])
def test_beam_search_with_cache_equals_without(tiny_model, num_beams):
    prompt = ids(b=2, l=4)
    kwargs = dict(max_new_tokens=8, num_beams=num_beams, do_sample=False, eos_token_id=None)
    assert (
        tiny_model.generate(prompt, **kwargs).tolist()
        == tiny_model.generate(prompt, use_cache=False, **kwargs).tolist()
    )


@torch.no_grad()
def test_left_padded_batch_rows_equal_their_unpadded_runs(tiny_model, tiny_config):
    short, long = ids(b=1, l=4), ids(b=1, l=9)
    pad = tiny_config.pad_token_id
    batch = torch.cat([torch.cat([torch.full((1, 5), pad), short], 1), long])
    mask = torch.ones_like(batch)
    mask[0, :5] = 0
    logits = tiny_model(batch, attention_mask=mask).logits
    torch.testing.assert_close(logits[0, 5:], tiny_model(short).logits[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits[1], tiny_model(long).logits[0], rtol=1e-4, atol=1e-5)

    kwargs = dict(max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=pad)
    batched = tiny_model.generate(batch, attention_mask=mask, **kwargs)
    assert batched[0, 5:].tolist() == tiny_model.generate(short, **kwargs)[0].tolist()
    assert batched[1].tolist() == tiny_model.generate(long, **kwargs)[0].tolist()


@torch.no_grad()
def test_generation_continues_from_a_returned_cache_with_only_new_tokens(tiny_model):
    prompt, more = ids(b=1, l=6), ids(b=1, l=3)
    first = tiny_model.generate(
        prompt, max_new_tokens=5, do_sample=False, eos_token_id=None, return_dict_in_generate=True
    )
    # The cache has seen all but the last generated token: pass that token and the new text only.
    new_tokens = torch.cat([first.sequences[:, -1:], more], 1)
    out = tiny_model(new_tokens, cache=first.cache).logits[:, -1]
    full = tiny_model(torch.cat([first.sequences, more], 1), use_cache=False).logits[:, -1]
    torch.testing.assert_close(out, full, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_sampling_is_reproducible_with_a_seed(tiny_model):
    prompt = ids(b=1, l=3)
    torch.manual_seed(7)
    a = tiny_model.generate(prompt, max_new_tokens=10, do_sample=True, top_k=20, temperature=0.9)
    torch.manual_seed(7)
    b = tiny_model.generate(prompt, max_new_tokens=10, do_sample=True, top_k=20, temperature=0.9)
    assert a.tolist() == b.tolist()


@torch.no_grad()
def test_cache_bytes_do_not_grow_with_generated_tokens(tiny_model, tiny_config):
    prompt = ids(b=1, l=4)
    sizes = []
    for n in (1, 10, 100):
        out = tiny_model.generate(
            prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, return_dict_in_generate=True
        )
        sizes.append(cache_nbytes(out.cache))
    per_layer = (tiny_config.intermediate_ssm_size + 2 * tiny_config.state_size) * tiny_config.conv_kernel + (
        tiny_config.num_heads * tiny_config.head_dim * tiny_config.state_size
    )
    assert sizes == [per_layer * 4 * tiny_config.num_hidden_layers] * 3


def test_save_and_load_round_trip_gives_identical_logits(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, IteraLiteForCausalLM)
    x = ids()
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, tiny_model(x).logits)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_itera.IteraLiteConfig",
        "AutoModel": "modeling_itera.IteraLiteModel",
        "AutoModelForCausalLM": "modeling_itera.IteraLiteForCausalLM",
    }
    assert (tmp_path / "generation_config.json").exists()


def test_auto_classes_know_the_model(tiny_config, tmp_path):
    IteraLiteForCausalLM(tiny_config).save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), IteraLiteConfig)
    assert type(AutoModel.from_pretrained(tmp_path)) is IteraLiteModel
    assert type(AutoModelForCausalLM.from_config(tiny_config)) is IteraLiteForCausalLM


def test_remote_code_loads_where_the_package_cannot_be_imported(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    prompt = ids(b=1, l=5)
    expected = tiny_model.generate(prompt, max_new_tokens=6, do_sample=False, eos_token_id=None).tolist()
    script = textwrap.dedent(f"""
        import sys
        sys.modules["modeling_itera"] = None  # any import of the installed package now fails
        import torch
        from transformers import AutoModel, AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        base = AutoModel.from_pretrained({str(tmp_path)!r}, trust_remote_code=True)
        assert type(base).__name__ == "IteraLiteModel"
        out = model.generate(torch.tensor({prompt.tolist()}), max_new_tokens=6, do_sample=False, eos_token_id=None)
        print(out.tolist())
    """)
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HF_MODULES_CACHE": str(tmp_path / "modules")},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == expected


def test_gradient_checkpointing_gives_identical_loss_and_gradients(tiny_config):
    model = IteraLiteForCausalLM(tiny_config).train()
    x = ids()
    loss = model(x, labels=x).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.activation_checkpointing_enable()
    loss_ckpt = model(x, labels=x).loss
    loss_ckpt.backward()
    torch.testing.assert_close(loss_ckpt, loss)
    for name, p in model.named_parameters():
        if name in grads:
            torch.testing.assert_close(p.grad, grads[name], msg=name)


def test_every_weight_is_initialised_from_a_partial_checkpoint(tiny_model, tmp_path):
    from safetensors.torch import load_file, save_file

    tiny_model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    dropped = "model.layers.0.mixer.D"
    kept_A = weights["model.layers.0.mixer.A_log"].clone()
    del weights[dropped]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == {dropped} or set(info["missing_keys"]) == {dropped}
    mixer = loaded.model.layers[0].mixer
    assert torch.equal(mixer.A_log, kept_A)  # a loaded value in a partly loaded module is not overwritten
    assert torch.equal(mixer.D, torch.ones_like(mixer.D))  # the missing one gets its init, not garbage
    for name, p in loaded.named_parameters():
        assert torch.isfinite(p).all(), name


def test_lm_head_is_tied_to_the_embedding_and_stays_tied_after_resize(tiny_model):
    assert tiny_model.lm_head.weight.data_ptr() == tiny_model.model.embed_tokens.weight.data_ptr()
    assert tiny_model.get_input_embeddings() is tiny_model.model.embed_tokens
    tiny_model.resize_token_embeddings(120)
    assert tiny_model.config.vocab_size == 120
    assert tiny_model.lm_head.weight.shape == (120, TINY["hidden_size"])
    assert tiny_model.lm_head.weight.data_ptr() == tiny_model.model.embed_tokens.weight.data_ptr()
    assert tiny_model(torch.tensor([[119, 5]])).logits.shape == (1, 2, 120)


@torch.no_grad()
def test_inputs_embeds_equal_input_ids(tiny_model):
    x = ids()
    embeds = tiny_model.get_input_embeddings()(x)
    torch.testing.assert_close(tiny_model(inputs_embeds=embeds).logits, tiny_model(x).logits)


@torch.no_grad()
def test_tuple_output_equals_dict_output(tiny_model):
    x = ids()
    as_dict = tiny_model(x, labels=x, output_hidden_states=True)
    as_tuple = tiny_model(x, labels=x, output_hidden_states=True, return_dict=False)
    assert isinstance(as_tuple, tuple)
    assert torch.equal(as_tuple[0], as_dict.loss)
    assert len(as_dict.hidden_states) == TINY["num_hidden_layers"] + 1


@torch.no_grad()
def test_batch_rows_equal_single_rows(tiny_model):
    x = ids(b=3, l=10)
    batched = tiny_model(x).logits
    for i in range(3):
        torch.testing.assert_close(batched[i], tiny_model(x[i : i + 1]).logits[0], rtol=1e-4, atol=1e-5)


def test_fp16_load_keeps_decay_and_skip_in_fp32(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    half = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float16)
    mixer = half.model.layers[0].mixer
    assert mixer.A_log.dtype == mixer.D.dtype == mixer.dt_bias.dtype == torch.float32
    assert mixer.in_proj.weight.dtype == torch.float16


# Bad input: a clear ValueError that names what was wrong.


@pytest.mark.parametrize("bad_id", [99, 1000, -1], ids=["vocab_size", "far_above", "negative"])
def test_out_of_range_token_id_names_the_id_and_the_vocabulary(tiny_model, bad_id):
    x = ids(b=1, l=5)
    x[0, 2] = bad_id
    with pytest.raises(ValueError, match=rf"token id {bad_id}.*vocab_size=99"):
        tiny_model(x)


def test_empty_input_is_a_clear_error(tiny_model):
    with pytest.raises(ValueError, match="empty"):
        tiny_model(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="exactly one"):
        tiny_model()


def test_float_input_ids_are_rejected(tiny_model):
    with pytest.raises(ValueError, match="integer token ids"):
        tiny_model(torch.ones(1, 3))


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("num_experts_per_tok", 5, r"num_experts_per_tok must be an int in \[1, num_experts=4\], got 5"),
        ("hidden_size", 0, "hidden_size must be a positive int, got 0"),
        ("head_dim", 48, "head_dim must be a divisor of expand \\* hidden_size = 64, got 48"),
        ("time_step_min", -0.1, "time_step_min must be a finite float > 0"),
        ("moe_layer_offset", 2, r"moe_layer_offset must be an int in \[0, moe_layer_period=2\)"),
        ("router_aux_loss_coef", float("nan"), "router_aux_loss_coef"),
        ("vocab_size", "100", "vocab_size must be a positive int, got '100'"),
    ],
    ids=lambda v: str(v)[:20],
)
def test_invalid_config_is_rejected_at_construction(field, value, message):
    with pytest.raises(ValueError, match=message):
        IteraLiteConfig(**{**TINY, field: value})


def test_config_describes_layout_and_cache(tiny_config):
    assert tiny_config.layers_block_type == ["mlp", "moe"]
    assert tiny_config.layer_types == ["linear_attention"] * 2
    cache = DynamicCache(config=tiny_config)
    assert all(cache.is_linear)
    no_moe = IteraLiteConfig(**{**TINY, "num_experts": 0})
    assert no_moe.layers_block_type == ["mlp", "mlp"]
    model = IteraLiteForCausalLM(no_moe)
    x = ids()
    assert model(x, labels=x).aux_loss is None
