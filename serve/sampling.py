"""Choosing the next token of each sequence in a batch, each with its own settings and random generator.

Every sequence draws from its own `torch.Generator`, so a seeded request gives the same tokens whichever requests
share its decode steps. Greedy rows (temperature 0) take the argmax; sampled rows are filtered (top-k, then top-p,
as `generate()` orders them) and drawn, all rows of a step together.

Before that, OpenAI's `logit_bias` and frequency/presence penalties shift a row's logits (`adjust_logits`); the
logprobs a client asks for are those of the model itself, before any of these (as vLLM reports them by default).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

NUCLEUS_CANDIDATES = 256  # tokens ranked before falling back to a full sort (see `filter_probs`)


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy; top_k 0 and top_p 1 mean no filtering."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def filters(self) -> bool:
        return self.top_k > 0 or self.top_p < 1.0


@dataclass(frozen=True)
class Penalties:
    """OpenAI's logit adjustments: `logit_bias` {token id: added logit}; the penalties subtract
    `frequency * count + presence * (count > 0)` for each token already generated in this choice."""

    frequency: float = 0.0
    presence: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)

    @property
    def neutral(self) -> bool:
        return not (self.frequency or self.presence or self.logit_bias)


def adjust_logits(logits: torch.Tensor, penalties: list[Penalties], counts: list[Counter]) -> torch.Tensor:
    """The logits after each row's bias and penalties (a new tensor only when some row has any).

    Args:
        logits: (b, v) last-position logits; penalties, counts: one per row (the tokens generated so far).

    Returns:
        (b, v) logits.
    """
    rows = [i for i, p in enumerate(penalties) if not p.neutral]
    if not rows:
        return logits
    logits = logits.float().clone()
    for i in rows:
        p, seen = penalties[i], counts[i]
        if p.logit_bias:
            ids = torch.tensor(list(p.logit_bias), device=logits.device)
            logits[i, ids] += torch.tensor(list(p.logit_bias.values()), device=logits.device)
        if seen and (p.frequency or p.presence):
            ids = torch.tensor(list(seen), device=logits.device)
            n = torch.tensor(list(seen.values()), dtype=logits.dtype, device=logits.device)
            logits[i, ids] -= p.frequency * n + p.presence
    return logits


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability under the model, and the `top` most likely tokens' [(id, logprob)]."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> list[TokenLogprob]:
    """The log-probability of each row's token and the row's k most likely tokens.

    Args:
        logits: (r, v) logits; tokens: (r,) the token of each row; k: 0-5 top tokens per row.

    Returns:
        r `TokenLogprob`s.
    """
    logp = logits.float().log_softmax(-1)  # (r, v)
    chosen = logp.gather(1, tokens[:, None]).squeeze(1).tolist()
    top_p, top_ids = logp.topk(k, dim=-1) if k else (logp[:, :0], tokens[:, None][:, :0])
    return [
        TokenLogprob(t, lp, list(zip(ids, ps)))
        for t, lp, ids, ps in zip(tokens.tolist(), chosen, top_ids.tolist(), top_p.tolist())
    ]


def filter_probs(probs: torch.Tensor, params: list[SamplingParams]) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k, then top-p, per row, for rows that all filter.

    Args:
        probs: (r, v) probabilities (after temperature); params: one per row.

    Returns:
        weights (r, c) proportional to the probabilities kept, in decreasing order (0 outside top-k and the
        nucleus), and the token id of each column (r, c).
    """
    v = probs.shape[1]
    top_k = torch.tensor([p.top_k if 0 < p.top_k < v else v for p in params], device=probs.device)
    top_p = torch.tensor([p.top_p for p in params], device=probs.device)
    # A full sort of the vocabulary costs more than a decode step: rank only the top candidates, which hold every
    # small top-k and, for a trained model, the nucleus; sort everything only when a row needs more.
    top, order = probs.topk(min(int(top_k.max()), NUCLEUS_CANDIDATES, v), dim=-1)  # (r, c), decreasing
    c = top.shape[1]
    needs_more = ((top_k > c) & (top_k < v)) | ((top_k == v) & (top.sum(-1) < top_p))
    if c < v and bool(needs_more.any()):
        top, order = probs.sort(dim=-1, descending=True)
    top = top.masked_fill(torch.arange(top.shape[1], device=probs.device) >= top_k[:, None], 0.0)
    # As in generate(), top-p applies to the distribution renormalised over the top-k (for a row without top-k,
    # the whole vocabulary, whose probabilities already sum to 1).
    renormed = top / torch.where(top_k < v, top.sum(-1), torch.ones_like(top_p))[:, None]
    # Drop a token when the tokens before it already cover top_p; the most likely token always stays.
    return top.masked_fill(renormed.cumsum(-1) - renormed >= top_p[:, None], 0.0), order


def draw(weights: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """Inverse-CDF sampling, one uniform number per row from its own generator: (r, c) weights -> (r,) columns.

    One `searchsorted` for all rows; a `multinomial` per row cost more than the model's decode step at batch 32.
    """
    cdf = weights.cumsum(-1)
    u = torch.cat([torch.rand(1, generator=g, device=cdf.device) for g in generators])
    # The first column whose CDF exceeds u * total: never a zero-weight column.
    return torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).clamp(max=cdf.shape[1] - 1).squeeze(1)


def next_tokens(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]) -> list[int]:
    """Picks one token per row.

    Args:
        logits: (b, v) last-position logits of the batch.
        params, generators: one per row.

    Returns:
        b token ids.
    """
    logits = logits.float()
    chosen = logits.argmax(-1)
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    for rows in ([i for i in sampled if not params[i].filters], [i for i in sampled if params[i].filters]):
        if not rows:
            continue
        temperature = torch.tensor([params[i].temperature for i in rows], device=logits.device)
        probs = (logits[rows] / temperature[:, None]).softmax(-1)
        gens = [generators[i] for i in rows]
        if params[rows[0]].filters:
            weights, order = filter_probs(probs, [params[i] for i in rows])
            chosen[rows] = order.gather(1, draw(weights, gens)[:, None]).squeeze(1)
        else:
            chosen[rows] = draw(probs, gens)
    return chosen.tolist()
