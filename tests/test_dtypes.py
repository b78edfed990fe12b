"""Half precision and bitsandbytes loading through the standard `from_pretrained` path, on CPU."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from modeling_itera import IteraLiteConfig, IteraLiteForCausalLM
from modeling_itera.defaults import nf4_config

from .conftest import TINY, write_stories

# Widths that fit bitsandbytes' 4-bit CPU kernel (in % 64, out % 32) for the layers that get quantized.
BNB_SHAPES = dict(TINY, hidden_size=64, head_dim=32, intermediate_size=128, moe_intermediate_size=64, vocab_size=128)


@pytest.fixture
def saved(tmp_path):
    model = IteraLiteForCausalLM(IteraLiteConfig(**{**TINY, "initializer_range": 0.2})).eval()
    model.save_pretrained(tmp_path)
    return model, tmp_path


@torch.no_grad()
def stepwise_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits of every position after the first 16, decoded one token at a time through the recurrent state."""
    out = model(ids[:, :16])
    cache, logits = out.cache, []
    for t in range(16, ids.shape[1]):
        logits.append(model(ids[:, t : t + 1], cache=cache).logits[0, -1].float())
    return torch.stack(logits)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_loads_generates_and_does_not_drift_over_2000_tokens(saved, dtype):
    model, folder = saved
    half = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    assert half.model.embed_tokens.weight.dtype == dtype
    ids = torch.randint(3, TINY["vocab_size"], (1, 2000))
    ref, got = stepwise_logits(model, ids), stepwise_logits(half, ids)
    err = (got - ref).abs().amax(-1)
    scale = ref.std().item()
    assert err.mean() < 0.1 * scale  # close (bf16 rounds inputs to 8 bits: single tokens may differ more)
    assert err[-200:].mean() < 2 * err[:200].mean()  # and no drift by token 2000: the state stays in fp32
    assert half.generate(ids[:, :5], max_new_tokens=8, do_sample=False).shape == (1, 13)


def test_recurrent_state_is_kept_in_fp32_under_half_precision(saved):
    _, folder = saved
    half = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    cache = half(torch.tensor([[1, 5, 7]])).cache
    assert cache.layers[0].recurrent_states[0].dtype == torch.float32


needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")


@needs_bnb
@pytest.mark.parametrize(
    "quantization",
    [
        dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16),
        dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True),
        dict(load_in_8bit=True),
    ],
    ids=["nf4", "fp4-double-quant", "int8"],
)
def test_bitsandbytes_loads_generates_saves_and_reloads_on_cpu(tmp_path, quantization):
    model = IteraLiteForCausalLM(IteraLiteConfig(**BNB_SHAPES)).eval()
    model.save_pretrained(tmp_path / "fp32")
    quantized = AutoModelForCausalLM.from_pretrained(
        tmp_path / "fp32", quantization_config=BitsAndBytesConfig(**quantization)
    ).eval()  # the user passes nothing but the config: the model declares what stays unquantized
    kinds = {name: type(m).__name__ for name, m in quantized.named_modules()}
    wanted = "Linear4bit" if quantization.get("load_in_4bit") else "Linear8bitLt"
    assert kinds["model.layers.1.feed_forward.experts.0.gate_up_proj"] == wanted
    assert kinds["model.layers.0.mixer.out_proj"] == wanted
    assert kinds["model.layers.1.feed_forward.router"] == "Linear"
    assert kinds["lm_head"] == "Linear"
    prompt = torch.randint(3, 128, (1, 6))
    generated = quantized.generate(prompt, max_new_tokens=8, do_sample=False)
    quantized.save_pretrained(tmp_path / "quantized")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "quantized").eval()  # no config passed again
    assert type(reloaded.model.layers[0].mixer.out_proj).__name__ == wanted
    assert reloaded.generate(prompt, max_new_tokens=8, do_sample=False).tolist() == generated.tolist()


@needs_bnb
def test_odd_shaped_projections_stay_unquantized(tmp_path):
    """The tiny preset's in_proj (256 -> 1160) does not fit the 4-bit CPU kernel; the model keeps it out."""
    config = IteraLiteConfig(**{**BNB_SHAPES, "head_dim": 16})  # 8 heads: in_proj out = 256 + 16 + 8, not % 32
    model = IteraLiteForCausalLM(config)
    assert "mixer.in_proj" in model.modules_kept_out_of_quantization()
    model.save_pretrained(tmp_path)
    quantized = AutoModelForCausalLM.from_pretrained(
        tmp_path, quantization_config=BitsAndBytesConfig(load_in_4bit=True)
    )
    assert type(quantized.model.layers[0].mixer.in_proj).__name__ == "Linear"
    assert quantized.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False).shape == (1, 7)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_nf4_on_gpu_generates(tmp_path):
    IteraLiteForCausalLM(IteraLiteConfig(**BNB_SHAPES)).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=nf4_config(), device_map="cuda")
    assert model.generate(torch.tensor([[1, 2, 3]], device="cuda"), max_new_tokens=4).shape == (1, 7)


@needs_bnb
def test_qlora_fine_tuning_on_a_4bit_model_through_the_finetune_program(tmp_path):
    """QLoRA: a 4-bit base and LoRA adapters with Trainer, on CPU; the result is a plain fp32 model, adapters merged."""
    from training import finetune

    base = IteraLiteForCausalLM(IteraLiteConfig(**{**BNB_SHAPES, "vocab_size": 300}))
    from training.tokenizer import train_tokenizer

    stories = write_stories(tmp_path / "train.txt")
    train_tokenizer(stories, vocab_size=300).save_pretrained(tmp_path / "base")
    base.save_pretrained(tmp_path / "base")
    out = tmp_path / "qlora"
    argv = ["--model", str(tmp_path / "base"), "--train_file", str(tmp_path / "train.txt"), "--output_dir", str(out)]
    argv += ["--max_steps", "3", "--block_size", "32", "--lora_r", "4", "--load_in_4bit", "true"]
    argv += ["--learning_rate", "1e-2", "--data_cache_dir", str(tmp_path / "cache")]
    metrics = finetune.main(argv)
    assert metrics["global_step"] == 3
    tuned = AutoModelForCausalLM.from_pretrained(out)
    assert tuned.dtype == torch.float32 and type(tuned.model.layers[0].mixer.out_proj).__name__ == "Linear"
    before = dict(base.named_parameters())
    changed = [n for n, p in tuned.named_parameters() if not torch.equal(p, before[n])]
    assert changed and all(any(t in n for t in ("in_proj", "out_proj", "gate_up_proj", "down_proj")) for n in changed)
