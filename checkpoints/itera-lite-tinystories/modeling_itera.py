"""Itera-Lite: pre-norm blocks of a selective SSM mixer (Mamba-2 SSD) and a feed-forward (sparse MoE on some layers,
dense SwiGLU on the others), as a transformers `PreTrainedModel` with a recurrent-state cache.

There is no positional embedding and no maximum length: the SSM carries order, and generation carries a fixed-size
state per layer (transformers' `DynamicCache` of `LinearAttentionLayer`s), so every new token costs the same.
"""

from __future__ import annotations

import copy
import inspect
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BitsAndBytesConfig, DynamicCache, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.utils import logging
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import can_return_tuple

from .configuration_itera import IteraLiteConfig
from .generation import (
    check_token_ids,
    prepare_compiled_generation,
    prompt_checked_once,
    remember_read_ids,
    unread_length,
)
from .loading import describe_unloadable_weights
from .loss import causal_lm_loss_from_hidden
from .moe import IteraLiteMLP, IteraLiteSparseMoE, load_balancing_loss
from .ssm import IteraLiteMixer

logger = logging.get_logger(__name__)

# The range from which each head's decay rate A is initialised (Mamba-2's A_init_range).
A_INIT_RANGE = (1.0, 16.0)
# bitsandbytes' packed 4-bit CPU kernel (AVX512-BF16) needs in_features % 64 == 0 and out_features % 32 == 0.
BNB_CPU_BLOCK_IN, BNB_CPU_BLOCK_OUT = 64, 32


def cache_nbytes(cache) -> int:
    """Bytes held by a cache's tensors (all layers, all sequences of the batch). Works for attention caches too."""
    total = 0
    for layer in cache.layers:
        for name in ("conv_states", "recurrent_states", "keys", "values"):
            held = getattr(layer, name, None)
            tensors = held.values() if isinstance(held, dict) else [held]
            total += sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
    return total


def seq_idx_from_cu_seq_lens(cu_seq_lens: torch.Tensor, length: int) -> torch.Tensor:
    """The document index of each position, (1, length) int32, from the cumulative lengths of packed documents
    `[0, l_1, l_1 + l_2, ..., length]` (transformers' `cu_seq_lens_q`, for a batch flattened to one row)."""
    if cu_seq_lens.dim() != 1 or cu_seq_lens.numel() < 2:
        raise ValueError(f"cu_seq_lens_q must be 1-D [0, ..., length], got shape {tuple(cu_seq_lens.shape)}")
    positions = torch.arange(length, device=cu_seq_lens.device)
    return torch.searchsorted(cu_seq_lens[1:-1].to(positions.dtype), positions, right=True).to(torch.int32)[None]


class IteraLiteRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The mean of squares in fp32 (bf16 would lose the small components); one fused op.
        return F.rms_norm(x.float(), x.shape[-1:], self.weight.float(), self.eps).to(x.dtype)


