"""The chunked SSD scan equals the plain recurrence, in one call or two; the in-place step equals the functional one;
the mixer decoding token by token equals its full forward, outputs and gradients."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from modeling_itera import IteraLiteConfig, IteraLiteForCausalLM
from modeling_itera.ssm import IteraLiteMixer, segment_sum, ssd_chunked, ssd_sequential, ssd_step

from .conftest import TINY


def random_inputs(b=2, l=7, h=3, p=4, n=5, dtype=torch.float64):
    x = torch.randn(b, l, h, p, dtype=dtype)
    dt = torch.rand(b, l, h, dtype=dtype) * 0.5
    A = -torch.rand(h, dtype=dtype) * 4 - 0.1
    B, C = torch.randn(b, l, n, dtype=dtype), torch.randn(b, l, n, dtype=dtype)
    state = torch.randn(b, h, p, n, dtype=dtype)
    return x, dt, A, B, C, state


@pytest.mark.parametrize("length,chunk", [(1, 4), (7, 4), (64, 24), (100, 32), (300, 64)], ids=lambda v: str(v))
def test_chunked_scan_equals_sequential_reference(length, chunk):
    inputs = [t.requires_grad_() for t in random_inputs(l=length)]
    y_fast, final_fast = ssd_chunked(*inputs[:5], chunk, initial_state=inputs[5])
    y_ref, final_ref = ssd_sequential(*inputs[:5], initial_state=inputs[5])
    torch.testing.assert_close(y_fast, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final_fast, final_ref, rtol=1e-10, atol=1e-10)

    weights = torch.randn_like(y_ref), torch.randn_like(final_ref)
    grads_fast = torch.autograd.grad((y_fast * weights[0]).sum() + (final_fast * weights[1]).sum(), inputs)
    grads_ref = torch.autograd.grad((y_ref * weights[0]).sum() + (final_ref * weights[1]).sum(), inputs)
    names = ["x", "dt", "A", "B", "C", "initial_state"]
    for name, g_fast, g_ref in zip(names, grads_fast, grads_ref):
        torch.testing.assert_close(g_fast, g_ref, rtol=1e-9, atol=1e-9, msg=f"gradient of {name}")


def test_chunked_scan_without_initial_state_starts_from_zero():
    x, dt, A, B, C, _ = random_inputs(l=19)
    y_fast, final_fast = ssd_chunked(x, dt, A, B, C, 8)
    y_ref, final_ref = ssd_sequential(x, dt, A, B, C, torch.zeros_like(_))
    torch.testing.assert_close(y_fast, y_ref)
    torch.testing.assert_close(final_fast, final_ref)


def test_scan_split_in_two_calls_equals_one_call():
    x, dt, A, B, C, s0 = random_inputs(l=50)
    y_all, final_all = ssd_chunked(x, dt, A, B, C, 16, s0)
    y1, mid = ssd_chunked(x[:, :21], dt[:, :21], A, B[:, :21], C[:, :21], 16, s0)
    y2, final = ssd_chunked(x[:, 21:], dt[:, 21:], A, B[:, 21:], C[:, 21:], 16, mid)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y_all)
    torch.testing.assert_close(final, final_all)


def test_segment_sum_is_the_sum_over_the_segment_and_minus_inf_above():
    a = torch.randn(6, dtype=torch.float64)
    out = segment_sum(a.cumsum(0))
    for i in range(6):
        for j in range(6):
            expected = a[j + 1 : i + 1].sum() if j <= i else -float("inf")
            torch.testing.assert_close(out[i, j], torch.as_tensor(expected, dtype=torch.float64))


def test_fp32_chunked_scan_is_close_to_float64_on_long_strong_decay():
    x, dt, A, B, C, s0 = random_inputs(l=256)
    dt = dt * 4  # a decay of up to e^-8 per step
    y64, _ = ssd_sequential(x, dt, A, B, C, s0)
    y32, _ = ssd_chunked(*(t.float() for t in (x, dt, A, B, C)), 64, s0.float())
    torch.testing.assert_close(y32.double(), y64, rtol=1e-4, atol=1e-4)


def relative_error(got: torch.Tensor, reference: torch.Tensor) -> float:
    return ((got.double() - reference).norm() / reference.norm()).item()


@pytest.mark.parametrize("length,chunk", [(100, 32), (300, 64)], ids=lambda v: str(v))
def test_bf16_chunk_products_are_the_float64_scan_to_bf16_precision_outputs_and_gradients(length, chunk):
    """bf16 inputs to the chunk products (autocast), fp32 decays and states: y, the final state and every gradient
    within 1.5% of the float64 recurrence in norm (measured: 0.3-0.6%, i.e. one bf16 rounding, 2^-8, of each
    product's inputs), and clearly less exact than fp32 products, which shows that the products did run in bf16."""
    inputs = [t.requires_grad_() for t in random_inputs(l=length, h=4, p=16, n=16)]
    y_ref, final_ref = ssd_sequential(*inputs[:5], initial_state=inputs[5])
    weights = torch.randn_like(y_ref), torch.randn_like(final_ref)
    grads_ref = torch.autograd.grad((y_ref * weights[0]).sum() + (final_ref * weights[1]).sum(), inputs)
    errors = {}
    for product_dtype in (None, torch.bfloat16):
        fp32 = [t.detach().float().requires_grad_() for t in inputs]
        y, final = ssd_chunked(*fp32[:5], chunk, initial_state=fp32[5], product_dtype=product_dtype)
        assert y.dtype == final.dtype == torch.float32  # the states and the result stay fp32
        loss = (y * weights[0].float()).sum() + (final * weights[1].float()).sum()
        grads = torch.autograd.grad(loss, fp32)
        errors[product_dtype] = [relative_error(y, y_ref), relative_error(final, final_ref)]
        errors[product_dtype] += [relative_error(g, g_ref) for g, g_ref in zip(grads, grads_ref)]
    assert max(errors[torch.bfloat16]) < 1.5e-2, errors
    assert max(errors[None]) < 1e-5 and min(errors[torch.bfloat16]) > 1e-4, errors


def test_mixer_takes_the_autocast_dtype_for_its_scan_products_and_is_exact_without_autocast(monkeypatch):
    import modeling_itera.ssm as ssm

    seen = []
    chunked = ssm.ssd_chunked

    def recording(*args):
        seen.append(args[-1])
        return chunked(*args)

    monkeypatch.setattr(ssm, "ssd_chunked", recording)
    config = IteraLiteConfig(**TINY)
    torch.manual_seed(0)
    mixer = IteraLiteMixer(config, layer_idx=0)
    for name in ("dt_bias", "A_log", "D"):
        torch.nn.init.normal_(getattr(mixer, name), std=0.5)
    x = torch.randn(2, 40, config.hidden_size)
    plain = mixer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        torch.testing.assert_close(mixer(x), plain, rtol=0, atol=0)  # autocast off: the fp32 path, bit for bit
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = mixer(x)
    assert seen == [None, None, torch.bfloat16]
    assert relative_error(mixed.float(), plain.double()) < 3e-2  # bf16 projections and products


def test_in_place_step_equals_the_functional_step():
    x, dt, A, B, C, state = random_inputs(l=1)
    y, new_state = ssd_step(state, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0])
    held = state.clone()
    y_inplace, returned = ssd_step(held, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], inplace=True)
    torch.testing.assert_close(y_inplace, y)
    torch.testing.assert_close(held, new_state)  # the given tensor itself now holds the new state
    assert returned.data_ptr() == held.data_ptr()


