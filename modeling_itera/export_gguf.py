"""Write an Itera-Lite model as one GGUF file for llama.cpp's `granitehybrid` architecture (`python -m
modeling_itera.export --format gguf --outtype f32|f16|q8_0`), with the `gguf` package (llama.cpp's own writer).

The weights are those of the GraniteMoeHybrid mapping (`granite.py`), renamed and reshaped as llama.cpp's converter
does for Granite-4 hybrids (`conversion/granite.py`, `conversion/mamba.py`): the fused gate|up projections split in
two, A stored as -exp(A_log), A and D as (h, 1), the gated norm as (groups, d_inner / groups), the conv as
(conv_dim, K). The tokenizer goes inside the file (byte-level BPE as llama.cpp's "gpt2" model with the "gpt-2"
pre-tokenizer, the merges, `<s>` `</s>` `<pad>`, BOS added as our tokenizer adds it), so `llama-cli -m FILE` and
ollama need nothing else.

Types: norms, biases, A, D, the conv and the router stay f32 in every file (tiny, and the router picks discrete
routes). The matrices are f32, f16 or Q8_0 (gguf's own Q8_0 quantizer, `gguf.quants`, the code llama.cpp's converter
uses; rows whose length is not a multiple of the 32-value block fall back to f16). The zero padding tensors are
stored in f16 in an f32 file: zero is exact in every type.

llama.cpp's Mamba-2 supports expand = 2 only (`granite-hybrid.cpp` asserts d_inner == 2 * n_embd): another expand
raises `ValueError` here, before anything is written; such a checkpoint still exports as a Granite folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .granite import MAX_POSITION_EMBEDDINGS, attention_heads, granite_state_dict, has_dense, has_moe

ARCH = "granitehybrid"
OUTTYPES = ("f32", "f16", "q8_0")
# Kept f32 whatever the outtype (suffixes of llama.cpp tensor names).
KEEP_F32 = ("_norm.weight", ".bias", "ssm_a", "ssm_d", "ssm_conv1d.weight", "ffn_gate_inp.weight")
Q8_0_BLOCK = 32  # values per Q8_0 block (ggml's QK8_0)


def check_expressible(config) -> None:
    """Raises ValueError for a checkpoint llama.cpp's granitehybrid cannot run."""
    if config.expand != 2:
        raise ValueError(
            f"llama.cpp's granitehybrid supports expand = 2 only (its Mamba-2 asserts d_inner == 2 * hidden_size, "
            f"src/models/granite-hybrid.cpp); this checkpoint has expand={config.expand}. "
            "Export it with --format granite (transformers, vLLM) instead."
        )


def gguf_tensors(model) -> dict[str, torch.Tensor]:
    """{llama.cpp tensor name: fp32 tensor}, in llama.cpp's layout (numpy order: the reverse of ggml's `ne`)."""
    config = model.config
    granite = granite_state_dict(model)
    out = {"token_embd.weight": granite.pop("model.embed_tokens.weight")}
    out["output_norm.weight"] = granite.pop("model.norm.weight")
    if "lm_head.weight" in granite:
        out["output.weight"] = granite.pop("lm_head.weight")
    d_inner = config.intermediate_ssm_size
    expert_prefix = "ffn_{}_exps" if has_moe(config) else "ffn_{}"  # dense-only: the shared expert is the FFN
    shared = "ffn_{}_shexp" if has_moe(config) else "ffn_{}"
    for name, tensor in granite.items():
        _, _, layer, *rest = name.split(".")
        key, blk = ".".join(rest), f"blk.{layer}"
        if key == "shared_mlp.input_linear.weight":
            if tensor.numel():  # width 0 (no dense layer): llama.cpp then has no shared expert
                gate, up = tensor.chunk(2, dim=0)
                out[f"{blk}.{shared.format('gate')}.weight"], out[f"{blk}.{shared.format('up')}.weight"] = gate, up
            continue
        if key == "block_sparse_moe.input_linear.weight":
            gate, up = tensor.chunk(2, dim=1)  # (e, i, h) each
            out[f"{blk}.{expert_prefix.format('gate')}.weight"], out[f"{blk}.{expert_prefix.format('up')}.weight"] = (
                gate,
                up,
            )
            continue
        if key == "shared_mlp.output_linear.weight" and not tensor.numel():
            continue
        renamed = {
            "input_layernorm.weight": "attn_norm.weight",
            "post_attention_layernorm.weight": "ffn_norm.weight",
            "mamba.in_proj.weight": "ssm_in.weight",
            "mamba.conv1d.weight": "ssm_conv1d.weight",
            "mamba.conv1d.bias": "ssm_conv1d.bias",
            "mamba.dt_bias": "ssm_dt.bias",
            "mamba.A_log": "ssm_a",
            "mamba.D": "ssm_d",
            "mamba.norm.weight": "ssm_norm.weight",
            "mamba.out_proj.weight": "ssm_out.weight",
            "self_attn.q_proj.weight": "attn_q.weight",
            "self_attn.k_proj.weight": "attn_k.weight",
            "self_attn.v_proj.weight": "attn_v.weight",
            "self_attn.o_proj.weight": "attn_output.weight",
            "shared_mlp.output_linear.weight": f"{shared.format('down')}.weight",
            "block_sparse_moe.router.layer.weight": "ffn_gate_inp.weight",
            "block_sparse_moe.output_linear.weight": f"{expert_prefix.format('down')}.weight",
        }[key]
        if key == "mamba.conv1d.weight":
            tensor = tensor[:, 0]  # (conv_dim, K)
        elif key == "mamba.A_log":
            tensor = -torch.exp(tensor)[:, None]  # llama.cpp takes A itself, (h, 1)
        elif key == "mamba.D":
            tensor = tensor[:, None]
        elif key == "mamba.norm.weight":
            tensor = tensor.reshape(1, d_inner)  # (groups, d_inner / groups)
        out[f"{blk}.{renamed}"] = tensor
    return out


