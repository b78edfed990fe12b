"""Itera-Lite written exactly as transformers' GraniteMoeHybrid: the one mapping of our weights and config that the
Granite-folder writer (`export_granite.py`) and the GGUF writer for llama.cpp's `granitehybrid` (`export_gguf.py`)
share.

Our blocks map one to one onto Granite's Mamba-2 layers: in_proj z | xBC | dt, a depthwise conv with bias, one group
(B and C shared by all heads), per-head A, D and dt_bias, RMSNorm of y · silu(z) over the whole inner width, tied
head, no positions, every multiplier 1.0. What does not map one to one, and how it is made exact:

- Granite's feed-forward config is global (one MoE shape plus an optional shared SwiGLU expert for every layer)
  while ours alternates dense and MoE layers. A dense layer becomes the shared expert (width `intermediate_size`)
  beside zero routed experts and a zero router; an MoE layer keeps its routed experts beside a zero shared expert.
  A zero branch adds exactly 0.0. With no dense layer the shared expert has width 0, with no MoE layer there are no
  routed experts: the zero tensors are only what the global shapes force.
- One **identity attention layer** is appended (zero q, k, v, o_proj and a zero feed-forward, no RoPE): the residual
  passes through it unchanged. Without an attention layer both transformers 5.25 (`get_mask_sizes` raises once a
  cache is used) and llama.cpp (`GGML_ASSERT(buffer)` at the first decode) fail on an all-Mamba layout; see
  docs/upstream-bugs.md. Its heads are of width 64 where the hidden size allows (else one head), which keeps the
  KV cache and its k/v projections small.
- Granite's router takes top-k of the logits and a softmax over them; ours a softmax, top-k and renormalisation:
  the same weights.

Not part of the model's remote code: modeling_itera.py does not import this file.
"""

from __future__ import annotations

import torch

from .configuration_itera import IteraLiteConfig

GRANITE_ARCHITECTURE = "GraniteMoeHybridForCausalLM"
# Width of the identity attention layer's heads when the hidden size is a multiple of it (the usual head width).
IDENTITY_HEAD_DIM = 64
# Granite's config needs a maximum length for its attention layer; ours has none (a recurrent state). vLLM sizes its
# KV cache from it: the identity layer's cache is 2 * 64 values per token per KV head.
MAX_POSITION_EMBEDDINGS = 32768


def attention_heads(config: IteraLiteConfig) -> int:
    """Heads of the identity attention layer: width IDENTITY_HEAD_DIM where the hidden size allows, else one head."""
    return config.hidden_size // IDENTITY_HEAD_DIM if config.hidden_size % IDENTITY_HEAD_DIM == 0 else 1


def has_dense(config: IteraLiteConfig) -> bool:
    return "mlp" in config.layers_block_type


def has_moe(config: IteraLiteConfig) -> bool:
    return "moe" in config.layers_block_type


def granite_config(config: IteraLiteConfig) -> dict:
    """The `config.json` of the GraniteMoeHybrid folder: plain JSON (no `time_step_limit`, whose default (0, inf) is
    the no-op we need and which `save_pretrained` writes as {"__float__": "Infinity"}), layer types as vLLM and
    llama.cpp read them ("mamba" / "attention"), our RMSNorm eps, every multiplier 1.0."""
    n = config.num_hidden_layers
    moe = has_moe(config)
    return {
        "architectures": [GRANITE_ARCHITECTURE],
        "model_type": "granitemoehybrid",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": n + 1,
        "layer_types": ["mamba"] * n + ["attention"],
        "hidden_act": "silu",
        "rms_norm_eps": config.rms_norm_eps,
        "tie_word_embeddings": config.tie_word_embeddings,
        "initializer_range": config.initializer_range,
        "use_cache": True,
        "dtype": "float32",
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        # multipliers: none in Itera-Lite
        "embedding_multiplier": 1.0,
        "residual_multiplier": 1.0,
        "attention_multiplier": 1.0,
        "logits_scaling": 1.0,
        # the feed-forward, global in Granite: routed experts of our MoE width, a shared expert of our dense width
        "intermediate_size": config.moe_intermediate_size if moe else config.intermediate_size,
        "num_local_experts": config.num_experts if moe else 0,
        "num_experts_per_tok": config.num_experts_per_tok if moe else 0,
        "router_aux_loss_coef": config.router_aux_loss_coef,
        "output_router_logits": False,
        "shared_intermediate_size": config.intermediate_size if has_dense(config) else 0,
        # the identity attention layer
        "num_attention_heads": attention_heads(config),
        "num_key_value_heads": 1,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "position_embedding_type": "nope",
        "max_position_embeddings": MAX_POSITION_EMBEDDINGS,
        # the Mamba-2 mixer
        "mamba_n_heads": config.num_heads,
        "mamba_d_head": config.head_dim,
        "mamba_d_state": config.state_size,
        "mamba_d_conv": config.conv_kernel,
        "mamba_expand": config.expand,
        "mamba_n_groups": 1,
        "mamba_chunk_size": config.chunk_size,
        "mamba_conv_bias": True,
        "mamba_proj_bias": False,
    }