def mixer_in_float64() -> tuple[IteraLiteMixer, IteraLiteConfig]:
    config = IteraLiteConfig(**TINY)
    model = IteraLiteForCausalLM(config).double()  # post_init gives the mixer its real initialisation
    return model.model.layers[0].mixer, config


@pytest.mark.parametrize("prefill", [1, 3, 9], ids=["prefill-1", "prefill-3", "prefill-9"])
def test_mixer_decoding_token_by_token_equals_its_full_forward_with_gradients(prefill):
    """The decode path is the mixer's forward at length 1 (conv from the cached window, one `ssd_step`): with
    autograd on (so the state is not updated in place), outputs and every gradient equal the full forward's."""
    mixer, config = mixer_in_float64()
    x = torch.randn(2, 14, config.hidden_size, dtype=torch.float64, requires_grad=True)
    full = mixer(x)
    grads_full = torch.autograd.grad(full.pow(2).sum(), [x, *mixer.parameters()])

    cache = DynamicCache(config=config)
    parts = [mixer(x[:, :prefill], cache)]
    for t in range(prefill, x.shape[1]):
        parts.append(mixer(x[:, t : t + 1], cache))
    stepped = torch.cat(parts, 1)
    grads_stepped = torch.autograd.grad(stepped.pow(2).sum(), [x, *mixer.parameters()])
    torch.testing.assert_close(stepped, full, rtol=1e-10, atol=1e-10)
    for g_step, g_full in zip(grads_stepped, grads_full):
        torch.testing.assert_close(g_step, g_full, rtol=1e-6, atol=1e-8)  # the chunked form sums in another order


@torch.no_grad()
def test_mixer_in_place_decode_step_equals_the_autograd_one():
    mixer, config = mixer_in_float64()
    x = torch.randn(2, 6, config.hidden_size, dtype=torch.float64)
    caches = [DynamicCache(config=config), DynamicCache(config=config)]
    for cache in caches:
        mixer(x[:, :5], cache)
    in_place = mixer(x[:, 5:], caches[0])
    with torch.enable_grad():
        functional = mixer(x[:, 5:], caches[1])
    torch.testing.assert_close(in_place, functional)
    torch.testing.assert_close(caches[0].get_recurrent_state(0), caches[1].get_recurrent_state(0))


