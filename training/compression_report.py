"""Compression report: the bundled model in fp32, bf16, fp16, nf4 and int8, all loaded through `from_pretrained`.

    python -m training.compression_report --model checkpoints/itera-lite-tinystories \
        --text_file ../shared/data/tinystories/valid.txt --output benchmarks/results/compression.json

For each variant: bytes on disk (its `save_pretrained` folder's weights), bytes of weights in memory
(`get_memory_footprint`), validation perplexity on the first `--blocks` blocks of 256 tokens, and decode and prefill
tokens/s. Prints a Markdown table; writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

import modeling_itera  # noqa: F401  (registers the Auto classes)
from modeling_itera.defaults import BUNDLED_MODEL, nf4_config
from training import data
from training.evaluate import perplexity, speed

VARIANTS = {
    "fp32": dict(dtype=torch.float32),
    "bf16": dict(dtype=torch.bfloat16),
    "fp16": dict(dtype=torch.float16),
    "nf4": dict(quantization_config=nf4_config(), dtype=torch.bfloat16),
    "int8": dict(quantization_config=BitsAndBytesConfig(load_in_8bit=True), dtype=torch.float32),
}


def weights_on_disk(model) -> int:
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


def measure(model_path: str, variant: str, blocks, new_tokens: int) -> dict:
    model = AutoModelForCausalLM.from_pretrained(model_path, **VARIANTS[variant]).eval()
    row = {"disk_bytes": weights_on_disk(model), "memory_bytes": model.get_memory_footprint()}
    row.update(perplexity(model, blocks, batch_size=8))
    row.update(speed(model, model.config.vocab_size, new_tokens=new_tokens, prefill_tokens=256))
    return row


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m training.compression_report", description=__doc__.splitlines()[0])
    # Relative, so that the report names the model the same way on every machine.
    parser.add_argument("--model", default=os.path.relpath(BUNDLED_MODEL))
    parser.add_argument("--text_file", required=True)
    parser.add_argument("--blocks", type=int, default=64, help="validation blocks of 256 tokens to score")
    parser.add_argument("--new_tokens", type=int, default=64, help="tokens to decode for the speed figure")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    blocks = data.tokenize_and_pack(data.load_texts(args.text_file), tokenizer, 256)
    blocks = blocks.select(range(min(args.blocks, len(blocks))))
    report = {"model": args.model, "blocks": len(blocks), "variants": {}}
    for variant in args.variants:
        report["variants"][variant] = measure(args.model, variant, blocks, args.new_tokens)
        print(variant, report["variants"][variant], flush=True)
    base = report["variants"].get("fp32")
    print(
        "\n| variant | weights on disk | weights in memory | x fp32 | perplexity | Δ vs fp32 | decode tok/s | "
        "prefill tok/s |\n|---|---:|---:|---:|---:|---:|---:|---:|"
    )
    for variant, row in report["variants"].items():
        ratio = row["memory_bytes"] / base["memory_bytes"] if base else float("nan")
        delta = (row["perplexity"] / base["perplexity"] - 1) * 100 if base else float("nan")
        row["memory_vs_fp32"], row["perplexity_change_pct"] = ratio, delta
        print(
            f"| {variant} | {row['disk_bytes'] / 1e6:.1f} MB | {row['memory_bytes'] / 1e6:.1f} MB | {ratio:.2f} | "
            f"{row['perplexity']:.3f} | {delta:+.2f}% | {row['decode_tokens_per_s']:.0f} | "
            f"{row['prefill_tokens_per_s']:.0f} |"
        )
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
