"""Sparse MoE invariants: routing weights, top-k, empty experts, dense equivalence, and the aux loss."""

from __future__ import annotations

import copy

import pytest
import torch

from modeling_itera import IteraLiteConfig, IteraLiteForCausalLM
from modeling_itera.moe import (
    DENSE_DISPATCH_MAX_TOKENS,
    IteraLiteSparseMoE,
    PermuteRows,
    load_balancing_loss,
    route,
)

from .conftest import TINY


def make_moe(**overrides) -> IteraLiteSparseMoE:
    moe = IteraLiteSparseMoE(IteraLiteConfig(**{**TINY, **overrides}))
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return moe


def test_routing_weights_sum_to_one_and_pick_exactly_k_distinct_experts():
    logits = torch.randn(50, 6)
    weights, experts = route(logits, top_k=3)
    torch.testing.assert_close(weights.sum(-1), torch.ones(50))
    assert experts.shape == (50, 3)
    assert all(len(set(row)) == 3 for row in experts.tolist())
    assert (weights >= 0).all()


def test_tokens_per_expert_counts_k_slots_per_token():
    moe = make_moe()
    moe(torch.randn(3, 5, TINY["hidden_size"]))
    assert moe.tokens_per_expert.sum().item() == 3 * 5 * TINY["num_experts_per_tok"]


def test_an_expert_that_gets_no_token_is_fine():
    moe = make_moe()
    with torch.no_grad():  # a router that never picks expert 3
        moe.router.weight[3] = 0
        moe.router.weight[3, 0] = -100
    x = torch.randn(2, 4, TINY["hidden_size"]).abs()
    moe.reset_usage()
    out, _ = moe(x)
    assert moe.tokens_per_expert[3].item() == 0
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert moe.experts[3].down_proj.weight.grad is None or moe.experts[3].down_proj.weight.grad.abs().sum() == 0


def test_top_k_equal_to_num_experts_is_the_dense_weighted_sum():
    moe = make_moe(num_experts_per_tok=4)
    x = torch.randn(2, 6, TINY["hidden_size"])
    out, logits = moe(x)
    probs = torch.softmax(logits, -1)
    dense = sum(probs[:, e, None] * expert(x.reshape(-1, x.shape[-1])) for e, expert in enumerate(moe.experts))
    torch.testing.assert_close(out.reshape(-1, x.shape[-1]), dense, rtol=1e-5, atol=1e-6)


def test_load_balancing_loss_is_one_when_uniform_and_grows_when_collapsed():
    uniform = torch.zeros(8, 4)
    uniform[torch.arange(8), torch.arange(8) % 4] = 1e-3  # ties broken evenly
    assert abs(load_balancing_loss(uniform, top_k=1).item() - 1.0) < 1e-2
    collapsed = torch.zeros(8, 4)
    collapsed[:, 0] = 10
    assert load_balancing_loss(collapsed, top_k=1).item() > 3.5


def test_load_balancing_loss_ignores_masked_tokens():
    logits = torch.randn(6, 4)
    mask = torch.tensor([1, 1, 1, 0, 0, 0])
    torch.testing.assert_close(load_balancing_loss(logits, 2, mask), load_balancing_loss(logits[:3], 2))


def test_aux_loss_is_finite_and_reaches_loss(tiny_config):
    model = IteraLiteForCausalLM(tiny_config)
    ids = torch.randint(0, tiny_config.vocab_size, (2, 10))
    out = model(ids, labels=ids, return_logits=True)
    assert torch.isfinite(out.aux_loss)
    ce = model.loss_function(out.logits, ids, tiny_config.vocab_size)
    torch.testing.assert_close(out.loss, ce + tiny_config.router_aux_loss_coef * out.aux_loss)
    out.loss.backward()
    assert model.model.layers[1].feed_forward.router.weight.grad.abs().sum() > 0


