"""Evaluate a causal LM folder: perplexity on a text file (at one or more context lengths) and tokens/s.

    python -m training.evaluate --model checkpoints/itera-lite-tinystories \
        --text_file ../shared/data/tinystories/valid.txt --block_sizes 256 512 1024 --speed

Works for any `AutoModelForCausalLM` folder (the Llama baseline too). Prints JSON and writes it to `--output`.
Perplexity is exp of the mean next-token cross-entropy over every predicted token of the packed blocks.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import modeling_itera  # noqa: F401  (registers the Auto classes)
from modeling_itera.defaults import DTYPES
from training import data


@torch.no_grad()
def perplexity(model, blocks, batch_size: int = 8) -> dict:
    """exp(mean cross-entropy) over blocks {"input_ids": [...]}, and the number of tokens it averaged."""
    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        ids = torch.tensor(blocks[start : start + batch_size]["input_ids"])
        logits = model(input_ids=ids, use_cache=False).logits.float()
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
        )
        total_nll += nll.item()
        total_tokens += ids[:, 1:].numel()
    return {"perplexity": math.exp(total_nll / total_tokens), "loss": total_nll / total_tokens, "tokens": total_tokens}


@torch.no_grad()
def speed(model, vocab_size: int, new_tokens: int = 128, prompt_tokens: int = 16, prefill_tokens: int = 512) -> dict:
    """Greedy decode tokens/s (batch 1) and prefill tokens/s of one long prompt."""
    prompt = torch.randint(3, vocab_size, (1, prompt_tokens))
    kwargs = dict(do_sample=False, min_new_tokens=new_tokens, max_new_tokens=new_tokens)
    model.generate(prompt, **{**kwargs, "min_new_tokens": 4, "max_new_tokens": 4})  # warm-up
    start = time.perf_counter()
    model.generate(prompt, **kwargs)
    decode = new_tokens / (time.perf_counter() - start)
    long_prompt = torch.randint(3, vocab_size, (1, prefill_tokens))
    model(long_prompt, logits_to_keep=1)
    start = time.perf_counter()
    model(long_prompt, logits_to_keep=1)
    prefill = prefill_tokens / (time.perf_counter() - start)
    return {"decode_tokens_per_s": round(decode, 1), "prefill_tokens_per_s": round(prefill, 1)}


def evaluate_model(
    model_path: str,
    text_file: str,
    block_sizes: list[int],
    dtype: str = "float32",
    batch_size: int = 8,
    with_speed: bool = False,
    threads: int | None = None,
) -> dict:
    if threads:
        torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=DTYPES[dtype]).eval()
    texts = data.load_texts(text_file)
    result = {
        "model": model_path,
        "text_file": text_file,
        "dtype": dtype,
        "parameters": sum(p.numel() for p in model.parameters()),
        "by_block_size": {},
    }
    for block_size in block_sizes:
        blocks = data.tokenize_and_pack(texts, tokenizer, block_size)
        result["by_block_size"][block_size] = perplexity(model, blocks, max(1, batch_size * 256 // block_size))
    if with_speed:
        result.update(speed(model, len(tokenizer)))
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model folder")
    parser.add_argument("--text_file", required=True, help=".txt (stories separated by <|endoftext|>) or .jsonl")
    parser.add_argument("--block_sizes", type=int, nargs="+", default=[256], help="context lengths to score at")
    parser.add_argument("--batch_size", type=int, default=8, help="blocks per forward at block size 256")
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--speed", action="store_true", help="also measure decode and prefill tokens/s")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--output", default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    if not Path(args.model).exists():
        parser.error(f"model folder not found: {args.model}")
    result = evaluate_model(
        args.model, args.text_file, args.block_sizes, args.dtype, args.batch_size, args.speed, args.threads
    )
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