def documents(b: int, l: int, starts: list[int]) -> torch.Tensor:
    """seq_idx (b, l) with documents starting at `starts` in row 0 and one boundary mid-row in the others."""
    seq_idx = torch.zeros(b, l, dtype=torch.int32)
    for s in starts:
        seq_idx[0, s:] += 1
    seq_idx[1:, l // 2 :] = 5  # any numbering: only the changes count
    return seq_idx


PACKED = {  # length, chunk, document starts: inside chunks, at chunk edges, a one-token document, the last position
    "inside-chunks": (30, 8, [3, 13, 21]),
    "at-chunk-edges": (32, 8, [8, 16, 24]),
    "one-token-docs": (25, 8, [1, 2, 7, 8, 9, 24]),
    "one-chunk": (7, 16, [4]),
}


@pytest.mark.parametrize("length,chunk,starts", PACKED.values(), ids=PACKED.keys())
def test_chunked_scan_with_document_boundaries_equals_sequential_reference(length, chunk, starts):
    inputs = [t.requires_grad_() for t in random_inputs(l=length)]
    seq_idx = documents(2, length, starts)
    y_fast, final_fast = ssd_chunked(*inputs[:5], chunk, initial_state=inputs[5], seq_idx=seq_idx)
    y_ref, final_ref = ssd_sequential(*inputs[:5], initial_state=inputs[5], seq_idx=seq_idx)
    torch.testing.assert_close(y_fast, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final_fast, final_ref, rtol=1e-10, atol=1e-10)

    weights = torch.randn_like(y_ref), torch.randn_like(final_ref)
    grads_fast = torch.autograd.grad((y_fast * weights[0]).sum() + (final_fast * weights[1]).sum(), inputs)
    grads_ref = torch.autograd.grad((y_ref * weights[0]).sum() + (final_ref * weights[1]).sum(), inputs)
    for name, g_fast, g_ref in zip(["x", "dt", "A", "B", "C", "initial_state"], grads_fast, grads_ref):
        torch.testing.assert_close(g_fast, g_ref, rtol=1e-9, atol=1e-9, msg=f"gradient of {name}")


def test_sequential_reference_with_boundaries_runs_each_document_alone():
    """What `seq_idx` means: the first document continues the initial state, every later one starts from zero."""
    x, dt, A, B, C, s0 = random_inputs(b=1, l=20)
    bounds = [0, 6, 7, 15, 20]
    y_packed, final_packed = ssd_sequential(x, dt, A, B, C, s0, seq_idx=documents(1, 20, bounds[1:-1]))
    state = s0
    for i, (start, end) in enumerate(zip(bounds, bounds[1:])):
        part = slice(start, end)
        y, state = ssd_sequential(x[:, part], dt[:, part], A, B[:, part], C[:, part], s0 if i == 0 else None)
        torch.testing.assert_close(y_packed[:, part], y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(final_packed, state, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("length", [24, 30], ids=["whole-chunks", "ragged-tail"])
def test_chunk_states_are_the_sequential_states_at_the_chunk_boundaries(length):
    x, dt, A, B, C, s0 = random_inputs(l=length)
    _, final, entering = ssd_chunked(x, dt, A, B, C, 8, s0, return_chunk_states=True)
    assert entering.shape[1] == -(-length // 8)
    torch.testing.assert_close(entering[:, 0], s0)
    for j in range(1, entering.shape[1]):
        _, state = ssd_sequential(x[:, : 8 * j], dt[:, : 8 * j], A, B[:, : 8 * j], C[:, : 8 * j], s0)
        torch.testing.assert_close(entering[:, j], state, rtol=1e-10, atol=1e-10)


@torch.no_grad()
@pytest.mark.parametrize("resumed", [0, 5], ids=["from-zero", "from-a-cache"])
def test_mixer_checkpoints_equal_the_cache_after_each_chunk_boundary(resumed):
    """With `cache.chunk_checkpoints` set, one forward leaves the conv window and the SSM state of every chunk
    boundary inside it: the same as the cache of a forward that stops there."""
    mixer, config = mixer_in_float64()
    short = DynamicCache(config=config)
    short.chunk_checkpoints = {}
    mixer(torch.randn(2, 3, config.hidden_size, dtype=torch.float64), short)  # shorter than a chunk: no boundary
    assert short.chunk_checkpoints[mixer.layer_idx]["conv"].shape[1] == 0
    x = torch.randn(2, resumed + 29, config.hidden_size, dtype=torch.float64)
    cache = DynamicCache(config=config)
    if resumed:
        mixer(x[:, :resumed], cache)
    cache.chunk_checkpoints = {}
    mixer(x[:, resumed:], cache)
    recorded = cache.chunk_checkpoints[mixer.layer_idx]
    ends = list(range(config.chunk_size, 29, config.chunk_size))
    assert recorded["conv"].shape[1] == recorded["ssm"].shape[1] == len(ends) == 3
    for j, end in enumerate(ends):
        stopped = DynamicCache(config=config)
        for part in ([x[:, :resumed]] if resumed else []) + [x[:, resumed : resumed + end]]:
            mixer(part, stopped)
        layer = stopped.layers[mixer.layer_idx]
        torch.testing.assert_close(recorded["conv"][:, j], layer.conv_states[0])
        torch.testing.assert_close(recorded["ssm"][:, j], layer.recurrent_states[0], rtol=1e-10, atol=1e-10)
