"""Sparse Mixture-of-Experts feed-forward (Switch Transformer, Fedus et al. 2021; Mixtral, Jiang et al. 2024).

Four stanzas: route (softmax in fp32, top-k, renormalise), dispatch, experts (each a SwiGLU of `nn.Linear`s),
combine. The dispatch has three forms, all with the same result (tested in float64):

- `dense`: every expert on every token, weighted by its routing weight (0 for the experts a token did not pick).
  Static shapes and no host round trip: the decode step (a few tokens) uses it, compiled or not.
- `grouped`: the (token, expert) slots sorted by expert and one grouped matmul per projection over the experts'
  stacked weights (`torch._grouped_mm`, through transformers' dispatcher, which has a compilable fallback). Training
  and prefill use it when the experts are plain float `nn.Linear`s.
- `looped`: the same sorted slots, one expert call per expert. For experts that bitsandbytes quantized or PEFT
  wrapped: the experts stay `nn.Linear` modules as the storage so that those libraries can replace them, and this
  form calls whatever module is there.

`static_dispatch = True` on a MoE module (set by `modeling_itera.export` while it traces an ONNX graph) makes every
call take the dense form with no skipping: one fixed graph for any number of tokens, with no `torch.cond` and no
grouped matmul, which the ONNX exporter cannot lower.

The load-balancing loss is a pure function of the router logits, so the model can add it to `loss`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations.moe import _grouped_mm as grouped_mm

from .configuration_itera import IteraLiteConfig
from .ssm import as_input_of

# Up to this many tokens in one call (decoding, up to a batch of this size), the dense form is used: its shapes are
# static and it never waits on the host, so the decode step compiles into one graph. Eager on CPU it costs about
# as much as sorting and gathering up to ~16 tokens and ~1.4x at 32 (top-2 of 4 experts, tiny preset:
# `python -m benchmarks.moe_dispatch`); compiled, its elementwise work fuses away.
DENSE_DISPATCH_MAX_TOKENS = 32
# The dtypes of torch's grouped matmul kernel (float64, e.g. in the parity tests, takes the looped form).
GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class IteraLiteMLP(nn.Module):
    """SwiGLU feed-forward: down(dropout(silu(gate(x)) * up(x))), with gate and up fused into one `nn.Linear`."""

    def __init__(self, hidden_size: int, intermediate_size: int, dropout: float = 0.0):
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.dropout(F.silu(gate) * up, self.dropout, self.training))


def in_autocast_dtype(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors cast as autocast casts an `nn.Linear`'s input and weight, where it is on (else as they are).
    torch's grouped matmul is not on autocast's list (pytorch#174763), so under `--bf16 true` the grouped experts
    would run in fp32, at twice the time of the looped `nn.Linear`s on a CPU with bf16 instructions."""
    device_type = tensors[0].device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t.is_floating_point() else t for t in tensors)


class PermuteRows(torch.autograd.Function):
    """`rows[order]`, whose gradient is `grad[inverse]` (`inverse` undoes `order`): a gather in the backward too.
    Plain indexing has no way to know that its index is a permutation, so its backward scatter-adds (`index_put`
    with accumulation), which on CPU is ~10x slower than a gather, as is the `index_add` that used to combine the
    experts' outputs. Compiles (dynamo traces both halves)."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return rows[order]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return grad[inverse], None, None


def route(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k routing. (t, e) logits -> weights (t, k) in fp32 summing to 1, and expert ids (t, k)."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, experts = probs.topk(top_k, dim=-1)
    return weights / weights.sum(dim=-1, keepdim=True), experts


def load_balancing_loss(
    router_logits: torch.Tensor, top_k: int, token_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch-style auxiliary loss `E · Σ_e f_e · P_e`, where f_e is the share of routed slots that go to expert e
    and P_e its mean router probability. It is 1.0 for a perfectly uniform router and grows as routing collapses.

    Args:
        router_logits: (t, e) for the t tokens of one layer.
        top_k: experts per token.
        token_mask: (t,) 1 for real tokens, 0 for padding (excluded), or None.
    """
    num_experts = router_logits.shape[-1]
    probs = torch.softmax(router_logits.float(), dim=-1)
    _, experts = probs.topk(top_k, dim=-1)
    chosen = F.one_hot(experts, num_experts).sum(dim=1).float()  # (t, e): 1 where the token went
    weight = torch.ones_like(probs[:, :1]) if token_mask is None else token_mask.reshape(-1, 1).float()
    n_tokens = weight.sum().clamp(min=1)
    slot_share = (chosen * weight).sum(0) / (n_tokens * top_k)  # f_e
    mean_prob = (probs * weight).sum(0) / n_tokens  # P_e
    return num_experts * (slot_share * mean_prob).sum()


