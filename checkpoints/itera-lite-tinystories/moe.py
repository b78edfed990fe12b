"""Sparse Mixture-of-Experts feed-forward (Switch Transformer, Fedus et al. 2021; Mixtral, Jiang et al. 2024).

Four stanzas: route (softmax in fp32, top-k, renormalise), dispatch (group the token slots by expert), experts
(each a SwiGLU of `nn.Linear`s, run only on its own tokens), combine (weighted scatter-add). The load-balancing loss
is a pure function of the router logits, so the model can add it to `loss`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_itera import IteraLiteConfig
from .ssm import as_input_of


class IteraLiteMLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)), with gate and up fused into one `nn.Linear`."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


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


class IteraLiteSparseMoE(nn.Module):
    """Router + experts. `tokens_per_expert` counts, since construction or the last `reset_usage()`, how many token
    slots each expert has served: the expert usage that a user can inspect. (Under activation checkpointing the
    recomputed forward counts a batch twice; the shares between experts stay right.)"""

    def __init__(self, config: IteraLiteConfig):
        super().__init__()
        self.num_experts, self.top_k = config.num_experts, config.num_experts_per_tok
        self.router = nn.Linear(config.hidden_size, self.num_experts, bias=False)
        self.experts = nn.ModuleList(
            IteraLiteMLP(config.hidden_size, config.moe_intermediate_size) for _ in range(self.num_experts)
        )
        self.register_buffer("tokens_per_expert", torch.zeros(self.num_experts, dtype=torch.long), persistent=False)

    def reset_usage(self) -> None:
        self.tokens_per_expert.zero_()

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(b, l, d) -> output (b, l, d) and router logits (b*l, e)."""
        shape = hidden_states.shape
        tokens = hidden_states.reshape(-1, shape[-1])  # (t, d)

        # Route.
        router_logits = self.router(as_input_of(self.router, tokens))  # (t, e), fp32 if the router was kept so
        weights, experts = route(router_logits, self.top_k)

        if tokens.shape[0] == 1:  # one token (batch-1 decoding): run its k experts directly, nothing to sort
            with torch.no_grad():
                self.tokens_per_expert[experts[0]] += 1
            out = 0
            for slot, e in enumerate(experts[0].tolist()):
                out = out + self.experts[e](tokens) * weights[:, slot : slot + 1].to(tokens.dtype)
            return out.reshape(shape), router_logits

        # Dispatch: sort the t*k (token, expert) slots by expert, so each expert reads one contiguous slice.
        slot_expert = experts.reshape(-1)
        order = slot_expert.argsort(stable=True)
        counts = torch.bincount(slot_expert, minlength=self.num_experts)
        with torch.no_grad():
            self.tokens_per_expert += counts
        slot_token = order // self.top_k
        slot_weight = weights.reshape(-1)[order, None].to(tokens.dtype)

        # Experts, each on its own tokens only; combine by weighted scatter-add.
        out = torch.zeros_like(tokens)
        start = 0
        for expert, n in zip(self.experts, counts.tolist()):
            if n == 0:
                continue
            idx = slot_token[start : start + n]
            out.index_add_(0, idx, expert(tokens[idx]) * slot_weight[start : start + n])
            start += n
        return out.reshape(shape), router_logits