def test_aux_loss_under_gradient_accumulation_adds_up_to_one_mean(tiny_config):
    """With num_items_in_batch, two micro-batches' losses sum to the loss of the whole batch, aux term included."""
    model = IteraLiteForCausalLM(tiny_config)
    ids = torch.randint(0, tiny_config.vocab_size, (4, 9))
    labels = ids.clone()
    labels[2:, :3] = -100  # unequal token counts per micro-batch
    total = (labels[..., 1:] != -100).sum()
    parts = [
        model(ids[i : i + 2], labels=labels[i : i + 2], num_items_in_batch=total, return_logits=True) for i in (0, 2)
    ]
    aux_expected = sum(p.aux_loss * (labels[i : i + 2, 1:] != -100).sum() / total for p, i in zip(parts, (0, 2)))
    ce_sum = sum(
        model.loss_function(p.logits, labels[i : i + 2], 99, num_items_in_batch=total) for p, i in zip(parts, (0, 2))
    )
    torch.testing.assert_close(parts[0].loss + parts[1].loss, ce_sum + tiny_config.router_aux_loss_coef * aux_expected)


def test_expert_usage_reports_every_moe_layer(tiny_model, tiny_config):
    tiny_model.expert_usage(reset=True)
    tiny_model(torch.randint(0, 99, (1, 6)))
    usage = tiny_model.expert_usage()
    assert list(usage) == [i for i, t in enumerate(tiny_config.layers_block_type) if t == "moe"]
    assert all(sum(counts) == 6 * tiny_config.num_experts_per_tok for counts in usage.values())


def reference_moe(moe: IteraLiteSparseMoE, x: torch.Tensor) -> torch.Tensor:
    """The MoE as its definition reads: each token's output is the weighted sum of its k chosen experts."""
    tokens = x.reshape(-1, x.shape[-1])
    weights, experts = route(moe.router(tokens), moe.top_k)
    rows = [
        sum(weights[i, j].to(token.dtype) * moe.experts[e](token) for j, e in enumerate(experts[i].tolist()))
        for i, token in enumerate(tokens)
    ]
    return torch.stack(rows).reshape(x.shape)


def starve_expert(moe: IteraLiteSparseMoE, expert: int) -> None:
    with torch.no_grad():  # a router that never picks `expert` for positive inputs
        moe.router.weight[expert] = -1.0


@pytest.mark.parametrize("tokens", [1, 5, 40], ids=["one-token", "few-tokens", "many-tokens"])
@pytest.mark.parametrize("dispatch", ["dense", "looped"])
def test_every_dispatch_equals_the_definition_in_float64(dispatch, tokens):
    moe = make_moe().double()
    starve_expert(moe, 3)
    x = torch.randn(1, tokens, TINY["hidden_size"], dtype=torch.float64).abs()
    out, _ = moe(x, dispatch=dispatch)
    torch.testing.assert_close(out, reference_moe(moe, x), rtol=1e-12, atol=1e-12)


def fp32_tolerance(reference: torch.Tensor, accumulation: int) -> dict:
    """The error fp32 may make on a tensor whose float64 value is `reference`, from the computation, not the machine:
    each rounded sum of `accumulation` terms errs by at most about accumulation x eps of its largest magnitude, and
    the largest of the tensor bounds every partial sum that ends in it (a cancelling sum errs relative to its terms,
    not its result, hence max|reference| rather than each element). A wrong route or weight errs by O(max|reference|),
    thousands of times more."""
    return dict(rtol=0.0, atol=accumulation * torch.finfo(torch.float32).eps * reference.abs().max().item())


def moe_accumulation(moe: IteraLiteSparseMoE, tokens: int) -> int:
    """The longest sum in an MoE forward + backward: a hidden and an intermediate contraction, then a weight gradient
    that sums over every token slot of an expert."""
    return moe.experts[0].gate_up_proj.in_features + moe.experts[0].down_proj.in_features + tokens * moe.top_k


