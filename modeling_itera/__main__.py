"""Write a story: `python -m modeling_itera "Once upon a time"`, streamed to the terminal.

Uses the bundled model (checkpoints/itera-lite-tinystories) unless `--model` names a folder or a Hub id.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer

from modeling_itera.defaults import BUNDLED_MODEL, DTYPES


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m modeling_itera", description=__doc__.splitlines()[0])
    parser.add_argument("prompt", nargs="?", default="Once upon a time", help="the beginning of the story")
    parser.add_argument("--model", default=str(BUNDLED_MODEL), help="model folder or Hub id (default: bundled)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: the model's generation config")
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--repetition-penalty", type=float, default=None)
    parser.add_argument("--greedy", action="store_true", help="no sampling: always the most likely token")
    parser.add_argument("--seed", type=int, default=None, help="for a reproducible story")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="bfloat16 halves memory on CPU too")
    parser.add_argument("--trust-remote-code", action="store_true", help="for Hub repositories with remote code")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.prompt.strip():
        print("error: the prompt is empty", file=sys.stderr)
        return 2
    if args.model == str(BUNDLED_MODEL) and not BUNDLED_MODEL.exists():
        print(f"error: the bundled model is not at {BUNDLED_MODEL}; pass --model FOLDER_OR_HUB_ID", file=sys.stderr)
        return 2
    if Path(args.model).exists() and not (Path(args.model) / "config.json").exists():
        print(f"error: {args.model} is not a model folder (no config.json in it)", file=sys.stderr)
        return 2
    import modeling_itera  # noqa: F401  (registers the Auto classes)

    tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        args.model, dtype=DTYPES[args.dtype], trust_remote_code=args.trust_remote_code
    ).eval()
    if args.seed is not None:
        torch.manual_seed(args.seed)
    overrides = {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "repetition_penalty": args.repetition_penalty,
    }
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if args.greedy:
        overrides.update(do_sample=False, temperature=None, top_k=None, top_p=None)
    inputs = tokenizer(args.prompt, return_tensors="pt")
    streamer = TextStreamer(tokenizer, skip_special_tokens=True)
    with torch.no_grad():
        model.generate(**inputs, streamer=streamer, **overrides)
    return 0


if __name__ == "__main__":
    sys.exit(main())
