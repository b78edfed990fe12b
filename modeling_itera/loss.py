"""The causal-LM loss from the final hidden states, without ever holding the whole (tokens x vocab) logits.

Two evaluation orders of one loss, transformers' `ForCausalLMLoss` (shifted labels, `ignore_index`, a sum divided
by `num_items_in_batch` when given, else the mean over the labelled tokens):

- fp32 (no autocast): torch's chunked `F.linear_cross_entropy`, as accurate as the reference.
- under autocast (`--bf16 true`): `HalfPrecisionLinearCrossEntropy` below, the LM head's products in the autocast
  dtype, as autocast runs every other `nn.Linear` and as it runs a Llama's LM head, with the softmax, the loss and
  the weight gradient accumulated in fp32. torch's kernel offers bf16 products only with bf16 accumulation of the
  loss (~0.1 off at a loss of 9) or, with fp32 accumulation, at 2x the time of its fp32 path on CPU (torch 2.13).

Both are tested against the full-logits cross-entropy in float64 (tests/test_training_speed.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Tokens per chunk of the half-precision loss: (256 x 8192) fp32 logits are 8 MiB, which stays in cache; larger
# chunks were slower on a 2-core EPYC (256: 249 ms, 1024: 361 ms for 4096 tokens, forward + backward).
LOSS_CHUNK_TOKENS = 256


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


# A region of its own under `torch.compile(model)`: inlined, Inductor fused the gradient pass of every chunk into one
# kernel after the last chunk's product, so all chunks' logits were alive at once (16 fresh 4 MiB buffers at 8 x 512
# tokens) and the LM head's product ran 4x slower, writing to memory instead of cache.
@torch.compiler.nested_compile_region
def chunk_loss_and_grads(
    h_chunk: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, labelled: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One chunk: the summed loss (fp32), and the gradients with respect to the chunk's hidden states and to the
    weight, from d loss / d logits = softmax - one_hot(target), zero on unlabelled rows. `target` holds a valid id
    on unlabelled rows too (any: they are masked). Two evaluation orders, tested equal: in place eager (one (chunk x
    v) fp32 buffer), out of place compiled (Inductor makes it one pass; in place it ran 15x slower in a region)."""
    logits = F.linear(h_chunk, weight).float()  # (chunk, v); not `h_chunk @ weight.T`: a region takes no aliases
    if torch.compiler.is_compiling():
        log_norm = logits.logsumexp(dim=-1, keepdim=True)
        loss = ((log_norm[:, 0] - logits.gather(1, target[:, None])[:, 0]) * labelled).sum()
        one_hot = torch.arange(logits.shape[-1], device=logits.device) == target[:, None]
        grad_logits = ((logits - log_norm).exp() - one_hot.to(logits.dtype)) * labelled[:, None]
    else:
        log_probs = logits.log_softmax(dim=-1)
        loss = -(log_probs.gather(1, target[:, None])[:, 0] * labelled).sum()
        # built in place of log_probs: no second (chunk x v) fp32 buffer
        grad_logits = log_probs.exp_().scatter_add_(1, target[:, None], -labelled[:, None].to(log_probs.dtype))
        grad_logits = grad_logits.mul_(labelled[:, None])
    grad_logits = grad_logits.to(h_chunk.dtype)
    return loss, grad_logits @ weight, grad_logits.T @ h_chunk


# `use_compiled_loss(True)` (training.pretrain does it under --torch_compile true) compiles the chunk: Inductor fuses
# its upcast, log-softmax, exp, scatter and downcast into one or two passes over the logits, ~1.6x faster here.
_chunk_fn = chunk_loss_and_grads


def use_compiled_loss(enabled: bool) -> None:
    """Compile (or stop compiling) the half-precision loss's chunk. One graph per chunk shape, static; past dynamo's
    recompile limit it runs eager (not fullgraph, so never an error)."""
    global _chunk_fn
    _chunk_fn = torch.compile(chunk_loss_and_grads, dynamic=False) if enabled else chunk_loss_and_grads


class HalfPrecisionLinearCrossEntropy(torch.autograd.Function):
    """sum over labelled tokens of cross_entropy(hidden @ weight.T, target), in fp32, and its gradients, chunk by
    chunk of tokens. Each chunk's gradient is made in the forward, while its logits are at hand (the backward only
    scales them), so the logits of one chunk are all that is ever held.

    hidden (n, d) and weight (v, d) in any float dtype; the products run in `compute_dtype`. Returns a 0-dim fp32
    tensor; the gradients come back in the dtypes of `hidden` and `weight`.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, compute_dtype, ignore_index, chunk_tokens):
        h, w = hidden.to(compute_dtype), weight.to(compute_dtype)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, h.shape[0], chunk_tokens):
            target = targets[start : start + chunk_tokens]
            labelled = target != ignore_index
            loss, grad_h, grad_w = _chunk_fn(
                h[start : start + chunk_tokens], w, target.masked_fill(~labelled, 0), labelled
            )
            total += loss
            grad_hidden[start : start + chunk_tokens] = grad_h
            grad_weight += grad_w
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.saved_tensors
        grad_hidden = grad_hidden * grad_total.to(grad_hidden.dtype)
        grad_weight = (grad_weight * grad_total).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None


def causal_lm_loss_from_hidden(
    hidden_states: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
    shift_labels: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor:
    """transformers' `ForCausalLMLoss`, computed from the hidden states by a chunked LM head + cross-entropy.

    Without autocast, in fp32 (half-precision weights are upcast, as `ForCausalLMLoss` upcasts the logits); under
    autocast, the products in its dtype and the rest in fp32 (module docstring).

    Args:
        hidden_states: (b, l, d) after the final norm; lm_head_weight: (vocab, d); labels: (b, l) or None when
            `shift_labels` (b, l), already shifted, is given.
    """
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]  # tokens < n predict n
    device_type = hidden_states.device.type
    hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
    targets = shift_labels.reshape(-1).to(hidden_states.device)
    if torch.is_autocast_enabled(device_type):
        half = torch.get_autocast_dtype(device_type)
        with torch.autocast(device_type, enabled=False):
            loss = HalfPrecisionLinearCrossEntropy.apply(
                hidden, lm_head_weight, targets, half, ignore_index, LOSS_CHUNK_TOKENS
            )
        if num_items_in_batch is None:
            return loss / (targets != ignore_index).sum()
    else:
        loss = F.linear_cross_entropy(
            at_least_fp32(hidden),
            at_least_fp32(lm_head_weight),
            targets,
            reduction="sum" if num_items_in_batch is not None else "mean",
            ignore_index=ignore_index,
            options=torch.nn.LinearCrossEntropyOptions(),  # the chunked path (None would be the reference one)
        )
        if num_items_in_batch is None:
            return loss
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch
