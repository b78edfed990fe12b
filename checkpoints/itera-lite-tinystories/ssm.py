"""The selective state-space mixer of Itera-Lite, in the Mamba-2 "SSD" form.

Glossary of dimension letters (Mamba-2 paper, Dao & Gu 2024, section 6 and listing 1):
    b: batch        l: sequence length     d: hidden size (residual width)
    h: SSM heads    p: channels per head   n: state size (d_state)
    c: chunks       q: positions in a chunk

One definition of the discretised recurrence, per head, with a scalar decay per head and B, C shared by heads:

    a_t = Δ_t · A                              (log of the decay; A < 0, so 0 < exp(a_t) < 1)
    h_t = exp(a_t) · h_{t-1} + Δ_t · x_t ⊗ B_t (state of shape (p, n))
    y_t = h_t · C_t                            (the skip D · x_t is added by the mixer)

It has two evaluation orders: `ssd_step`, the recurrence itself (decoding, and the sequential reference
`ssd_sequential` that the tests trust), and `ssd_chunked`, the same sum regrouped into a few batched matmuls per
chunk (training and prefill). Both take and return the state, so a prompt can be continued from a cache.

Packed documents (padding-free training): both also take `seq_idx` (b, l), the document index of each position, as
transformers' `DataCollatorWithFlattening(return_seq_idx=True)` gives it. Where it changes, a new document starts and
the state before it is dropped, i.e. the decay across the boundary is exp(-inf) = 0; the first document continues
from `initial_state`. The causal conv likewise does not look back across a boundary.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_itera import IteraLiteConfig

# Under autocast, the chunk products of the scan take the autocast dtype (`ssd_chunked`'s `product_dtype`). False:
# fp32 products under autocast too, the scan of before; kept for the same-budget comparison of docs/training.md.
SCAN_PRODUCTS_IN_AUTOCAST_DTYPE = True


def log_decay(dt: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """The discretisation, written once: the log of the per-step decay, `Δ · A`. (..., h) * (h,) -> (..., h)."""
    return dt * A


def ssd_step(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of the recurrence.

    Args:
        state: (b, h, p, n) state before the step.
        x: (b, h, p) input; dt: (b, h) step Δ; A: (h,) negative decay rates; B, C: (b, n).
        inplace: update `state` itself (decoding without autograd, `state` contiguous): at batch 32 this is 10x
            faster than building a new state and copying it into the cache, since the state is the largest tensor.

    Returns:
        y: (b, h, p) output, and the new state (b, h, p, n).
    """
    b, h, p, n = state.shape
    decay = torch.exp(log_decay(dt, A))[..., None, None]  # (b, h, 1, 1)
    state = state.mul_(decay) if inplace else state * decay
    flat = state.view(b, h * p, n)
    # + Δ·x ⊗ B, as one batched outer-product-accumulate
    dt_x, B_row = (dt[..., None] * x).reshape(b, h * p, 1), B[:, None, :]
    flat = flat.baddbmm_(dt_x, B_row) if inplace else torch.baddbmm(flat, dt_x, B_row)
    y = (flat @ C[:, :, None]).view(b, h, p)
    return y, flat.view(b, h, p, n)


def segment_ids(seq_idx: torch.Tensor) -> torch.Tensor:
    """Document index per position counted from 0, whatever the numbering of `seq_idx`: a new document starts
    wherever the index changes. (b, l) -> (b, l) int64, non-decreasing along l."""
    starts = seq_idx[:, 1:] != seq_idx[:, :-1]
    return F.pad(starts.long().cumsum(-1), (1, 0))