@pytest.mark.parametrize("dispatch", ["dense", "grouped", "looped"])
def test_dispatch_forms_give_the_same_outputs_and_gradients(dispatch):
    """The grouped matmul has no float64 kernel: fp32 against the float64 definition, gradients included."""
    moe = make_moe()
    starve_expert(moe, 3)
    x = torch.randn(2, 20, TINY["hidden_size"]).abs().requires_grad_()
    out, _ = moe(x, dispatch=dispatch)
    out.pow(2).sum().backward()
    ref_moe = copy.deepcopy(moe).double()
    x64 = x.detach().double().requires_grad_()
    ref = reference_moe(ref_moe, x64)
    ref.pow(2).sum().backward()
    n = moe_accumulation(moe, tokens=40)
    torch.testing.assert_close(out.double(), ref, **fp32_tolerance(ref, n))
    torch.testing.assert_close(x.grad.double(), x64.grad, **fp32_tolerance(x64.grad, n))
    for p, p64 in zip(moe.parameters(), ref_moe.parameters()):
        grad = p.grad if p.grad is not None else torch.zeros_like(p)
        grad64 = p64.grad if p64.grad is not None else torch.zeros_like(p64)
        torch.testing.assert_close(grad.double(), grad64, **fp32_tolerance(grad64, n))
    assert moe.experts[3].down_proj.weight.grad is None or moe.experts[3].down_proj.weight.grad.abs().sum() == 0


def test_the_fp32_tolerance_catches_a_wrong_dispatch():
    """Two experts' weights swapped, the error a mixed-up dispatch makes: far outside the tolerance above."""
    moe = make_moe()
    x = torch.randn(2, 20, TINY["hidden_size"]).abs()
    out, _ = moe(x, dispatch="grouped")
    swapped = copy.deepcopy(moe).double()
    swapped.experts[0].load_state_dict(moe.experts[1].state_dict())
    swapped.experts[1].load_state_dict(moe.experts[0].state_dict())
    ref = reference_moe(swapped, x.double())
    with pytest.raises(AssertionError):
        torch.testing.assert_close(out.double(), ref, **fp32_tolerance(ref, moe_accumulation(moe, tokens=40)))


def test_permuted_rows_have_the_gradient_of_plain_indexing():
    """PermuteRows' backward gathers with the inverse permutation; autograd's own for `rows[order]` scatter-adds."""
    rows = torch.randn(12, 5, dtype=torch.float64, requires_grad=True)
    order = torch.randperm(12)
    torch.autograd.gradcheck(lambda r: PermuteRows.apply(r, order, order.argsort()), (rows,))
    upstream = torch.randn(12, 5, dtype=torch.float64)
    (grad,) = torch.autograd.grad((PermuteRows.apply(rows, order, order.argsort()) * upstream).sum(), rows)
    (expected,) = torch.autograd.grad((rows[order] * upstream).sum(), rows)
    torch.testing.assert_close(grad, expected, rtol=0, atol=0)


def test_dispatch_is_dense_for_decoding_and_looped_for_wrapped_experts():
    moe = make_moe()
    assert moe.dispatch_for(1) == moe.dispatch_for(DENSE_DISPATCH_MAX_TOKENS) == "dense"
    assert moe.dispatch_for(4096) == "grouped"
    peft = pytest.importorskip("peft")
    wrapped = peft.get_peft_model(
        torch.nn.ModuleDict({"moe": moe}), peft.LoraConfig(r=2, target_modules=["gate_up_proj", "down_proj"])
    )
    assert wrapped.base_model.model["moe"].dispatch_for(4096) == "looped"


def test_lora_wrapped_experts_still_match_the_definition():
    peft = pytest.importorskip("peft")
    moe = make_moe()
    model = peft.get_peft_model(
        torch.nn.ModuleDict({"moe": moe}), peft.LoraConfig(r=2, target_modules=["gate_up_proj", "down_proj"])
    )
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.3)  # LoRA starts at zero; make it change the outputs
    wrapped = model.base_model.model["moe"]
    x = torch.randn(1, DENSE_DISPATCH_MAX_TOKENS + 8, TINY["hidden_size"])
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x)[0], reference_moe(wrapped, x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(wrapped(x[:, :3])[0], reference_moe(wrapped, x[:, :3]), rtol=1e-5, atol=1e-5)
