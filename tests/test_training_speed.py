"""The fast training paths give the same training: the fused LM head + cross-entropy (same loss and gradients as
the logits path), bf16 autocast on CPU (a loss curve close to fp32's; the scan's products in bf16, its states in
fp32), and compiled blocks (the same losses as eager)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.loss.loss_utils import ForCausalLMLoss

from modeling_itera import IteraLiteForCausalLM, ssm
from modeling_itera import loss as loss_module
from modeling_itera.generation import have_cpp_compiler
from modeling_itera.loss import causal_lm_loss_from_hidden
from training import pretrain

from .conftest import smoke_args


def loss_and_grads(model, ids, labels, **kwargs):
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=labels, **kwargs)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("num_items", [None, 37], ids=["mean", "num_items_in_batch"])
def test_fused_loss_has_the_loss_and_gradients_of_the_logits_path(tiny_config, num_items):
    # fp32: the logits path's ForCausalLMLoss upcasts to fp32 (not beyond), so a float64 model would compare fp32s
    model = IteraLiteForCausalLM(tiny_config).train()
    model.fused_training_loss = True
    ids = torch.randint(0, tiny_config.vocab_size, (3, 40))  # 120 tokens: the MoE takes its grouped-sort path
    labels = ids.clone()
    labels[0, :7] = -100
    labels[2, 30:] = -100
    extra = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    fused, fused_grads = loss_and_grads(model, ids, labels, **extra)
    reference, reference_grads = loss_and_grads(model, ids, labels, return_logits=True, **extra)
    assert fused.logits is None and reference.logits.shape == (3, 40, tiny_config.vocab_size)
    torch.testing.assert_close(fused.loss, reference.loss, rtol=1e-6, atol=1e-6)
    assert fused_grads.keys() == reference_grads.keys()
    for name, grad in reference_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("num_items", [None, 37], ids=["mean", "num_items_in_batch"])
def test_loss_under_autocast_is_the_float64_loss_to_bf16_precision(num_items, compiled):
    """600 tokens: three chunks of the half-precision loss, the last one partial; compiled, as inside
    `torch.compile(model)`, where each chunk is a nested compile region."""
    if compiled and not have_cpp_compiler():
        pytest.skip("Inductor needs a C++ compiler on CPU")
    loss_fn = torch.compile(causal_lm_loss_from_hidden, fullgraph=True) if compiled else causal_lm_loss_from_hidden
    torch.manual_seed(0)
    hidden = torch.randn(3, 200, 32, requires_grad=True)
    weight = (torch.randn(500, 32) * 0.3).requires_grad_()
    labels = torch.randint(0, 500, (3, 200))
    labels[0, :50] = -100
    labels[2, 150:] = -100
    extra = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_fn(hidden, weight, labels, **extra)
    loss.backward()
    assert loss.dtype == torch.float32 and weight.grad.dtype == torch.float32 and hidden.grad.dtype == torch.float32

    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    reference = ForCausalLMLoss(h64 @ w64.T, labels, 500, **extra)  # it upcasts the float64 logits' loss to fp32
    reference.backward()
    # bf16 products: each logit is ~3 significant digits, but the loss is a sum of hundreds of them, in fp32
    torch.testing.assert_close(loss, reference, rtol=1e-3, atol=0)
    for grad, expected in ((hidden.grad, h64.grad), (weight.grad, w64.grad)):
        relative = (grad.double() - expected).norm() / expected.norm()
        assert relative < 1e-2, relative  # bf16 rounding of the inputs and of d loss / d logits, ~2^-8


@pytest.mark.skipif(not have_cpp_compiler(), reason="Inductor needs a C++ compiler on CPU")
def test_the_compiled_loss_chunk_gives_the_eager_chunk(monkeypatch):
    torch.manual_seed(0)
    h, w = torch.randn(64, 32).bfloat16(), torch.randn(500, 32).bfloat16()
    target = torch.randint(0, 500, (64,))
    labelled = torch.rand(64) > 0.2
    eager = loss_module.chunk_loss_and_grads(h, w, target, labelled)
    monkeypatch.setattr(loss_module, "_chunk_fn", loss_module.chunk_loss_and_grads)  # restored after the test
    loss_module.use_compiled_loss(True)
    compiled = loss_module._chunk_fn(h, w, target, labelled)
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=1e-4)
    for got, expected in zip(compiled[1:], eager[1:]):  # bf16 results: one rounding step apart at most
        torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-2)


def test_logits_are_returned_always_unless_the_fused_loss_is_asked_for(tiny_config):
    model = IteraLiteForCausalLM(tiny_config)
    ids = torch.randint(0, tiny_config.vocab_size, (2, 12))
    assert model.train()(ids, labels=ids).logits is not None  # as transformers' own models
    assert model.train()(ids, labels=ids, return_logits=False).logits is None  # the fused loss, per call
    model.fused_training_loss = True
    assert model.train()(ids, labels=ids).logits is None
    assert model(ids).logits is not None  # no labels
    with torch.no_grad():
        assert model(ids, labels=ids).logits is not None  # Trainer's evaluation loop
    assert model.eval()(ids, labels=ids).logits is not None
    assert model.eval()(ids, labels=ids, return_logits=False).logits is None


def test_a_plain_training_loop_reads_the_logits_of_each_step(tiny_config):
    """A distillation loss, as users write it: the student's logits while training, against a teacher's."""
    student, teacher = IteraLiteForCausalLM(tiny_config).train(), IteraLiteForCausalLM(tiny_config).eval()
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-2)
    ids = torch.randint(0, tiny_config.vocab_size, (2, 12))
    with torch.no_grad():
        target = teacher(ids).logits.log_softmax(-1)
    losses = []
    for _ in range(5):
        out = student(ids, labels=ids)
        kl = torch.nn.functional.kl_div(out.logits.log_softmax(-1), target, log_target=True, reduction="batchmean")
        (kl + 0.0 * out.loss).backward()  # labels given, as a Trainer gives them; the student learns the teacher
        optimizer.step()
        optimizer.zero_grad()
        losses.append(kl.item())
    assert losses[-1] < losses[0]


def test_bf16_autocast_keeps_the_scan_states_in_fp32_and_follows_the_fp32_loss_curve(tiny_config, monkeypatch):
    """Under autocast the scan's chunk products take bf16 inputs; its input x, its decays and states stay fp32 (the
    products' dtype is an argument, autocast itself is off inside)."""
    seen = []
    chunked = ssm.ssd_chunked

    def recording(x, *args):
        seen.append((x.dtype, torch.is_autocast_enabled("cpu"), args[-1]))
        return chunked(x, *args)

    monkeypatch.setattr(ssm, "ssd_chunked", recording)
    # 50 steps on 8 fixed sequences of 24 tokens, shuffled into batches of 4: a curve that falls (memorisation)
    data = torch.randint(0, tiny_config.vocab_size, (8, 24))
    ids = torch.stack([data[torch.randperm(8)[:4]] for _ in range(50)])

    def curve(autocast: bool) -> torch.Tensor:
        torch.manual_seed(0)
        model = IteraLiteForCausalLM(tiny_config).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        losses = []
        for batch in ids:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = model(batch, labels=batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        return torch.tensor(losses)

    fp32, bf16 = curve(False), curve(True)
    assert seen and all(dtype == torch.float32 and not autocast_on for dtype, autocast_on, _ in seen)
    assert {products for *_, products in seen} == {None, torch.bfloat16}  # fp32 curve, then bf16 curve
    assert fp32[-10:].mean() < fp32[:5].mean() - 0.3  # it learns
    # bf16 matmuls (8-bit mantissa) in the projections: each step's loss within 1% of fp32's (measured: 0.11% at most)
    torch.testing.assert_close(bf16, fp32, rtol=0.01, atol=0.0)


def losses_of(metrics: dict) -> list[float]:
    return [entry["loss"] for entry in metrics["log_history"] if "loss" in entry]


@pytest.mark.skipif(not have_cpp_compiler(), reason="Inductor needs a C++ compiler on CPU")
def test_compiled_training_gives_the_losses_of_eager_training(story_files, tmp_path, monkeypatch):
    """`--torch_compile true` through training.pretrain (regional, fullgraph blocks, with gradient checkpointing):
    the same five logged losses as eager, to 1e-4 (Inductor reorders fp32 sums), and a model that saves and loads."""
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "no")  # TrainingArguments sets it; restored after the test
    monkeypatch.setenv("ACCELERATE_DYNAMO_MODE", "default")
    flags = ["--max_steps", "4", "--eval_strategy", "no", "--gradient_checkpointing", "true"]
    eager = pretrain.main(smoke_args(story_files, tmp_path / "eager", *flags, "--valid_file", ""))
    compiled = pretrain.main(
        smoke_args(story_files, tmp_path / "compiled", *flags, "--valid_file", "", "--torch_compile", "true")
    )
    assert len(losses_of(eager)) == 4
    torch.testing.assert_close(losses_of(compiled), losses_of(eager), rtol=1e-4, atol=1e-4)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "compiled")
    assert (
        isinstance(reloaded, IteraLiteForCausalLM) and torch.isfinite(reloaded(torch.tensor([[1, 5, 9]])).logits).all()
    )


