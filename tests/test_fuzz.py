"""Random inputs thrown at forward and generate: the process never crashes; it answers, or raises a ValueError
that says what was wrong."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modeling_itera import IteraLiteConfig, IteraLiteForCausalLM

from .conftest import TINY

MODEL = IteraLiteForCausalLM(IteraLiteConfig(**TINY)).eval()
VOCAB = TINY["vocab_size"]
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def model_inputs(draw, max_length=4096):
    batch = draw(st.integers(1, 3))
    length = draw(st.integers(0, max_length))
    low, high = draw(st.sampled_from([(0, VOCAB), (-5, VOCAB), (0, VOCAB + 5)]))
    ids = torch.randint(low, high, (batch, length), generator=torch.Generator().manual_seed(draw(st.integers(0, 99))))
    dtype = draw(st.sampled_from([torch.long, torch.int32, torch.int16, torch.float32, torch.bool]))
    mask = None
    if draw(st.booleans()):
        mask_length = draw(st.sampled_from([length, max(0, length - 1), length + 2]))
        mask = torch.randint(0, 2, (batch, mask_length)).to(
            draw(st.sampled_from([torch.long, torch.bool, torch.float]))
        )
    return ids.to(dtype), mask


def explained(err: ValueError) -> bool:
    message = str(err)
    return any(word in message for word in ("input_ids", "token id", "attention_mask", "empty", "inputs_embeds"))


@FUZZ
@given(model_inputs())
def test_forward_answers_or_explains(inputs):
    ids, mask = inputs
    try:
        with torch.no_grad():
            out = MODEL(input_ids=ids, attention_mask=mask)
    except ValueError as err:
        assert explained(err), err
        return
    assert out.logits.shape == (*ids.shape, VOCAB)
    assert torch.isfinite(out.logits).all()


@FUZZ
@given(model_inputs(max_length=64), st.integers(1, 8), st.booleans())
def test_generate_answers_or_explains(inputs, new_tokens, sample):
    ids, mask = inputs
    try:
        with torch.no_grad():
            out = MODEL.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=sample, pad_token_id=0
            )
    except ValueError as err:
        assert explained(err) or "generat" in str(err) or "length" in str(err), err
        return
    assert out.shape[0] == ids.shape[0] and out.shape[1] <= ids.shape[1] + new_tokens


@FUZZ
@given(st.integers(1, 2), st.integers(1, 300), st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_inputs_embeds_of_any_float_dtype(batch, length, dtype):
    embeds = torch.randn(batch, length, TINY["hidden_size"]).to(dtype)
    with torch.no_grad():
        out = MODEL(inputs_embeds=embeds)
    assert out.logits.shape == (batch, length, VOCAB)


@pytest.mark.parametrize("bad", [torch.randn(2, 3, 5), torch.zeros(0, 4, TINY["hidden_size"])], ids=["width", "empty"])
def test_bad_inputs_embeds_are_explained(bad):
    with pytest.raises(ValueError, match="inputs_embeds|hidden"):
        MODEL(inputs_embeds=bad)
