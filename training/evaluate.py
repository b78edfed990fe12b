"""Evaluate a causal LM folder on a text file: per story, in packed blocks, name consistency, tokens/s.

    python -m training.evaluate --model checkpoints/itera-lite-tinystories \
        --text_file ../shared/data/tinystories/valid.txt --block_sizes 256 512 1024 --names --speed

Works for any `AutoModelForCausalLM` folder (the Llama baseline too). Prints JSON and writes it to `--output`.

- `per_story`: each story alone, `<s> story </s>`, every token after `<s>` scored (the story's tokens and its
  `</s>`). Bits per byte divide the summed cross-entropy (in bits) by the story's UTF-8 bytes, so models with
  different tokenizers compare; word perplexity is exp(nats per whitespace-separated word); per-token perplexity
  depends on the tokenizer. `--train_file` scores as many stories of the training text the same way, for the gap.
- `packed` (`--block_sizes`): the stories concatenated `<s> a </s><s> b </s>...` and cut into blocks, every token
  after the first of a block scored, with no reset between stories (a story may read the end of the one before).
  The figures that earlier versions of this README reported.
- `names` (`--names`): name consistency (see `training.names`) of 50 samples of 150 tokens, seeds 0..49.
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
from training import data, names


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
def per_story(model, tokenizer, stories: list[str], tokens_per_batch: int = 8192) -> dict:
    """Bits per byte, per-token and word perplexity of each story alone (`<s> story </s>`), summed over stories.

    Stories are batched by length, right-padded; a causal model's outputs at a story's own positions do not depend
    on the padding after it."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    stories = list(stories)
    encoded = [ids + [eos] for ids in tokenizer(stories, add_special_tokens=True)["input_ids"]]
    if any(ids[0] != tokenizer.bos_token_id for ids in encoded):
        raise ValueError("per_story needs a tokenizer that starts every text with its bos token <s>")
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    nll = 0.0
    start = 0
    while start < len(order):
        length = len(encoded[order[start]])
        end = start
        while end < len(order) and (end - start + 1) * len(encoded[order[end]]) <= max(tokens_per_batch, length):
            end += 1
        batch = [encoded[i] for i in order[start:end]]
        width = max(len(ids) for ids in batch)
        ids = torch.tensor([x + [pad] * (width - len(x)) for x in batch])
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in batch])
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
        labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, data.IGNORE_INDEX)
        nll += torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum"
        ).item()
        start = end
    tokens = sum(len(ids) - 1 for ids in encoded)
    n_bytes = sum(len(story.encode("utf-8")) for story in stories)
    n_words = sum(len(story.split()) for story in stories)
    return {
        "stories": len(stories),
        "bits_per_byte": nll / math.log(2) / n_bytes,
        "perplexity": math.exp(nll / tokens),
        "word_perplexity": math.exp(nll / n_words),
        "tokens": tokens,
        "bytes": n_bytes,
    }


@torch.no_grad()
def name_samples(model, tokenizer, prompt: str = "Once upon a time", n: int = 50, new_tokens: int = 150) -> list[str]:
    """`n` sampled continuations of `prompt` (up to `new_tokens`, or to `</s>`), seed i for the i-th, with the
    model's generation config."""
    inputs = tokenizer(prompt, return_tensors="pt")
    samples = []
    for seed in range(n):
        torch.manual_seed(seed)
        out = model.generate(**inputs, do_sample=True, max_new_tokens=new_tokens)
        samples.append(tokenizer.decode(out[0], skip_special_tokens=True))
    return samples


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
    train_file: str | None = None,
    with_names: bool = False,
    names_from: str | None = None,
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
        "per_story": per_story(model, tokenizer, texts["text"]),
        "packed": {},
    }
    if train_file:
        train_stories = list(data.load_texts(train_file)["text"])[: len(texts)]
        result["per_story_train"] = per_story(model, tokenizer, train_stories)
        train_perplexity = result["per_story_train"]["perplexity"]
        result["valid_over_train_perplexity"] = result["per_story"]["perplexity"] / train_perplexity
    for block_size in block_sizes:
        blocks = data.tokenize_and_pack(texts, tokenizer, block_size)
        result["packed"][block_size] = perplexity(model, blocks, max(1, batch_size * 256 // block_size))
    if with_names:
        reference = data.read_documents(names_from or text_file)
        result["names"] = names.name_consistency(name_samples(model, tokenizer), names.proper_nouns(reference))
    if with_speed:
        result.update(speed(model, len(tokenizer)))
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model folder")
    parser.add_argument("--text_file", required=True, help=".txt (stories separated by <|endoftext|>) or .jsonl")
    parser.add_argument("--block_sizes", type=int, nargs="*", default=[256], help="packed block lengths to score at")
    parser.add_argument("--train_file", default=None, help="also score as many training stories (the gap)")
    parser.add_argument("--names", action="store_true", help="name consistency of 50 seeded samples")
    parser.add_argument("--names_from", default=None, help="cased text the names are learnt from (--text_file)")
    parser.add_argument("--batch_size", type=int, default=8, help="blocks per forward at block size 256")
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--speed", action="store_true", help="also measure decode and prefill tokens/s")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--output", default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    if not Path(args.model).exists():
        parser.error(f"model folder not found: {args.model}")
    result = evaluate_model(
        args.model,
        args.text_file,
        args.block_sizes,
        args.dtype,
        args.batch_size,
        args.speed,
        args.threads,
        args.train_file,
        args.names,
        args.names_from,
    )
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
