"""Write a story: `python -m modeling_itera "Once upon a time"`, streamed to the terminal.

The default model is the bundled folder (checkpoints/itera-lite-tinystories) when it is there, as in a clone of the
repository; an installed copy (`pip install .`) has no checkpoints/ and uses the published model on the Hugging Face
Hub (itera-lite/itera-lite-tinystories) instead. `--model` names any other folder or Hub id.
`--backend onnx --model DIR` runs an ONNX export (`python -m modeling_itera.export`) with onnxruntime instead.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from modeling_itera import defaults  # torch-free: `--backend onnx` runs where torch is not installed


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m modeling_itera", description=__doc__.splitlines()[0])
    parser.add_argument("prompt", nargs="?", default="Once upon a time", help="the beginning of the story")
    parser.add_argument(
        "--model",
        default=defaults.default_model(),
        help=f"model folder or Hub id (default: the bundled folder if present, else {defaults.HUB_MODEL_ID})",
    )
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: the model's generation config")
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--repetition-penalty", type=float, default=None)
    parser.add_argument("--greedy", action="store_true", help="no sampling: always the most likely token")
    parser.add_argument("--seed", type=int, default=None, help="for a reproducible story")
    parser.add_argument("--dtype", choices=defaults.DTYPES, default="float32", help="bfloat16 halves memory on CPU too")
    parser.add_argument("--trust-remote-code", action="store_true", help="for Hub repositories with remote code")
    parser.add_argument(
        "--compile", action="store_true", help="decode with torch.compile (fullgraph); the first tokens take longer"
    )
    parser.add_argument(
        "--backend",
        choices=("torch", "onnx"),
        default="torch",
        help="onnx: --model is a folder written by `python -m modeling_itera.export`, run with onnxruntime",
    )
    return parser.parse_args(argv)


def run_onnx(args: argparse.Namespace) -> int:
    """The story from an ONNX export, streamed; sampling settings default to the export's generation config."""
    from modeling_itera.onnx_runtime import IteraOnnxModel, NotAnExportError

    try:
        model = IteraOnnxModel(args.model)
    except NotAnExportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    kwargs = dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        greedy=True if args.greedy else None,
    )
    print(args.prompt, end="", flush=True)
    for piece in model.stream(args.prompt, **kwargs):
        print(piece, end="", flush=True)
    print()
    return 0


def cannot_load(model: str, err: OSError) -> str:
    """The error for a Hub id that could not be loaded (offline, or no such repository): what was tried, and what to
    pass instead."""
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    tried = f"the model {model!r} could not be loaded from the Hugging Face Hub ({reason})"
    if model == defaults.HUB_MODEL_ID and not defaults.BUNDLED_MODEL.is_dir():
        tried = f"no bundled model at {defaults.BUNDLED_MODEL} (not a clone of the repository), and {tried}"
    return f"error: {tried}. Pass --model FOLDER_OR_HUB_ID: a model folder, or a Hub id that can be reached"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.prompt.strip():
        print("error: the prompt is empty", file=sys.stderr)
        return 2
    if args.backend == "onnx":
        return run_onnx(args)
    return run_torch(args)


def run_torch(args: argparse.Namespace) -> int:
    """The story from a transformers model folder or Hub id, streamed."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, CompileConfig, TextStreamer

    import modeling_itera  # noqa: F401  (registers the Auto classes)

    local = Path(args.model).exists()
    if local and not (Path(args.model) / "config.json").exists():
        print(f"error: {args.model} is not a model folder (no config.json in it)", file=sys.stderr)
        return 2
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            args.model, dtype=defaults.DTYPES[args.dtype], trust_remote_code=args.trust_remote_code
        ).eval()
    except OSError as err:
        if local:
            raise
        print(cannot_load(args.model, err), file=sys.stderr)
        return 2
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
    if args.compile:
        overrides["compile_config"] = CompileConfig(fullgraph=True)
    inputs = tokenizer(args.prompt, return_tensors="pt")
    streamer = TextStreamer(tokenizer, skip_special_tokens=True)
    with torch.no_grad():
        model.generate(**inputs, streamer=streamer, **overrides)
    return 0


if __name__ == "__main__":
    sys.exit(main())