class IteraLiteBlock(GradientCheckpointingLayer):
    """x + dropout(mixer(norm(x))), then x + dropout(feed_forward(norm(x))); the dropout only when training."""

    def __init__(self, config: IteraLiteConfig, layer_idx: int):
        super().__init__()
        self.is_moe = config.layers_block_type[layer_idx] == "moe"
        self.mixer_norm = IteraLiteRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mixer = IteraLiteMixer(config, layer_idx)
        self.ff_norm = IteraLiteRMSNorm(config.hidden_size, config.rms_norm_eps)
        if self.is_moe:
            self.feed_forward = IteraLiteSparseMoE(config)
        else:
            self.feed_forward = IteraLiteMLP(config.hidden_size, config.intermediate_size, config.expert_dropout)
        self.hidden_dropout = config.hidden_dropout

    def forward(
        self,
        hidden_states: torch.Tensor,
        cache=None,
        attention_mask: torch.Tensor | None = None,
        seq_idx: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        mixed = self.mixer(self.mixer_norm(hidden_states), cache, attention_mask, seq_idx)
        hidden_states = hidden_states + F.dropout(mixed, self.hidden_dropout, self.training)
        router_logits = None
        if self.is_moe:
            ff, router_logits = self.feed_forward(self.ff_norm(hidden_states))
        else:
            ff = self.feed_forward(self.ff_norm(hidden_states))
        return hidden_states + F.dropout(ff, self.hidden_dropout, self.training), router_logits


class IteraLitePreTrainedModel(PreTrainedModel):
    config: IteraLiteConfig
    config_class = IteraLiteConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["IteraLiteBlock"]
    _is_stateful = True
    # True, and tested: the decode step compiles into one graph (static-shape MoE, no host round trip).
    _can_compile_fullgraph = True
    # The decay rates and skips are tiny vectors whose precision matters for long sequences (fp16 loads keep them fp32).
    # The router is kept too: its few logits pick discrete routes (Switch Transformer's "selective precision").
    _keep_in_fp32_modules = ["mixer.A_log", "mixer.D", "mixer.dt_bias", "feed_forward.router"]

    def modules_kept_out_of_quantization(self) -> list[str]:
        """Linear layers that bitsandbytes must leave in full precision: the tied LM head, the router (its few
        logits pick discrete routes), and any projection whose shape the 4-bit CPU kernel rejects. Names are
        suffixes, matched in every layer."""
        keep = {"lm_head", "feed_forward.router"}
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear) and not name.endswith("lm_head"):
                if module.in_features % BNB_CPU_BLOCK_IN or module.out_features % BNB_CPU_BLOCK_OUT:
                    keep.add(".".join(name.split(".")[-2:]))
        return sorted(keep)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, with two additions: a `BitsAndBytesConfig` that names no modules to
        skip gets the model's own list (`modules_kept_out_of_quantization`), so a user passes nothing else; and an
        error that names the file and the tensor when the weights of a local folder are corrupted or misfit."""
        quantization = kwargs.get("quantization_config")
        if isinstance(quantization, BitsAndBytesConfig) and not quantization.llm_int8_skip_modules:
            kwargs["quantization_config"] = copy.deepcopy(quantization)
            kwargs["quantization_config"].llm_int8_skip_modules = cls._shape_model(
                pretrained_model_name_or_path, kwargs
            ).modules_kept_out_of_quantization()
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except Exception as err:  # safetensors' own error type derives from Exception only
            try:
                expected = {
                    k: tuple(v.shape)
                    for k, v in cls._shape_model(pretrained_model_name_or_path, kwargs).state_dict().items()
                }
            except Exception:
                raise err from None
            problem = describe_unloadable_weights(pretrained_model_name_or_path, expected)
            if problem is None:
                raise
            raise OSError(f"cannot load the weights: {problem}") from err

    @classmethod
    def _shape_model(cls, pretrained_model_name_or_path, kwargs: dict) -> IteraLitePreTrainedModel:
        """The model a checkpoint's config describes, on the meta device: shapes and names, no memory."""
        config = kwargs.get("config")
        if not isinstance(config, IteraLiteConfig):
            config = IteraLiteConfig.from_pretrained(pretrained_model_name_or_path)
        with torch.device("meta"):
            return cls(config)

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, IteraLiteMixer):
            heads = module.num_heads
            # A spread over A_INIT_RANGE, so the heads remember over different time scales.
            A = torch.linspace(*A_INIT_RANGE, heads) if heads > 1 else torch.tensor([A_INIT_RANGE[0]])
            init.copy_(module.A_log, torch.log(A))
            init.ones_(module.D)
            cfg = self.config
            # Δ log-uniform in [time_step_min, time_step_max]; dt_bias is its inverse softplus.
            log_dt = torch.rand(heads) * (math.log(cfg.time_step_max) - math.log(cfg.time_step_min))
            dt = torch.exp(log_dt + math.log(cfg.time_step_min)).clamp(min=cfg.time_step_floor)
            init.copy_(module.dt_bias, dt + torch.log(-torch.expm1(-dt)))
        elif isinstance(module, IteraLiteSparseMoE):
            init.zeros_(module.tokens_per_expert)