def storage(name: str, tensor: np.ndarray, outtype: str):
    """(data, raw ggml type or None) for one tensor of a file of type `outtype`."""
    import gguf

    if tensor.ndim <= 1 or name.endswith(KEEP_F32):
        return tensor.astype(np.float32), None
    zero = not tensor.any()  # padding for Granite's shapes: exact in any type
    if outtype == "q8_0" and tensor.shape[-1] % Q8_0_BLOCK == 0:
        kind = gguf.GGMLQuantizationType.Q8_0
        return gguf.quants.quantize(tensor.astype(np.float32), kind), kind
    if outtype in ("f16", "q8_0") or zero:
        return tensor.astype(np.float16), None
    return tensor.astype(np.float32), None


def tokenizer_metadata(writer, tokenizer, config) -> None:
    """Our byte-level BPE as llama.cpp's "gpt2" tokenizer model with the "gpt-2" pre-tokenizer (llama.cpp knows
    tokenizers by a hash of their output; ours is GPT-2's byte-level scheme, so "gpt-2" is the exact one)."""
    import gguf

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    size = max(len(tokenizer), config.vocab_size)
    by_id = {i: token for token, i in vocab.items()} | {i: t["content"] for i, t in added.items()}
    tokens, types = [], []
    for i in range(size):
        if i in by_id:
            tokens.append(by_id[i])
            special = i in added and added[i].get("special", False)
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.NORMAL)
        else:  # ids the embedding has beyond the tokenizer: never produced
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for name, value in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id)):
        if value is not None:
            getattr(writer, f"add_{name}_token_id")(value)
    if tokenizer.pad_token_id is not None:
        writer.add_pad_token_id(tokenizer.pad_token_id)
    adds_bos = tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]
    writer.add_add_bos_token(bool(adds_bos))
    writer.add_add_eos_token(False)


def hyperparameters(writer, config, outtype: str) -> None:
    import gguf

    n = config.num_hidden_layers
    moe = has_moe(config)
    writer.add_context_length(MAX_POSITION_EMBEDDINGS)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(n + 1)
    writer.add_feed_forward_length(config.moe_intermediate_size if moe else config.intermediate_size)
    writer.add_head_count(attention_heads(config))
    writer.add_head_count_kv([0] * n + [1])  # 0: a recurrent layer (llama.cpp's rule for granitehybrid)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    if moe:
        writer.add_expert_count(config.num_experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
        if has_dense(config):
            writer.add_expert_shared_feed_forward_length(config.intermediate_size)
    writer.add_ssm_conv_kernel(config.conv_kernel)
    writer.add_ssm_inner_size(config.intermediate_ssm_size)
    writer.add_ssm_state_size(config.state_size)
    writer.add_ssm_time_step_rank(config.num_heads)  # llama.cpp reads the number of SSM heads from this key
    writer.add_ssm_group_count(1)
    writer.add_rope_scaling_finetuned(False)  # granitehybrid's switch for RoPE: off (no positions)
    # The multipliers (embedding, residual, attention, logits) are all 1.0: left unset, llama.cpp skips them.
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16}
    writer.add_file_type(file_type.get(outtype, gguf.LlamaFileType.MOSTLY_Q8_0))


def write_gguf(model, path: str | Path, tokenizer, outtype: str = "f32", name: str = "itera-lite") -> Path:
    """Writes `model` (an `IteraLiteForCausalLM`) with `tokenizer` into the GGUF file `path`; returns the path.

    Raises:
        ValueError: an unknown `outtype`, or a checkpoint llama.cpp cannot express (`check_expressible`).
    """
    import gguf

    if outtype not in OUTTYPES:
        raise ValueError(f"outtype must be one of {', '.join(OUTTYPES)}, got {outtype!r}")
    config = model.config
    check_expressible(config)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), ARCH)
    writer.add_name(name)
    hyperparameters(writer, config, outtype)
    tokenizer_metadata(writer, tokenizer, config)
    for tensor_name, tensor in gguf_tensors(model).items():
        data, raw_dtype = storage(tensor_name, tensor.numpy(), outtype)
        writer.add_tensor(tensor_name, data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


__all__ = ["OUTTYPES", "check_expressible", "gguf_tensors", "write_gguf"]
