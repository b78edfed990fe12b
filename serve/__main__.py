"""Serve Itera-Lite over HTTP: `python -m serve --model FOLDER_OR_HUB_ID [--port 8000]`.

OpenAI-style `POST /v1/completions` and `/v1/chat/completions` (set `stream: true` for server-sent events),
`GET /v1/models`, `POST /tokenize` and `/detokenize`, `GET /health` and `GET /metrics` (Prometheus), and a page
to try it in a browser at `/`. It listens on 127.0.0.1 unless `--host` says otherwise. With `--api-key` (or
`ITERA_API_KEY` in the environment) every request but `/health` and the page must send `Authorization: Bearer KEY`;
without one the server has no authentication. It speaks plain HTTP: put TLS in front of it before exposing it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import torch
import uvicorn

from modeling_itera.defaults import DTYPES, default_model

from .app import create_app
from .engine import Limits
from .model import load

API_KEY_VARIABLE = "ITERA_API_KEY"
BACKENDS = ("torch", "onnx")
TORCH_ONLY = ("dtype", "load_in_4bit", "trust_remote_code", "compile")  # flags that the ONNX backend cannot honour
GRACEFUL_SHUTDOWN_S = 5  # on Ctrl-C, open streams get this long to finish before they are cut


def positive(kind, allow_zero: bool = False):
    def parse(text: str):
        value = kind(text)
        if value < 0 or (value == 0 and not allow_zero):
            raise argparse.ArgumentTypeError(f"must be {'>=' if allow_zero else '>'} 0, got {text}")
        return value

    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = Limits()
    parser = argparse.ArgumentParser(prog="python -m serve", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        default=None,
        help="model folder or Hub id (default: the bundled folder in a clone, else the Hub); with --backend onnx, "
        "an export folder of `python -m modeling_itera.export`",
    )
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default="torch",
        help="torch: the model in PyTorch; onnx: an ONNX export in onnxruntime (fp32 or --int8)",
    )
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="bfloat16 halves memory on CPU too (torch)")
    parser.add_argument("--load-in-4bit", action="store_true", help="bitsandbytes nf4 weights (CPU: AVX512-BF16)")
    parser.add_argument("--trust-remote-code", action="store_true", help="for Hub repositories with remote code")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model-name", default=None, help="the id reported to clients (default: --model's name)")
    parser.add_argument(
        "--max-batch-size",
        type=positive(int),
        default=defaults.max_batch_size,
        help="sequences decoded together; more requests wait in the queue",
    )
    parser.add_argument("--max-prompt-tokens", type=positive(int), default=defaults.max_prompt_tokens)
    parser.add_argument(
        "--max-new-tokens",
        type=positive(int),
        default=defaults.max_new_tokens,
        help="the largest max_tokens a request may ask for",
    )
    parser.add_argument(
        "--queue-size",
        type=positive(int),
        default=defaults.queue_size,
        help="requests that may wait for a slot; beyond it the server answers 429",
    )
    parser.add_argument(
        "--request-timeout",
        type=positive(float),
        default=defaults.request_timeout,
        help="seconds from arrival to the last token; beyond it the server answers 504",
    )
    parser.add_argument(
        "--state-cache-bytes",
        "--state_cache_bytes",
        type=positive(int, allow_zero=True),
        default=defaults.state_cache_bytes,
        help="byte budget of the prefix cache of prompt states and checkpoints (0: off)",
    )
    parser.add_argument(
        "--state-cache-interval",
        "--state_cache_interval",
        type=positive(int, allow_zero=True),
        default=defaults.state_cache_interval,
        help="also keep a checkpoint every this many tokens of a prompt, rounded up to whole chunks (0: prompt ends "
        "only); torch takes them from the chunked scan, onnx prefills in pieces",
    )
    parser.add_argument(
        "--max-prefill-tokens",
        type=positive(int),
        default=defaults.max_prefill_tokens,
        help="prompt tokens prefilled per engine iteration before the next decode step (at least one request): fresh "
        "prompts are prefilled together, and running streams wait for at most this much prefill per token",
    )
    parser.add_argument(
        "--threads",
        type=positive(int),
        default=None,
        help="torch CPU threads (default: torch's choice); 1 on a busy CPU",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="compile the batched decode step (torch.compile; ~20-40 s at the first request of each batch size)",
    )
    parser.add_argument(
        "--chat-template",
        type=Path,
        default=None,
        help="a Jinja chat template file for /v1/chat/completions (default: the tokenizer's, else a story template)",
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_VARIABLE),
        help=f"require `Authorization: Bearer KEY` (default: ${API_KEY_VARIABLE}; a key in the environment stays out "
        "of `ps`)",
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    args = parser.parse_args(argv)
    if args.backend == "onnx":
        given = [f"--{name.replace('_', '-')}" for name in TORCH_ONLY if getattr(args, name) not in (None, False)]
        if given:
            parser.error(f"{', '.join(given)} apply to --backend torch only (an ONNX export fixes its weights)")
        if args.model is None:
            parser.error("--backend onnx needs --model EXPORT_FOLDER (python -m modeling_itera.export)")
    args.model = args.model or default_model()
    args.dtype = args.dtype or "float32"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.api_key is not None and not args.api_key.strip():
        print(f"error: the API key (--api-key or ${API_KEY_VARIABLE}) is empty", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if args.backend == "onnx":
            from .onnx_model import load_onnx  # onnxruntime only where it is asked for

            model, tokenizer = load_onnx(args.model, threads=args.threads)
        else:
            model, tokenizer = load(args.model, args.dtype, args.load_in_4bit, args.trust_remote_code)
        template = args.chat_template.read_text() if args.chat_template else None
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    limits = Limits(
        max_batch_size=args.max_batch_size,
        max_prompt_tokens=args.max_prompt_tokens,
        max_new_tokens=args.max_new_tokens,
        queue_size=args.queue_size,
        request_timeout=args.request_timeout,
        state_cache_bytes=args.state_cache_bytes,
        state_cache_interval=args.state_cache_interval,
        max_prefill_tokens=args.max_prefill_tokens,
    )
    name = args.model_name or args.model.rstrip("/").split("/")[-1]
    app = create_app(
        model, tokenizer, limits, model_name=name, compile=args.compile, chat_template=template, api_key=args.api_key
    )
    config = uvicorn.Config(
        app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S
    )
    uvicorn.Server(config).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