@pytest.mark.skipif(not have_cpp_compiler(), reason="Inductor needs a C++ compiler on CPU")
def test_torch_compile_of_the_whole_model_has_no_graph_break_nor_recompile(tiny_config):
    """`torch.compile(model)` with default options, as users and `Trainer(torch_compile=True)` call it: two training
    batches under bf16 autocast (the MoE's grouped path: more than 32 tokens) and a prefill, each one graph."""
    from torch._dynamo.utils import counters

    model = IteraLiteForCausalLM(tiny_config).train()  # the default: logits returned while training
    compiled = torch.compile(model)
    torch._dynamo.reset()
    counters.clear()
    for _ in range(2):
        ids = torch.randint(3, tiny_config.vocab_size, (2, 48))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = compiled(ids, labels=ids)
        out.loss.backward()
    assert out.logits is not None
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert not counters["recompiles"], dict(counters["recompiles"])
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    with torch.no_grad():
        compiled.eval()(torch.randint(3, tiny_config.vocab_size, (1, 48)), use_cache=False)
    assert not counters["graph_break"], dict(counters["graph_break"])


@pytest.mark.skipif(not have_cpp_compiler(), reason="Inductor needs a C++ compiler on CPU")
def test_the_fused_bf16_loss_under_torch_compile_of_the_model_has_no_graph_break(tiny_config):
    """The fused loss (its chunks a nested compile region, loss.py says why) inside `torch.compile(model)`: one graph
    over batches of several chunks and a part chunk, and eager's loss. (Its gradients are tested against float64 in
    `test_loss_under_autocast_is_the_float64_loss_to_bf16_precision`; the whole model's bf16 gradients differ from
    eager's by as much as eager's differ from fp32's, a few percent in the router's, so they are no test here.)"""
    from torch._dynamo.utils import counters

    model = IteraLiteForCausalLM(tiny_config).train()
    model.fused_training_loss = True
    ids = torch.randint(3, tiny_config.vocab_size, (2, 300))  # 600 tokens: chunks of 256, 256 and 88
    labels = ids.masked_fill(torch.rand(ids.shape) < 0.1, -100)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager, _ = loss_and_grads(model, ids, labels)
        compiled_model = torch.compile(model)
        torch._dynamo.reset()
        counters.clear()
        for _ in range(2):
            compiled, _ = loss_and_grads(compiled_model, ids, labels)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert not counters["recompiles"], dict(counters["recompiles"])
    assert compiled.logits is None
    torch.testing.assert_close(compiled.loss, eager.loss, rtol=1e-3, atol=0)