def zeros_like_layer(config: IteraLiteConfig, prefix: str, dense: bool, moe: bool) -> dict[str, torch.Tensor]:
    """The zero feed-forward tensors a layer needs for Granite's global shapes (`dense`/`moe`: which of ours it has)."""
    h, out = config.hidden_size, {}
    if not dense:  # Granite always has the shared expert; of width 0 when no layer of ours is dense
        i = config.intermediate_size if has_dense(config) else 0
        out[f"{prefix}.shared_mlp.input_linear.weight"] = torch.zeros(2 * i, h)
        out[f"{prefix}.shared_mlp.output_linear.weight"] = torch.zeros(h, i)
    if has_moe(config) and not moe:
        e, i = config.num_experts, config.moe_intermediate_size
        out[f"{prefix}.block_sparse_moe.router.layer.weight"] = torch.zeros(e, h)
        out[f"{prefix}.block_sparse_moe.input_linear.weight"] = torch.zeros(e, 2 * i, h)
        out[f"{prefix}.block_sparse_moe.output_linear.weight"] = torch.zeros(e, h, i)
    return out


def granite_state_dict(model) -> dict[str, torch.Tensor]:
    """Our weights under GraniteMoeHybrid's checkpoint names (those of the released Granite checkpoints, which
    transformers renames on load and vLLM reads as they are), fp32, plus the zero tensors; no `lm_head` when tied.

    Args:
        model: an `IteraLiteForCausalLM`.

    Returns:
        {name: contiguous fp32 tensor}.
    """
    config = model.config
    ours = {k: v.detach().to(torch.float32) for k, v in model.state_dict().items()}
    out = {name: ours[name] for name in ("model.embed_tokens.weight", "model.norm.weight")}
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = ours["lm_head.weight"]
    for i, kind in enumerate(config.layers_block_type):
        src, dst = f"model.layers.{i}", f"model.layers.{i}"
        out[f"{dst}.input_layernorm.weight"] = ours[f"{src}.mixer_norm.weight"]
        out[f"{dst}.post_attention_layernorm.weight"] = ours[f"{src}.ff_norm.weight"]
        for name in ("in_proj.weight", "conv1d.weight", "conv1d.bias", "dt_bias", "A_log", "D", "norm.weight"):
            out[f"{dst}.mamba.{name}"] = ours[f"{src}.mixer.{name}"]
        out[f"{dst}.mamba.out_proj.weight"] = ours[f"{src}.mixer.out_proj.weight"]
        ff = f"{src}.feed_forward"
        if kind == "mlp":  # gate first in both
            out[f"{dst}.shared_mlp.input_linear.weight"] = ours[f"{ff}.gate_up_proj.weight"]
            out[f"{dst}.shared_mlp.output_linear.weight"] = ours[f"{ff}.down_proj.weight"]
        else:
            experts = range(config.num_experts)
            out[f"{dst}.block_sparse_moe.router.layer.weight"] = ours[f"{ff}.router.weight"]
            out[f"{dst}.block_sparse_moe.input_linear.weight"] = torch.stack(
                [ours[f"{ff}.experts.{e}.gate_up_proj.weight"] for e in experts]
            )  # (e, 2i, h), gate first
            out[f"{dst}.block_sparse_moe.output_linear.weight"] = torch.stack(
                [ours[f"{ff}.experts.{e}.down_proj.weight"] for e in experts]
            )  # (e, h, i)
        out.update(zeros_like_layer(config, dst, dense=kind == "mlp", moe=kind == "moe"))
    out.update(identity_attention_layer(config))
    return {k: v.contiguous() for k, v in out.items()}


