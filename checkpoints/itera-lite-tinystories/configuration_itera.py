"""Configuration of Itera-Lite: a selective state-space (Mamba-2 SSD) language model with a sparse MoE feed-forward.

Every value is checked when the config is built, so a bad config fails here, with the field's name, and not
deep inside a forward pass.
"""

from __future__ import annotations

import math

from transformers import PreTrainedConfig


class IteraLiteConfig(PreTrainedConfig):
    r"""
    Args:
        vocab_size: Number of token ids.
        hidden_size: Width `d` of the residual stream.
        num_hidden_layers: Number of blocks (SSM mixer + feed-forward).
        state_size: SSM state size `n` per head (the Mamba-2 `d_state`).
        expand: `d_inner = expand * hidden_size`, the width inside the mixer.
        head_dim: Channels `p` per SSM head; `num_heads = d_inner / head_dim`, each head with its own decay.
        conv_kernel: Width of the causal depthwise convolution before the scan.
        chunk_size: Chunk length of the parallel (chunked) scan used by training and prefill.
        time_step_min, time_step_max: Range from which the initial step Δ is sampled (log-uniform).
        time_step_floor: Lower bound of the initial Δ.
        intermediate_size: Width of the dense SwiGLU MLP.
        num_experts: Experts in each MoE layer.
        num_experts_per_tok: Experts each token is routed to (top-k).
        moe_intermediate_size: Width of each expert's SwiGLU.
        moe_layer_period, moe_layer_offset: Layer `i` is MoE when `i % period == offset` (default: every other
            layer, starting with the second, as in the original Itera-Lite design). `num_experts=0` disables MoE.
        router_aux_loss_coef: Weight of the load-balancing loss added to `loss` whenever labels are given.
        hidden_dropout: Dropout on the output of every mixer and feed-forward before it joins the residual stream
            (GPT-2's residual dropout); training only.
        expert_dropout: Dropout on the hidden activation inside every expert and dense MLP (the Switch
            Transformer's expert dropout); training only.
        output_router_logits: Return the router logits of every MoE layer.
        rms_norm_eps: Epsilon of the RMSNorms.
        initializer_range: Std of the normal init of linear and embedding weights.
        tie_word_embeddings: Share the LM head with the token embedding.
        use_cache: Return the recurrent-state cache from `forward`.
    """

    model_type = "itera_lite"
    keys_to_ignore_at_inference = ["cache"]

    def __init__(
        self,
        vocab_size: int = 8192,
        hidden_size: int = 256,
        num_hidden_layers: int = 4,
        state_size: int = 64,
        expand: int = 2,
        head_dim: int = 64,
        conv_kernel: int = 4,
        chunk_size: int = 64,
        time_step_min: float = 0.001,
        time_step_max: float = 0.1,
        time_step_floor: float = 1e-4,
        intermediate_size: int = 768,
        num_experts: int = 4,
        num_experts_per_tok: int = 2,
        moe_intermediate_size: int = 384,
        moe_layer_period: int = 2,
        moe_layer_offset: int = 1,
        router_aux_loss_coef: float = 0.01,
        hidden_dropout: float = 0.0,
        expert_dropout: float = 0.0,
        output_router_logits: bool = False,
        rms_norm_eps: float = 1e-5,
        initializer_range: float = 0.02,
        tie_word_embeddings: bool = True,
        use_cache: bool = True,
        pad_token_id: int | None = 0,
        bos_token_id: int | None = 1,
        eos_token_id: int | None = 2,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.state_size = state_size
        self.expand = expand
        self.head_dim = head_dim
        self.conv_kernel = conv_kernel
        self.chunk_size = chunk_size
        self.time_step_min = time_step_min
        self.time_step_max = time_step_max
        self.time_step_floor = time_step_floor
        self.intermediate_size = intermediate_size
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.moe_intermediate_size = moe_intermediate_size
        self.moe_layer_period = moe_layer_period
        self.moe_layer_offset = moe_layer_offset
        self.router_aux_loss_coef = router_aux_loss_coef
        self.hidden_dropout = hidden_dropout
        self.expert_dropout = expert_dropout
        self.output_router_logits = output_router_logits
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        self._validate()
        # save_pretrained writes auto_map entries only for the classes it saves; AutoModel is added here so that
        # AutoModel.from_pretrained(..., trust_remote_code=True) also finds the base model in a causal-LM folder.
        kwargs.setdefault("auto_map", {"AutoModel": "modeling_itera.IteraLiteModel"})
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    def _validate(self) -> None:
        def positive_int(v):
            return isinstance(v, int) and not isinstance(v, bool) and v > 0

        def positive_float(v):
            return isinstance(v, (int, float)) and math.isfinite(v) and v > 0

        d_inner = self.expand * self.hidden_size if positive_int(self.expand) and positive_int(self.hidden_size) else 0
        ints = "vocab_size hidden_size num_hidden_layers state_size expand head_dim conv_kernel chunk_size"
        ints += " intermediate_size moe_layer_period"
        floats = "time_step_min time_step_max time_step_floor rms_norm_eps initializer_range"
        rules = [(name, positive_int, "a positive int") for name in ints.split()]
        rules += [(name, positive_float, "a finite float > 0") for name in floats.split()]
        rules += [
            ("num_experts", lambda v: isinstance(v, int) and v >= 0, "an int >= 0 (0 disables MoE)"),
            ("head_dim", lambda v: d_inner % v == 0, f"a divisor of expand * hidden_size = {d_inner}"),
            ("time_step_max", lambda v: v >= self.time_step_min, f">= time_step_min={self.time_step_min}"),
            (
                "router_aux_loss_coef",
                lambda v: isinstance(v, (int, float)) and math.isfinite(v) and v >= 0,
                "a finite float >= 0",
            ),
            (
                "moe_layer_offset",
                lambda v: isinstance(v, int) and 0 <= v < self.moe_layer_period,
                f"an int in [0, moe_layer_period={self.moe_layer_period})",
            ),
        ]
        rules += [
            (name, lambda v: isinstance(v, (int, float)) and 0 <= v < 1, "a float in [0, 1)")
            for name in ("hidden_dropout", "expert_dropout")
        ]
        if self.num_experts:
            rules += [
                (
                    "num_experts_per_tok",
                    lambda v: isinstance(v, int) and 1 <= v <= self.num_experts,
                    f"an int in [1, num_experts={self.num_experts}]",
                ),
                ("moe_intermediate_size", positive_int, "a positive int"),
            ]
        for name, ok, expected in rules:
            value = getattr(self, name)
            if not ok(value):
                raise ValueError(f"IteraLiteConfig.{name} must be {expected}, got {value!r}")

    @property
    def intermediate_ssm_size(self) -> int:
        """`d_inner`: the width of the SSM mixer."""
        return self.expand * self.hidden_size

    @property
    def num_heads(self) -> int:
        """SSM heads; each has a scalar decay (the Mamba-2 SSD form)."""
        return self.intermediate_ssm_size // self.head_dim

    @property
    def layers_block_type(self) -> list[str]:
        """The feed-forward of each layer: "moe" or "mlp"."""
        return [
            "moe" if self.num_experts > 0 and i % self.moe_layer_period == self.moe_layer_offset else "mlp"
            for i in range(self.num_hidden_layers)
        ]

    @property
    def layer_types(self) -> list[str]:
        """Tells `DynamicCache` to hold one conv state and one recurrent state per layer."""
        return ["linear_attention"] * self.num_hidden_layers


__all__ = ["IteraLiteConfig"]
