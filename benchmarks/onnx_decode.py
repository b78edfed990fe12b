"""Decode speed and size of Itera-Lite on onnxruntime (fp32 and int8) against PyTorch eager and compiled, one process.

    python -m benchmarks.onnx_decode            # ~5 min on 2 cores: benchmarks/results/onnx_decode.json
    python -m benchmarks.onnx_decode --quick    # a few tokens, to check that it runs

The model is the bundled checkpoint (the tiny preset trained on TinyStories), exported here with
`modeling_itera.export` (or `--onnx DIR`, an fp32 export, to skip that). Greedy generation after a 16-token prompt,
no eos stop: tokens/s at batch 1 (256 new tokens) and batch 32 (64 new tokens, aggregate), timed in interleaved
rounds, best of 2 after a warm-up, as in `benchmarks.decode`, beside the same-shape Llama of `benchmarks.decode`
(eager, random weights). PyTorch compiled is `generate(...,
compile_config=CompileConfig(fullgraph=True))`. Perplexity: teacher-forced on the first rows of the validation text,
through the ONNX decode graph (fp32 and int8) and the PyTorch forward.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer, CompileConfig

from benchmarks.decode import interleaved_tps
from benchmarks.peers import build, machine, save
from modeling_itera import IteraLiteForCausalLM, defaults
from modeling_itera.export import export, quantize_export
from modeling_itera.onnx_runtime import IteraOnnxModel

PROMPT = 16
ORT_THREADS = {1: 1, 32: None}  # onnxruntime intra-op threads per batch size (None: onnxruntime's default)
VALID_TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinystories" / "valid.txt"


def torch_run(model, batch: int, new_tokens: int, compiled: bool):
    prompt = torch.randint(3, model.config.vocab_size, (batch, PROMPT), generator=torch.Generator().manual_seed(0))
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, repetition_penalty=1.0)
    if compiled:
        kwargs["compile_config"] = CompileConfig(fullgraph=True)

    @torch.no_grad()
    def run():
        model.generate(prompt, attention_mask=torch.ones_like(prompt), **kwargs)

    return run


def onnx_run(model: IteraOnnxModel, batch: int, new_tokens: int):
    prompt = np.random.default_rng(0).integers(3, model.vocab_size, (batch, PROMPT))

    def run():
        for _ in model.generate_ids(
            prompt, max_new_tokens=new_tokens, greedy=True, repetition_penalty=1.0, eos_token_id=False
        ):
            pass

    return run


@torch.no_grad()
def torch_perplexity(model, ids: np.ndarray) -> float:
    ids = torch.from_numpy(ids)
    logits = model(ids).logits[:, :-1]  # not `labels=`: the loss would include the router's aux loss
    return float(torch.exp(torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())))


def eval_rows(tokenizer, rows: int, length: int) -> np.ndarray:
    """`rows` windows of `length` tokens from the validation text (the first stories), for perplexity."""
    text = VALID_TEXT.read_text(encoding="utf-8")[:200_000] if VALID_TEXT.is_file() else "Once upon a time. " * 4000
    ids = tokenizer(text)["input_ids"]
    return np.array([ids[i * length : (i + 1) * length] for i in range(rows)], dtype=np.int64)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.onnx_decode", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=defaults.default_model())
    parser.add_argument("--onnx", default=None, help="an fp32 export folder to reuse (default: export into a temp dir)")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="itera-onnx-"))
    try:
        fp32_dir = Path(args.onnx) if args.onnx else work / "fp32"
        start = time.perf_counter()
        if not args.onnx:
            export(args.model, fp32_dir)
        int8_dir = work / "int8"
        shutil.copytree(fp32_dir, int8_dir)
        quantize_export(int8_dir)
        export_s = time.perf_counter() - start
        model = IteraLiteForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        onnx_models = {"onnx-fp32": IteraOnnxModel(fp32_dir), "onnx-int8": IteraOnnxModel(int8_dir)}
        llama = build("llama")  # the same-shape peer of benchmarks.decode (random weights: speed only)

        result = {"machine": machine(), "model": args.model, "torch_threads": torch.get_num_threads()}
        result["export_and_quantize_s"] = export_s
        result["bytes"] = {
            "safetensors": sum(p.stat().st_size for p in Path(args.model).glob("*.safetensors"))
            if Path(args.model).is_dir()
            else None,
            **{name: sum(p.stat().st_size for p in m.folder.glob("*.onnx")) for name, m in onnx_models.items()},
            **{f"{name}/decode.onnx": (m.folder / "decode.onnx").stat().st_size for name, m in onnx_models.items()},
        }
        rows = eval_rows(tokenizer, 4 if args.quick else 16, 64 if args.quick else 256)
        result["perplexity"] = {
            "tokens": int(rows.size),
            "torch-fp32": torch_perplexity(model, rows),
            **{name: m.perplexity(rows) for name, m in onnx_models.items()},
        }
        for batch, tokens in ((1, 16 if args.quick else 256), (32, 8 if args.quick else 64)):
            # batch 1: one onnxruntime thread (no pool threads that spin between calls and take the cores from the
            # other settings of this process; alone, 2 threads are ~the same at batch 1); batch 32: its default
            threads = ORT_THREADS[batch]
            sessions = {name: IteraOnnxModel(m.folder, threads=threads) for name, m in onnx_models.items()}
            runs = {
                "torch-eager": torch_run(model, batch, tokens, compiled=False),
                "torch-compiled": torch_run(model, batch, tokens, compiled=True),
                "llama-eager": torch_run(llama, batch, tokens, compiled=False),
                **{name: onnx_run(m, batch, tokens) for name, m in sessions.items()},
            }
            result[f"batch_{batch}"] = interleaved_tps(runs, batch * tokens, repeats=1 if args.quick else 2)
            result[f"batch_{batch}"].update(new_tokens=tokens, onnxruntime_threads=threads or "default")
            del sessions, runs
        summarize(result)
        if not args.quick:
            save("onnx_decode", result)
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def summarize(result: dict) -> None:
    b = result["bytes"]
    ppl = result["perplexity"]
    print(
        f"bytes: onnx fp32 {b['onnx-fp32/decode.onnx'] / 1e6:.1f} MB, int8 {b['onnx-int8/decode.onnx'] / 1e6:.1f} MB"
        f" (decode graph; {b['onnx-int8/decode.onnx'] / b['onnx-fp32/decode.onnx']:.3f}x)"
    )
    print(
        f"perplexity on {ppl['tokens']} tokens: torch {ppl['torch-fp32']:.4f}, onnx fp32 {ppl['onnx-fp32']:.4f}, "
        f"int8 {ppl['onnx-int8']:.4f} ({(ppl['onnx-int8'] / ppl['onnx-fp32'] - 1) * 100:+.2f}%)"
    )
    for key in ("batch_1", "batch_32"):
        cells = {k: v for k, v in result[key].items() if isinstance(v, dict) and "tokens_per_s" in v}
        eager = cells["torch-eager"]["tokens_per_s"]
        parts = [f"{k} {v['tokens_per_s']:.0f} tok/s ({v['tokens_per_s'] / eager:.2f}x)" for k, v in cells.items()]
        line = ", ".join(parts)
        print(f"{key}: {line}")


if __name__ == "__main__":
    main()