def ssd_sequential(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: the recurrence as a plain loop over time. Obviously right, and O(l) Python steps: tests only.

    Args:
        x: (b, l, h, p); dt: (b, l, h); A: (h,); B, C: (b, l, n); initial_state: (b, h, p, n) or None (zeros).
        seq_idx: (b, l) document index per position, or None (one document). Where it changes, the state is reset
            to zero before the step.

    Returns:
        y: (b, l, h, p) and the final state (b, h, p, n) (that of the last document).
    """
    b, l, h, p = x.shape
    state = initial_state if initial_state is not None else x.new_zeros(b, h, p, B.shape[-1])
    ys = []
    for t in range(l):
        if seq_idx is not None and t > 0:
            keep = (seq_idx[:, t] == seq_idx[:, t - 1]).to(state.dtype)  # (b,)
            state = state * keep[:, None, None, None]
        y, state = ssd_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t])
        ys.append(y)
    return torch.stack(ys, dim=1), state


def segment_sum(a_cumsum: torch.Tensor, segment: torch.Tensor | None = None) -> torch.Tensor:
    """out[..., i, j] = a[j+1] + ... + a[i] for j <= i, and -inf above the diagonal: (..., T) -> (..., T, T).

    Takes the cumulative sum of `a`. The difference of two cumulative sums loses ~1e-7 of |cumsum| to rounding in
    fp32, i.e. a relative error of ~1e-5 on the decay after a chunk of strong decay: well below the model's noise,
    and one op instead of the three of a masked cumsum. Masking before exp keeps the gradient finite.

    `segment` (..., T), the document index of each position (non-decreasing): a sum that crosses a document start
    (segment[i] != segment[j]) is -inf too, the log of the zero decay at a reset.
    """
    T = a_cumsum.shape[-1]
    lower = torch.ones(T, T, dtype=torch.bool, device=a_cumsum.device).tril()
    if segment is not None:
        lower = lower & (segment[..., :, None] == segment[..., None, :])
    return (a_cumsum[..., :, None] - a_cumsum[..., None, :]).masked_fill(~lower, -math.inf)


def ssd_chunked(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    initial_state: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    return_chunk_states: bool = False,
    product_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The recurrence evaluated chunk by chunk with batched matmuls (Mamba-2 paper, listing 1). No loop over time.

    Same arguments and results as `ssd_sequential`, plus `chunk_size`; any length works (the tail is padded with
    Δ = 0, which neither decays nor feeds the state). With `seq_idx`, each of the four steps below masks the decays
    that cross a document start, inside a chunk or between chunks (`segment_sum` with the document index).
    `return_chunk_states` also returns the state entering each chunk (b, c, h, p, n), i.e. after 0, q, 2q, ...
    positions, which step 3 computes anyway (a server keeps them as prefix-cache checkpoints).

    `product_dtype` (bf16 under autocast): the dtype of the inputs of the three chunk products that carry the
    compute, `C Bᵀ`, `(C Bᵀ ∘ L)(Δx)` and the state products, as in Mamba-2's own kernels; each matmul accumulates
    in fp32 inside (oneDNN on CPU, tensor cores on GPU) and rounds its result once. The decays (cumulative sums,
    segment sums, `exp`), the carry across chunks and the states returned stay fp32: a state integrates thousands
    of steps, and an 8-bit mantissa in `exp(a_cumsum)` would shift every decay. None: the dtype of `x` (exact).
    """
    b, l, h, p = x.shape
    pad = (-l) % chunk_size
    seg = segment_ids(seq_idx) if seq_idx is not None else None
    if pad:
        x, dt = F.pad(x, (0, 0, 0, 0, 0, pad)), F.pad(dt, (0, 0, 0, pad))
        B, C = F.pad(B, (0, 0, 0, pad)), F.pad(C, (0, 0, 0, pad))
        if seg is not None:  # the tail joins the last document, which the final state then still carries
            seg = torch.cat([seg, seg[:, -1:].expand(b, pad)], dim=1)
    c, q = (l + pad) // chunk_size, chunk_size
    low = product_dtype or x.dtype  # the inputs of the chunk products (`.to` returns the tensor itself if equal)
    # Layout (b, c, h, q, .): heads before positions, so every product below is a plain batched matmul.
    x_dt = (x * dt[..., None]).view(b, c, q, h, p).transpose(2, 3)  # (b, c, h, q, p), the input Δ·x of each step
    x_dt_low = x_dt.to(low)
    B, C = B.view(b, c, 1, q, -1), C.view(b, c, 1, q, -1)  # shared by the heads
    B_low, C_low = B.to(low), C.to(low)
    a_cumsum = log_decay(dt, A).view(b, c, q, h).transpose(2, 3).cumsum(dim=-1)  # (b, c, h, q)

    # The document index per position (b, c, 1, q) and at the end of each chunk (b, 1, c+1), 0 before the first
    # position: the initial state belongs to the first document. All None without seq_idx.
    seg_q = seg.view(b, c, 1, q) if seg is not None else None
    seg_ends = F.pad(seg_q[..., -1].transpose(1, 2), (1, 0)) if seg is not None else None

    # 1. Within each chunk: a causal, decay-weighted "attention" C_i·B_j · exp(a_{j+1} + ... + a_i).
    scores = (C_low @ B_low.transpose(-1, -2)) * torch.exp(segment_sum(a_cumsum, seg_q))  # (b, c, h, q, q), fp32
    y = scores.to(low) @ x_dt_low  # (b, c, h, q, p)

    # 2. The state each chunk leaves at its end, on its own input (of its last document only).
    log_decay_to_end = a_cumsum[..., -1:] - a_cumsum  # (b, c, h, q)
    if seg is not None:
        log_decay_to_end = log_decay_to_end.masked_fill(seg_q != seg_q[..., -1:], -math.inf)
    decayed_B = (B * torch.exp(log_decay_to_end)[..., None]).to(low)
    chunk_states = (x_dt_low.transpose(-1, -2) @ decayed_B).to(x.dtype)  # (b, c, h, p, n), carried in fp32

    # 3. Carry the states across chunks: a recurrence over the c chunks, written as one matmul.
    if initial_state is None:
        initial_state = x.new_zeros(b, h, p, B.shape[-1])
    states = torch.cat([initial_state[:, None], chunk_states], dim=1)  # (b, c+1, h, p, n)
    chunk_ends = F.pad(a_cumsum[..., -1].transpose(1, 2), (1, 0)).cumsum(-1)  # (b, h, c+1): log decay to chunk ends
    chunk_decay = torch.exp(segment_sum(chunk_ends, seg_ends))  # (b, h, c+1, c+1)
    states = (chunk_decay @ states.transpose(1, 2).flatten(3)).view(b, h, c + 1, p, -1).transpose(1, 2)
    states, final_state = states[:, :-1], states[:, -1].contiguous()  # entering each chunk; after the last

    # 4. What the carried-in state adds at each position of its chunk (none after a document start in the chunk).
    log_decay_in = a_cumsum
    if seg is not None:
        log_decay_in = a_cumsum.masked_fill(seg_q != seg_ends[:, 0, :-1, None, None], -math.inf)
    y = y + (C_low @ states.to(low).transpose(-1, -2)) * torch.exp(log_decay_in)[..., None]  # (b, c, h, q, p)
    y = y.transpose(2, 3).reshape(b, c * q, h, p)[:, :l]
    return (y, final_state, states) if return_chunk_states else (y, final_state)


def contiguous_buffer(t: torch.Tensor) -> torch.Tensor:
    """`t` as a contiguous tensor that Inductor keeps as a buffer of its own: the product `I @ t` (exact, in t's dtype).
    Inductor folds a transpose or a `.contiguous()` into the loads of the loop that reads it, and a few strided
    loads are enough for it to leave that loop unvectorized: the causal conv's, SiLU included, ran in scalar code
    forward and backward, 3-6% of a compiled training step. A matmul's output is always a buffer."""
    eye = torch.eye(t.shape[0], dtype=t.dtype, device=t.device)
    with torch.autocast(t.device.type, enabled=False):
        return eye @ t


def as_input_of(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`x` in the dtype of a layer that a half-precision load kept in fp32 (`_keep_in_fp32_modules`). Quantized
    weights (integer storage) take any float input, so x is left as it is for them."""
    weight_dtype = linear.weight.dtype
    return x.to(weight_dtype) if weight_dtype.is_floating_point and weight_dtype != x.dtype else x


class RMSNormGated(nn.Module):
    """RMSNorm of `y * silu(z)`: the gated output norm of Mamba-2 (section 7.1), which keeps activations scaled."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        gated = (y * F.silu(z)).float()  # the mean of squares in fp32, as in every RMSNorm of this model
        return F.rms_norm(gated, gated.shape[-1:], self.weight.float(), self.eps).to(y.dtype)


class IteraLiteMixer(nn.Module):
    """Selective SSM mixer: one input projection to z, x, B, C and Δ; causal depthwise conv over (x, B, C); the SSD
    scan; the skip D·x; gated RMSNorm; output projection.

    With a cache, the conv state and the SSM state of this layer are read from it and written back, so a forward
    over new tokens continues exactly where the previous one stopped, whatever the number of new tokens.
    """

    def __init__(self, config: IteraLiteConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.d_inner = config.intermediate_ssm_size
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        self.state_size = config.state_size
        self.conv_kernel = config.conv_kernel
        self.chunk_size = config.chunk_size
        self.conv_dim = self.d_inner + 2 * self.state_size  # x, B, C go through the conv
        # One projection for z, x, B, C and Δ: one matmul per step instead of five (the decode step is op-bound).
        self.in_proj = nn.Linear(config.hidden_size, self.d_inner + self.conv_dim + self.num_heads, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, config.conv_kernel, groups=self.conv_dim, bias=True)
        self.dt_bias = nn.Parameter(torch.empty(self.num_heads))
        self.A_log = nn.Parameter(torch.empty(self.num_heads))
        self.D = nn.Parameter(torch.empty(self.num_heads))
        self.norm = RMSNormGated(self.d_inner, eps=config.rms_norm_eps)
        self.out_proj = nn.Linear(self.d_inner, config.hidden_size, bias=False)

    def causal_conv(self, xBC: torch.Tensor, cache=None, seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        """Depthwise causal conv + SiLU, for prefill and decode alike. (b, l, conv_dim) -> (b, l, conv_dim).

        Without a cache the window is left-padded with K-1 zeros; with one, the cache hands back its last K inputs
        followed by the new ones, so the first new output sees the true left context. The conv is K shifted
        multiply-adds: on CPU, 3-5x faster than `F.conv1d` for a depthwise kernel, forward and backward. With
        `seq_idx` (b, l), a tap that reaches back into an earlier document reads zero, as at the start of a sequence
        (the left context, cached or padded, belongs to the first document).
        """
        l, K = xBC.shape[1], self.conv_kernel
        if cache is not None:  # the cache keeps (b, conv_dim, K), the layout of transformers' own SSM models
            xBC = cache.update_conv_state(xBC.transpose(1, 2), self.layer_idx, conv_kernel_size=K).transpose(1, 2)
        missing = l + K - 1 - xBC.shape[1]
        if missing > 0:
            # zeros concatenated, not F.pad: compiled, a pad becomes a masked load in every tap, and the conv of a
            # 2048-token prefill took 5.2 ms instead of the 0.7 of copying the window once (prefill 1.3x, training
            # 1.03x in interleaved A/B runs)
            xBC = torch.cat([xBC.new_zeros(xBC.shape[0], missing, xBC.shape[2]), xBC], dim=1)
        if (checkpoints := getattr(cache, "chunk_checkpoints", None)) is not None:
            # Opt-in (a server's prefix cache sets the dict): the conv window, the last K inputs, at each chunk
            # boundary inside this call, in the cache's layout (b, m, conv_dim, K) for m boundaries.
            ends = torch.arange(self.chunk_size, max(l, self.chunk_size), self.chunk_size, device=xBC.device)
            rows = xBC.shape[1] - l + ends[:, None] - K + torch.arange(K, device=xBC.device)  # (m, K)
            checkpoints.setdefault(self.layer_idx, {})["conv"] = xBC[:, rows].permute(0, 1, 3, 2)
        window = xBC[:, -(l + K - 1) :]  # (b, l+K-1, conv_dim)
        weight = self.conv1d.weight[:, 0].t()  # (K, conv_dim): weight[k] is tap k of every channel
        if torch.compiler.is_compiling() and l > 1:
            weight = contiguous_buffer(weight)
        seg = segment_ids(seq_idx) if seq_idx is not None else None
        seg_window = F.pad(seg, (K - 1, 0)) if seg is not None else None  # (b, l+K-1): the left context is doc 0
        out = self.conv1d.bias
        for k in range(K):
            tap = window[:, k : k + l]  # (b, l, conv_dim), the input k-K+1 steps back
            if seg is not None:
                tap = tap * (seg_window[:, k : k + l] == seg)[..., None].to(tap.dtype)
            out = torch.addcmul(out, tap, weight[k])  # one pass per tap, not a multiply and then an add
        return F.silu(out)

    def forward(
        self,
        hidden_states: torch.Tensor,
        cache=None,
        attention_mask: torch.Tensor | None = None,
        seq_idx: torch.Tensor | None = None,
    ):
        """(b, l, d) -> (b, l, d). `attention_mask` (b, >= l), 1 for tokens and 0 for (left) padding; `seq_idx`
        (b, l), the document index of each position of packed documents (the conv and the state reset where it
        changes), or None.

        One definition for every length: decoding a token is this forward at l = 1. Only the conv window (from the
        cache or zero padding) and the scan order (`scan`) depend on whether a previous state exists.
        """
        b, l, _ = hidden_states.shape
        z, xBC, dt = self.in_proj(as_input_of(self.in_proj, hidden_states)).split(
            [self.d_inner, self.conv_dim, self.num_heads], dim=-1
        )
        mask = None
        if attention_mask is not None:
            # generate() passes the whole 2-D mask at every step; this call covers only its last l columns.
            mask = attention_mask[:, -l:, None].to(xBC.dtype)  # (b, l, 1)
            xBC = xBC * mask  # padding must not reach the conv window of the real tokens that follow it
        xBC = self.causal_conv(xBC, cache, seq_idx)  # (b, l, conv_dim)
        if mask is not None:
            xBC = xBC * mask  # and must not feed the state: x = B = 0 there
        x, B, C = xBC.split([self.d_inner, self.state_size, self.state_size], dim=-1)

        # The scan runs in fp32 whatever the weights' dtype: the state integrates thousands of steps. Under autocast
        # only the inputs of its chunk products take the autocast dtype (`ssd_chunked`); autocast itself is off
        # inside, where it would also cast the fp32 carry of the states.
        device = x.device.type
        autocast_products = SCAN_PRODUCTS_IN_AUTOCAST_DTYPE and torch.is_autocast_enabled(device)
        product_dtype = torch.get_autocast_dtype(device) if autocast_products else None
        x = x.float().view(b, l, self.num_heads, self.head_dim)
        dt = F.softplus(dt.float() + self.dt_bias.float())  # (b, l, h)
        A = -torch.exp(self.A_log.float())  # (h,)
        with torch.autocast(device, enabled=False):
            y = self.scan(x, dt, A, B.float(), C.float(), cache, seq_idx, product_dtype)
        y = torch.addcmul(y, x, self.D.float()[:, None])  # skip connection D·x, per head, in one pass
        y = self.norm(y.reshape(b, l, self.d_inner).to(hidden_states.dtype), z)
        return self.out_proj(y)

    def scan(self, x, dt, A, B, C, cache=None, seq_idx=None, product_dtype=None) -> torch.Tensor:
        """The SSD scan from this layer's cached state (zeros without one), updating the cache. Shapes and
        `product_dtype` as in `ssd_chunked`; returns y (b, l, h, p) in fp32.

        One new token after a cached state is one `ssd_step` (the decode step), any other length the chunked form (one
        position has no document boundary, so the decode step ignores `seq_idx`).
        Without autograd the decode step updates the cached state in place: at batch 32 that is 10x faster than
        building a new state and copying it back, the state being the largest tensor of the step.
        """
        state = cache.get_recurrent_state(self.layer_idx) if cache is not None else None
        if state is not None and torch.is_grad_enabled():
            state = state.clone()  # the cache overwrites its tensor at the next step; autograd needs this one kept
        if x.shape[1] == 1 and state is not None:
            inplace = not torch.is_grad_enabled()  # the cache's state is contiguous: it allocates it
            y, state_after = ssd_step(state, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], inplace=inplace)
            y = y[:, None]
            if inplace:
                return y
        else:
            checkpoints = getattr(cache, "chunk_checkpoints", None)  # see `causal_conv`
            y, state_after, *entering = ssd_chunked(
                x, dt, A, B, C, self.chunk_size, state, seq_idx, checkpoints is not None, product_dtype
            )
            if checkpoints is not None:  # the states at the chunk boundaries inside the call: (b, m, h, p, n)
                checkpoints.setdefault(self.layer_idx, {})["ssm"] = entering[0][:, 1:]
        if cache is not None:
            cache.update_recurrent_state(state_after, self.layer_idx)
        return y