def identity_attention_layer(config: IteraLiteConfig) -> dict[str, torch.Tensor]:
    """The appended layer: norms of ones, zero projections and a zero feed-forward, so x -> x exactly."""
    h, prefix = config.hidden_size, f"model.layers.{config.num_hidden_layers}"
    head_dim = h // attention_heads(config)
    out = {
        f"{prefix}.input_layernorm.weight": torch.ones(h),
        f"{prefix}.post_attention_layernorm.weight": torch.ones(h),
        f"{prefix}.self_attn.q_proj.weight": torch.zeros(h, h),
        f"{prefix}.self_attn.k_proj.weight": torch.zeros(head_dim, h),  # one KV head
        f"{prefix}.self_attn.v_proj.weight": torch.zeros(head_dim, h),
        f"{prefix}.self_attn.o_proj.weight": torch.zeros(h, h),
    }
    out.update(zeros_like_layer(config, prefix, dense=False, moe=False))
    return out


def cost_per_token(config: IteraLiteConfig, context: int = 0) -> dict[str, dict[str, int]]:
    """Parameters and multiply-adds per token (batch-1 decode at `context` tokens) of Itera-Lite and of its Granite
    form, to say what the zero padding costs. Multiply-adds: every weight a token's matmuls read (routed experts:
    the k it visits), the conv taps, the state update and read-out (3 · h · p · n), the identity layer's attention
    over the context; norms and activations are left out (the same in both but for the identity layer's two norms).
    """
    h, v, n_layers = config.hidden_size, config.vocab_size, config.num_hidden_layers
    d_inner, heads, state = config.intermediate_ssm_size, config.num_heads, config.state_size
    conv_dim = d_inner + 2 * state
    mixer_params = h * (d_inner + conv_dim + heads) + conv_dim * (config.conv_kernel + 1) + 3 * heads + d_inner
    mixer_params += d_inner * h + 2 * h  # out_proj and the two block norms
    mixer_macs = h * (d_inner + conv_dim + heads) + conv_dim * config.conv_kernel + 3 * d_inner * state + d_inner * h
    dense_params = 3 * h * config.intermediate_size
    expert = 3 * h * config.moe_intermediate_size
    moe_params = config.num_experts * (expert + h) if has_moe(config) else 0  # experts, router row each
    moe_macs = config.num_experts * h + config.num_experts_per_tok * expert if has_moe(config) else 0
    embed = v * h * (1 if config.tie_word_embeddings else 2)
    kinds = config.layers_block_type
    ours_params = embed + h + n_layers * mixer_params
    ours_params += sum(dense_params if k == "mlp" else moe_params for k in kinds)
    ours_macs = v * h + n_layers * mixer_macs + sum(dense_params if k == "mlp" else moe_macs for k in kinds)
    ff_params = (dense_params if has_dense(config) else 0) + moe_params  # every Granite layer has both
    ff_macs = (dense_params if has_dense(config) else 0) + moe_macs
    head_dim = h // attention_heads(config)
    attn_params = 2 * h * h + 2 * head_dim * h + 2 * h
    attn_macs = 2 * h * h + 2 * head_dim * h + 2 * attention_heads(config) * head_dim * (context + 1)
    granite_params = embed + h + n_layers * (mixer_params + ff_params) + attn_params + ff_params
    granite_macs = v * h + n_layers * (mixer_macs + ff_macs) + attn_macs + ff_macs
    return {
        "itera_lite": {"parameters": ours_params, "macs_per_token": ours_macs},
        "granite": {"parameters": granite_params, "macs_per_token": granite_macs},
        "blocks_only": {"itera_lite_macs": ours_macs - v * h, "granite_macs": granite_macs - v * h},
    }


__all__ = ["granite_config", "granite_state_dict", "cost_per_token", "attention_heads"]