def skip_unrouted(experts: nn.ModuleList, gate: torch.Tensor, skip: bool = True):
    """For the dense form: one function per expert, `(out, tokens) -> out + expert(tokens) * gate[:, e]`, that skips
    the expert when no token picked it. Decoding reads the weights, so skipping the unpicked experts (half of them
    at batch 1, top-2 of 4) saves their bytes. How it skips, without ever waiting on an accelerator:
    compiled, `torch.cond` (a branch inside the graph); eager on CPU, a Python `if` on the (CPU) gate; eager on an
    accelerator, it does not skip (the `if` would be a host round trip). `skip=False`: every expert, no branch."""
    routed = gate.ne(0).any(dim=0)  # (e,)
    compiling = skip and torch.compiler.is_compiling()
    eager_skip = skip and not compiling and gate.device.type == "cpu"
    routed_list = routed.tolist() if eager_skip else [True] * len(experts)

    def apply(e: int):
        def add_expert(out: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
            return out + experts[e](tokens) * gate[:, e, None]

        def keep(out: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
            return out.clone()  # torch.cond's branches may not return an input as it is

        if compiling:
            return lambda out, tokens: torch.cond(routed[e], add_expert, keep, (out, tokens))
        return add_expert if routed_list[e] else lambda out, tokens: out

    return [apply(e) for e in range(len(experts))]


class IteraLiteSparseMoE(nn.Module):
    """Router + experts. `tokens_per_expert` counts, since construction or the last `reset_usage()`, how many token
    slots each expert has served: the expert usage that a user can inspect. (Under activation checkpointing the
    recomputed forward counts a batch twice; the shares between experts stay right.)"""

    def __init__(self, config: IteraLiteConfig):
        super().__init__()
        self.num_experts, self.top_k = config.num_experts, config.num_experts_per_tok
        self.router = nn.Linear(config.hidden_size, self.num_experts, bias=False)
        self.experts = nn.ModuleList(
            IteraLiteMLP(config.hidden_size, config.moe_intermediate_size, config.expert_dropout)
            for _ in range(self.num_experts)
        )
        self.register_buffer("tokens_per_expert", torch.zeros(self.num_experts, dtype=torch.long), persistent=False)
        self.static_dispatch = False  # True: the dense form, every expert, for any length (ONNX export)

    def reset_usage(self) -> None:
        self.tokens_per_expert.zero_()

    def experts_are_plain_linears(self) -> bool:
        """True when every expert projection is an unwrapped `nn.Linear` (not quantized, not LoRA-wrapped) in a dtype
        that the grouped matmul takes, so that their weights can be stacked for the grouped dispatch."""
        return all(
            type(proj) is nn.Linear and proj.weight.dtype in GROUPED_MM_DTYPES
            for expert in self.experts
            for proj in (expert.gate_up_proj, expert.down_proj)
        )

    def dispatch_for(self, num_tokens: int) -> str:
        """The dispatch form for a call over `num_tokens` tokens (see the module docstring)."""
        if num_tokens <= DENSE_DISPATCH_MAX_TOKENS:
            return "dense"
        return "grouped" if self.experts_are_plain_linears() else "looped"

    def forward(self, hidden_states: torch.Tensor, dispatch: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(b, l, d) -> output (b, l, d) and router logits (b*l, e). `dispatch` forces a form (tests)."""
        shape = hidden_states.shape
        tokens = hidden_states.reshape(-1, shape[-1])  # (t, d)

        # Route.
        router_logits = self.router(as_input_of(self.router, tokens))  # (t, e), fp32 if the router was kept so
        weights, experts = route(router_logits, self.top_k)
        with torch.no_grad():  # a one-hot sum, not bincount: its shape is static, so it compiles
            self.tokens_per_expert += F.one_hot(experts, self.num_experts).sum((0, 1))

        dispatch = dispatch or ("dense" if self.static_dispatch else self.dispatch_for(tokens.shape[0]))
        if dispatch == "dense":
            # (t, e) routing weights with zeros for the experts not picked; then a fixed loop over the experts.
            gate = torch.zeros_like(router_logits, dtype=weights.dtype).scatter(1, experts, weights).to(tokens.dtype)
            out = torch.zeros_like(tokens)
            for add_expert in skip_unrouted(self.experts, gate, skip=not self.static_dispatch):
                out = add_expert(out, tokens)
            return out.reshape(shape), router_logits

        # Dispatch: sort the t*k (token, expert) slots by expert, so each expert reads one contiguous slice.
        slot_expert = experts.reshape(-1)  # slot s = token s // k, its (s % k)-th choice
        order = slot_expert.argsort(stable=True)
        inverse = order.argsort()
        t, k = tokens.shape[0], self.top_k
        slot_input = PermuteRows.apply(tokens[:, None].expand(t, k, -1).reshape(t * k, -1), order, inverse)

        # Experts, each on its own slots.
        if dispatch == "grouped":
            # histc, not bincount: a static shape (and no host round trip) for the offsets of the grouped matmul
            counts = torch.histc(slot_expert.float(), bins=self.num_experts, min=0, max=self.num_experts - 1)
            offsets = counts.cumsum(0).to(torch.int32)
            gate_up = torch.stack([e.gate_up_proj.weight for e in self.experts]).transpose(1, 2)  # (e, d, 2i)
            down = torch.stack([e.down_proj.weight for e in self.experts]).transpose(1, 2)  # (e, i, d)
            slot_input, gate_up, down = in_autocast_dtype(slot_input, gate_up, down)
            gate, up = grouped_mm(slot_input, gate_up, offsets).chunk(2, dim=-1)
            hidden = F.dropout(F.silu(gate) * up, self.experts[0].dropout, self.training)  # as IteraLiteMLP does
            slot_output = grouped_mm(hidden, down, offsets)
        elif dispatch == "looped":
            counts = torch.bincount(slot_expert, minlength=self.num_experts).tolist()
            parts = zip(self.experts, slot_input.split(counts))
            # an expert with no slot is not called: a quantized layer may reject an empty input
            slot_output = torch.cat([expert(part) if part.shape[0] else part for expert, part in parts])
        else:
            raise ValueError(f"dispatch must be 'dense', 'grouped' or 'looped', got {dispatch!r}")

        # Combine: each token's k outputs back in its own rows (the inverse permutation), weighted and summed.
        token_outputs = PermuteRows.apply(slot_output, inverse, order).view(t, k, -1)
        out = (token_outputs * weights[..., None].to(tokens.dtype)).sum(1)
        return out.reshape(shape), router_logits