class IteraLiteModel(IteraLitePreTrainedModel):
    def __init__(self, config: IteraLiteConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(IteraLiteBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = IteraLiteRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False
        # Set by `generate` (which checks the prompt once): the decode steps' ids come from the LM head.
        self.skip_token_range_check = False
        self.post_init()

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @deprecate_kwarg("cache_params", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: DynamicCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_router_logits: bool | None = None,
        seq_idx: torch.Tensor | None = None,
        cu_seq_lens_q: torch.Tensor | None = None,
        **kwargs,
    ) -> MoeModelOutputWithPast:
        """Runs the blocks over new tokens, continuing from `cache` if it holds a previous state.

        Args:
            input_ids: (b, l) token ids, or `inputs_embeds` (b, l, d); exactly one of them.
            attention_mask: (b, l_total) with 1 for tokens and 0 for left padding; only its last l columns are used.
            cache: a `DynamicCache(config=...)`; its state is read and updated in place.
            seq_idx: (b, l) int, the document index of each position when documents are packed into one row
                (`DataCollatorWithFlattening(return_seq_idx=True)`): at each document start the SSM state and the
                conv window reset, so each document is computed as if alone. The first document continues `cache`.
            cu_seq_lens_q: (n_docs + 1,) cumulative document lengths of a batch of one row, instead of `seq_idx`.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds")
        if input_ids is not None:
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must have shape (batch, length), got {tuple(input_ids.shape)}")
            if input_ids.numel() == 0:
                raise ValueError(f"input_ids is empty (shape {tuple(input_ids.shape)}): give at least one token")
            # Compiled code skips the range check: reading the range back is a host round trip and a graph break.
            check_range = not (self.skip_token_range_check or torch.compiler.is_compiling())
            check_token_ids(input_ids, self.config.vocab_size, check_range)
            inputs_embeds = self.embed_tokens(input_ids.long())  # the embedding takes int64 (or int32) only
        else:
            hidden = self.config.hidden_size
            if inputs_embeds.dim() != 3 or 0 in inputs_embeds.shape[:2] or inputs_embeds.shape[2] != hidden:
                shape = tuple(inputs_embeds.shape)
                raise ValueError(f"inputs_embeds must have shape (batch, length > 0, hidden={hidden}), got {shape}")
            if not inputs_embeds.is_floating_point():
                raise ValueError(f"inputs_embeds must be floating point, got {inputs_embeds.dtype}")
            inputs_embeds = inputs_embeds.to(self.embed_tokens.weight.dtype)  # compute in the model's dtype
        b, l = inputs_embeds.shape[:2]
        if cu_seq_lens_q is not None and seq_idx is None:
            if b != 1:
                raise ValueError(f"cu_seq_lens_q describes one flattened row; got a batch of {b}: pass seq_idx")
            seq_idx = seq_idx_from_cu_seq_lens(cu_seq_lens_q, l)
        if seq_idx is not None and tuple(seq_idx.shape) != (b, l):
            raise ValueError(f"seq_idx must have shape (batch={b}, length={l}), got {tuple(seq_idx.shape)}")
        if attention_mask is not None and (
            attention_mask.dim() != 2 or attention_mask.shape[0] != b or attention_mask.shape[1] < l
        ):
            raise ValueError(
                f"attention_mask must have shape (batch={b}, length >= {l}), got {tuple(attention_mask.shape)}"
            )
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            use_cache = False
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        output_router_logits = (
            self.config.output_router_logits if output_router_logits is None else output_router_logits
        )
        output_hidden_states = (
            self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        )

        hidden_states = inputs_embeds
        all_hidden_states = [] if output_hidden_states else None
        all_router_logits = [] if output_router_logits else None
        for layer in self.layers:
            if output_hidden_states:
                all_hidden_states.append(hidden_states)
            hidden_states, router_logits = layer(
                hidden_states, cache=cache, attention_mask=attention_mask, seq_idx=seq_idx
            )
            if output_router_logits and router_logits is not None:
                all_router_logits.append(router_logits)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden_states.append(hidden_states)

        return MoeModelOutputWithPast(
            last_hidden_state=hidden_states,
            cache=cache if use_cache else None,
            hidden_states=tuple(all_hidden_states) if output_hidden_states else None,
            router_logits=tuple(all_router_logits) if output_router_logits else None,
        )


class IteraLiteForCausalLM(IteraLitePreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    # Opt-in: train from the hidden states through the chunked LM head + cross-entropy, without the logits (see
    # `forward`). Off by default, so that code reading `outputs.logits` while training (a distillation loss, a
    # metric, transformers' checks) gets them as from any transformers model; `training/` turns it on.
    fused_training_loss: bool = False

    def __init__(self, config: IteraLiteConfig):
        super().__init__(config)
        self.model = IteraLiteModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @deprecate_kwarg("cache_params", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: DynamicCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_router_logits: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        return_logits: bool | None = None,
        seq_idx: torch.Tensor | None = None,
        cu_seq_lens_q: torch.Tensor | None = None,
        **kwargs,
    ) -> MoeCausalLMOutputWithPast:
        """Like `IteraLiteModel.forward`, plus the LM head and, when `labels` are given, the loss.

        The logits are always returned, as by transformers' own models, unless the fused loss is asked for: with
        `model.fused_training_loss = True` (what `training/` sets), training (train mode, autograd on, `labels`
        given) returns `logits=None` and takes the loss from the hidden states through a chunked LM head +
        cross-entropy that never holds the (tokens x vocab) logits, 16x less memory at 8 x 512 tokens.
        `return_logits` decides per call: True gives the logits (the loss from them), False the fused loss.

        The loss is the shifted cross-entropy plus `router_aux_loss_coef` times the load-balancing loss of the MoE
        layers, always (training a MoE without it lets the routing collapse). Under gradient accumulation the
        Trainer passes `num_items_in_batch`; the aux term is then weighted by this micro-batch's share of the
        tokens, so that it adds up to one mean over the accumulated batch, like the cross-entropy does.

        Packed documents (`seq_idx` or `cu_seq_lens_q`, see `IteraLiteModel.forward`) give each document the logits
        it has alone; labels of -100 at each document's first token (as `DataCollatorWithFlattening` sets them) then
        give each document the loss it has alone too.
        """
        has_moe = "moe" in self.config.layers_block_type
        need_router_logits = has_moe and (
            labels is not None or output_router_logits or self.config.output_router_logits
        )
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            output_router_logits=need_router_logits,
            seq_idx=seq_idx,
            cu_seq_lens_q=cu_seq_lens_q,
            return_dict=True,  # whatever config.return_dict says: the tuple is made once, at the end
        )
        hidden_states = outputs.last_hidden_state
        if return_logits is None:
            return_logits = labels is None or not (
                self.fused_training_loss and self.training and torch.is_grad_enabled()
            )
        # The fused loss needs the whole sequence and a plain head (a LoRA- or bnb-wrapped head gets the logits path).
        fused_loss = (
            labels is not None
            and not return_logits
            and isinstance(logits_to_keep, int)
            and logits_to_keep == 0
            and type(self.lm_head) is nn.Linear
        )
        logits = None
        if not fused_loss:
            keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            logits = self.lm_head(hidden_states[:, keep, :])

        loss = aux_loss = None
        if need_router_logits:
            aux_loss = self.router_aux_loss(outputs.router_logits, attention_mask)
        if labels is not None:
            if fused_loss:
                loss = causal_lm_loss_from_hidden(hidden_states, self.lm_head.weight, labels, **kwargs)
            else:
                loss = self.loss_function(logits, labels, self.config.vocab_size, **kwargs)
            aux_weight = self.config.router_aux_loss_coef
            num_items = kwargs.get("num_items_in_batch")
            if num_items is not None:
                local_items = (labels[..., 1:] != -100).sum()
                aux_weight = aux_weight * local_items.to(loss.device) / num_items
            if aux_loss is not None:
                loss = loss + aux_weight * aux_loss.to(loss.device)

        return MoeCausalLMOutputWithPast(
            loss=loss,
            aux_loss=aux_loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            router_logits=outputs.router_logits if (output_router_logits or self.config.output_router_logits) else None,
        )

    def generate(self, inputs: torch.Tensor | None = None, *args, **kwargs):
        """`GenerationMixin.generate`, with two additions.

        The prompt is checked once, first: an empty prompt, a mask that does not match it, or an id outside the
        vocabulary gets a ValueError that says so (instead of an IndexError deep inside generation), and the decode
        steps then skip the check. An explicit `compile_config` compiles the decode step on any device, CPU
        included (see `generation.py`); with none, transformers' default applies.
        """
        ids = inputs if inputs is not None else kwargs.get("input_ids")
        if isinstance(ids, torch.Tensor) and kwargs.get("inputs_embeds") is None:
            if ids.dim() != 2 or ids.shape[1] == 0:
                raise ValueError(f"input_ids must be a non-empty (batch, length) tensor, got shape {tuple(ids.shape)}")
            mask = kwargs.get("attention_mask")
            if isinstance(mask, torch.Tensor) and mask.shape != ids.shape:
                raise ValueError(f"attention_mask has shape {tuple(mask.shape)}, input_ids {tuple(ids.shape)}")
            check_token_ids(ids, self.config.vocab_size)
        given_cache = kwargs.get("cache", kwargs.get("past_key_values"))
        with prepare_compiled_generation(self, kwargs), prompt_checked_once(self):
            out = super().generate(inputs, *args, **kwargs)
        # Whichever cache the caller holds now has read every token but the last one generated (see generation.py).
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        for cache in (given_cache, getattr(out, "cache", None)):
            if cache is not None:
                remember_read_ids(cache, sequences[:, :-1])
        return out

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @deprecate_kwarg("cache_params", "5.40.0", new_name="cache")
    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, *args, **kwargs) -> dict:
        """transformers' inputs, with the attention mask cut to the columns of the new tokens: the mixer reads only
        those, and a mask that grows by a column per step would change the compiled step's input shape each time.
        A cache that `generate` or `load_state` filled knows the ids it has read: given the whole sequence with it,
        the first step feeds only the tokens it has not read."""
        cache = kwargs.get("cache")
        if kwargs.get("is_first_iteration") and cache is not None:
            # What the cache has read is known exactly, so it wins over transformers' guess: from 5.25 on, generate
            # slices by `cache.get_seq_length()`, a count that a cache filled another way (`load_state`, a server's
            # prefix cache) need not hold.
            unread = unread_length(input_ids, cache)
            if unread is not None:
                kwargs["next_sequence_length"] = unread
        inputs = super().prepare_inputs_for_generation(input_ids, *args, **kwargs)
        new_tokens = inputs.get("input_ids") if inputs.get("input_ids") is not None else inputs.get("inputs_embeds")
        mask = inputs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and new_tokens is not None:
            inputs["attention_mask"] = mask[:, -new_tokens.shape[1] :].contiguous()  # fixed strides too
        return inputs

    def router_aux_loss(
        self, router_logits: tuple[torch.Tensor, ...], attention_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Mean of the per-layer load-balancing losses, over real (unpadded) tokens."""
        n_tokens = router_logits[0].shape[0]
        token_mask = None
        if attention_mask is not None:
            token_mask = attention_mask[:, -(n_tokens // attention_mask.shape[0]) :].reshape(-1)
        losses = [load_balancing_loss(logits, self.config.num_experts_per_tok, token_mask) for logits in router_logits]
        return torch.stack(losses).mean()

    def expert_usage(self, reset: bool = False) -> dict[int, list[int]]:
        """Token slots each expert has served since the last reset: {MoE layer index: [count per expert]}."""
        usage = {}
        for i, layer in enumerate(self.model.layers):
            if layer.is_moe:
                usage[i] = layer.feed_forward.tokens_per_expert.tolist()
                if reset:
                    layer.feed_forward.reset_usage()
        return usage


# generate() inspects the forward's signature at every step for remote-code models (a back-compat check for
# `cache_position`); through the decorators that is ~0.1 ms per token. The signature never changes: compute it once.
IteraLiteForCausalLM.forward.__signature__ = inspect.signature(IteraLiteForCausalLM.forward)

__all__ = [
    "IteraLitePreTrainedModel",
    "IteraLiteModel",
    "IteraLiteForCausalLM",
    "cache_nbytes",
    "causal_lm_loss_from_hidden",
]
