"""Batch-1 decode speed of Itera-Lite in llama.cpp (GGUF f32 / f16 / q8_0) beside PyTorch eager and compiled, the
ONNX fp32 and int8 runners and a same-shape Llama (PyTorch eager, and llama.cpp q8_0), in one process.

    python -m benchmarks.gguf_decode            # ~5 min on 2 cores: benchmarks/results/gguf_decode.json
    python -m benchmarks.gguf_decode --quick    # a few tokens, to check that it runs

The model is the bundled checkpoint, exported here (GGUF with `modeling_itera.export_gguf`, ONNX with
`modeling_itera.export`). Greedy decoding of 256 new tokens after a 16-token random prompt, no eos stop, timed in
interleaved rounds, best of 2 after a warm-up (`benchmarks.decode.interleaved_tps`), so that a load that drifts on
this shared machine touches every runner alike. Threads: PyTorch its default (2 here); onnxruntime and llama.cpp
one thread (`onnx_decode.ORT_THREADS`, `gguf_runtime.THREADS`: with 2, llama.cpp's spinning barrier collapsed on the
loaded machine). llama.cpp runs in a worker process (`gguf_runtime.LlamaCppWorker`): where its default (weight
repacking on) crashes, as quantized files do on Intel AMX CPUs, it is retried with repacking off, and the result
says so (`llama.cpp_repack`). The same-shape Llama has random weights (speed only): benchmarks.peers' Llama as
a GGUF written here.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer

from benchmarks.decode import interleaved_tps
from benchmarks.onnx_decode import ORT_THREADS, onnx_run, torch_run
from benchmarks.peers import build, machine, save
from modeling_itera import IteraLiteForCausalLM, defaults
from modeling_itera.export import export, quantize_export
from modeling_itera.export_gguf import Q8_0_BLOCK, tokenizer_metadata, write_gguf
from modeling_itera.gguf_runtime import LlamaCppWorker
from modeling_itera.granite import cost_per_token
from modeling_itera.onnx_runtime import IteraOnnxModel

PROMPT = 16
OUTTYPES = ("f32", "f16", "q8_0")


def permute_for_rope(w: np.ndarray, heads: int) -> np.ndarray:
    """HF's q/k rows (rotate-half RoPE) in llama.cpp's interleaved order, as llama.cpp's converter permutes them."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(model, path: Path, tokenizer) -> Path:
    """A transformers `LlamaForCausalLM` as a llama.cpp `llama` GGUF, matrices in Q8_0 (speed peer only)."""
    import gguf

    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("llama-same-shape")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    tokenizer_metadata(writer, tokenizer, cfg)
    names = {
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    for name, tensor in model.state_dict().items():
        data = tensor.float().numpy()
        if name == "lm_head.weight":
            continue  # tied: llama.cpp uses token_embd
        if name == "model.embed_tokens.weight":
            target = "token_embd.weight"
        elif name == "model.norm.weight":
            target = "output_norm.weight"
        else:
            _, _, layer, *rest = name.split(".")
            target = f"blk.{layer}.{names['.'.join(rest[:-1])]}.weight"
            heads = {"attn_q": cfg.num_attention_heads, "attn_k": cfg.num_key_value_heads}.get(target.split(".")[2])
            if heads:
                data = permute_for_rope(data, heads)
        if data.ndim == 2 and data.shape[-1] % Q8_0_BLOCK == 0:
            kind = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(target, gguf.quants.quantize(data, kind), raw_dtype=kind)
        else:
            writer.add_tensor(target, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def gguf_run(worker: LlamaCppWorker, vocab: int, new_tokens: int):
    prompt = np.random.default_rng(0).integers(3, vocab, PROMPT).tolist()
    return lambda: worker.speed(prompt, new_tokens)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gguf_decode", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=defaults.default_model())
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    tokens = 8 if args.quick else 256
    work = Path(tempfile.mkdtemp(prefix="itera-gguf-"))
    workers = []
    try:
        model = IteraLiteForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        model.save_pretrained(work / "fp32")  # the fp32 safetensors the q8_0 file is measured against
        files = {t: write_gguf(model, work / f"itera-{t}.gguf", tokenizer, outtype=t) for t in OUTTYPES}
        llama = build("llama")
        files["llama-q8_0"] = write_llama_gguf(llama, work / "llama-q8_0.gguf", tokenizer)
        export(args.model, work / "onnx-fp32")
        shutil.copytree(work / "onnx-fp32", work / "onnx-int8")
        quantize_export(work / "onnx-int8")

        result = {"machine": machine(), "model": args.model, "load_average_before": os.getloadavg()}
        result["bytes"] = {
            "fp32_safetensors": (work / "fp32" / "model.safetensors").stat().st_size,
            **{f"gguf-{t}": files[t].stat().st_size for t in OUTTYPES},
            "llama-q8_0": files["llama-q8_0"].stat().st_size,
        }
        result["cost_per_token"] = cost_per_token(model.config, context=PROMPT + tokens // 2)
        runs = {
            "torch-eager": torch_run(model, 1, tokens, compiled=False),
            "torch-compiled": torch_run(model, 1, tokens, compiled=True),
            "llama-eager": torch_run(llama, 1, tokens, compiled=False),
        }
        for name in ("onnx-fp32", "onnx-int8"):
            runs[name] = onnx_run(IteraOnnxModel(work / name, threads=ORT_THREADS[1]), 1, tokens)
        repack = {}
        for name in (*OUTTYPES, "llama-q8_0"):
            worker = LlamaCppWorker(files[name])
            workers.append(worker)
            repack[name] = {"repack": worker.repack, "retried": worker.retried}
            runs[name if name.startswith("llama") else f"llama.cpp-{name}"] = gguf_run(
                worker, model.config.vocab_size, tokens
            )
        result["llama.cpp_repack"] = repack
        result["batch_1"] = interleaved_tps(runs, tokens, repeats=1 if args.quick else 2)
        result["batch_1"]["new_tokens"] = tokens
        result["load_average_after"] = os.getloadavg()
        summarize(result)
        if not args.quick:
            save("gguf_decode", result)
        return result
    finally:
        for worker in workers:
            worker.close()
        shutil.rmtree(work, ignore_errors=True)


def summarize(result: dict) -> None:
    cells = {k: v["tokens_per_s"] for k, v in result["batch_1"].items() if isinstance(v, dict) and "tokens_per_s" in v}
    best_name = max((k for k in cells if k.startswith("llama.cpp-")), key=cells.get)
    best, bytes_ = cells[best_name], result["bytes"]
    result["targets"] = {
        "best_gguf": best_name,
        "best_gguf_vs_onnx_int8": best / cells["onnx-int8"],
        "best_gguf_vs_torch_eager": best / cells["torch-eager"],
        "q8_0_vs_llama_q8_0_llama.cpp": cells["llama.cpp-q8_0"] / cells["llama-q8_0"],
        "q8_0_bytes_vs_fp32_safetensors": bytes_["gguf-q8_0"] / bytes_["fp32_safetensors"],
    }
    print("\n| runner | tok/s (batch 1) | x torch eager |\n|---|---:|---:|")
    for name, tps in cells.items():
        print(f"| {name} | {tps:.0f} | {tps / cells['torch-eager']:.2f} |")
    print("\ntargets:", {k: (round(v, 3) if isinstance(v, float) else v) for k, v in result["targets"].items()})
    print("llama.cpp repack:", result["llama.cpp_repack"])


if __name__ == "__main__":
    main()
