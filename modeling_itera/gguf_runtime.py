"""Run a GGUF file in real llama.cpp (the `llama-cpp-python` bindings) in a worker process: logits, greedy tokens,
tokenization and decode timing, for the tests and `benchmarks.gguf_decode`.

Why a worker process: on Intel CPUs with AMX, llama.cpp's weight-repack path for AMX segfaults on quantized files
(q8_0, q4_0; any model, a plain tiny Llama too) inside `ggml_backend_amx_mul_mat`. A crash must not take the caller
down, so `LlamaCppWorker` loads the file in a child process, runs one decode step as a probe and, if the child dies,
starts it again with repacking off (`llama_model_params.use_extra_bufts = False`, llama.cpp's `--no-repack`) and
records that it did (`worker.repack` is then False, `worker.retried` says why). The child speaks one JSON object per
line on stdin/stdout; arrays come back as .npy files.

    python -m modeling_itera.gguf_runtime FILE.gguf [--no-repack] [--logits-all] [--threads N]   # the worker

No torch here: only numpy and llama_cpp.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# Decode-step probe after loading: the AMX repack crash happens at the first matmul of a quantized weight.
PROBE_TOKENS = (1, 5)
# One thread by default: at batch 1 the tiny model's step is a few hundred microseconds, and on a loaded 2-core
# machine llama.cpp's spinning thread barrier collapsed with 2 threads (q8_0: 18-103 tok/s against 1,400 with 1).
THREADS = 1


@contextlib.contextmanager
def repack_setting(repack: bool):
    """`llama_cpp.Llama` exposes no `use_extra_bufts`; it takes its model params from `llama_model_default_params`,
    so that function is wrapped for the construction."""
    import llama_cpp.llama_cpp as lib

    if repack:
        yield
        return
    default = lib.llama_model_default_params

    def no_repack():
        params = default()
        params.use_extra_bufts = False
        return params

    lib.llama_model_default_params = no_repack
    try:
        yield
    finally:
        lib.llama_model_default_params = default


def open_llama(path: str, repack: bool = True, logits_all: bool = False, threads: int = 1, n_ctx: int = 1024):
    import llama_cpp

    with repack_setting(repack):
        return llama_cpp.Llama(
            str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, logits_all=logits_all, verbose=False
        )


class Session:
    """The child's side: one loaded model and the commands it answers."""

    def __init__(self, llm, out_dir: Path):
        self.llm, self.out_dir, self.count = llm, out_dir, 0

    def save(self, array: np.ndarray) -> str:
        self.count += 1
        path = self.out_dir / f"out{self.count}.npy"
        np.save(path, np.asarray(array, dtype=np.float32))
        return str(path)

    def last_logits(self) -> np.ndarray:
        """The logits of the last token evaluated (the bindings keep rows in `scores` only with logits_all)."""
        pointer = self.llm._ctx.get_logits_ith(-1)
        return np.ctypeslib.as_array(pointer, shape=(self.llm.n_vocab(),)).astype(np.float32)

    def tokenize(self, texts: list[str]) -> dict:
        return {"ids": [self.llm.tokenize(t.encode("utf-8"), add_bos=True, special=False) for t in texts]}

    def forward(self, tokens: list[int]) -> dict:
        """Logits at every position of `tokens` in one batch (needs --logits-all)."""
        self.llm.reset()
        self.llm.eval(tokens)
        return {"logits": self.save(self.llm.scores[: self.llm.n_tokens])}

    def decode(self, prompt: list[int], steps: int, feed: list[int] | None = None) -> dict:
        """The prompt in one batch, then `steps` single-token decode steps: greedy, or teacher-forced on `feed`.
        Returns the logits after the prompt and after each step, (steps + 1, vocab), and the tokens chosen."""
        self.llm.reset()
        self.llm.eval(prompt)
        rows, tokens = [], []
        for step in range(steps + 1):
            row = self.last_logits()
            rows.append(row)
            tokens.append(int(row.argmax()))
            if step < steps:
                self.llm.eval([feed[step] if feed is not None else tokens[-1]])
        return {"logits": self.save(np.stack(rows)), "tokens": tokens}

    def speed(self, prompt: list[int], steps: int) -> dict:
        """Seconds for `steps` greedy decode steps after the prompt (batch 1), prompt excluded."""
        self.llm.reset()
        self.llm.eval(prompt)
        start = time.perf_counter()
        for _ in range(steps):
            token = int(np.argmax(self.last_logits()))
            self.llm.eval([token])
        return {"seconds": time.perf_counter() - start}


def serve(args: argparse.Namespace) -> None:
    llm = open_llama(args.path, repack=not args.no_repack, logits_all=args.logits_all, threads=args.threads)
    with tempfile.TemporaryDirectory(prefix="gguf-worker-") as tmp:
        session = Session(llm, Path(tmp) if args.out_dir is None else Path(args.out_dir))
        session.decode(list(PROBE_TOKENS), 1)  # the probe: a crash here is the AMX repack one
        print(json.dumps({"ready": True}), flush=True)
        for line in sys.stdin:
            request = json.loads(line)
            command = request.pop("command")
            if command == "quit":
                break
            try:
                reply = getattr(session, command)(**request)
            except Exception as err:  # reported to the parent, which raises it
                reply = {"error": f"{type(err).__name__}: {err}"}
            print(json.dumps(reply), flush=True)
        llm.close()


class LlamaCppWorker:
    """A GGUF file loaded in llama.cpp in a child process. `repack=None`: llama.cpp's default (repacking on) and, if
    that child crashes at its first decode, again with repacking off; `worker.repack` says which one runs."""

    def __init__(self, path: str | Path, repack: bool | None = None, logits_all: bool = False, threads: int = THREADS):
        self.path, self.logits_all, self.threads = str(path), logits_all, threads
        self.out_dir = tempfile.mkdtemp(prefix="gguf-out-")
        self.retried = None
        try:
            self.proc = self.start(repack is not False)
            self.repack = repack is not False
        except RuntimeError as err:
            if repack is not None:
                raise
            self.retried = f"the default (weight repacking on) crashed: {err}; retried with use_extra_bufts=False"
            self.proc = self.start(False)
            self.repack = False

    def start(self, repack: bool) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "modeling_itera.gguf_runtime", self.path, "--threads", str(self.threads)]
        cmd += ["--out-dir", self.out_dir] + ["--no-repack"] * (not repack) + ["--logits-all"] * self.logits_all
        self.log = Path(self.out_dir) / "stderr.log"  # a file, not a pipe: nothing reads it while the child runs
        with open(self.log, "w") as log:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                cwd=Path(__file__).resolve().parent.parent,
            )
        line = proc.stdout.readline()
        if not line.strip():
            proc.wait(timeout=30)
            raise RuntimeError(f"llama.cpp worker exited with {proc.returncode}: {self.stderr_tail()}")
        return proc

    def stderr_tail(self) -> str:
        return self.log.read_text(errors="replace")[-2000:] if self.log.is_file() else ""

    def call(self, command: str, **kwargs) -> dict:
        self.proc.stdin.write(json.dumps({"command": command, **kwargs}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line.strip():
            self.proc.wait(timeout=30)
            raise RuntimeError(f"llama.cpp worker died ({self.proc.returncode}): {self.stderr_tail()}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"llama.cpp worker: {reply['error']}")
        if "logits" in reply:
            path = reply["logits"]
            reply["logits"] = np.load(path)
            os.unlink(path)
        return reply

    def last_logits(self) -> np.ndarray:
        """The logits of the last token evaluated (the bindings keep rows in `scores` only with logits_all)."""
        pointer = self.llm._ctx.get_logits_ith(-1)
        return np.ctypeslib.as_array(pointer, shape=(self.llm.n_vocab(),)).astype(np.float32)

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return self.call("tokenize", texts=texts)["ids"]

    def forward(self, tokens: list[int]) -> np.ndarray:
        return self.call("forward", tokens=list(map(int, tokens)))["logits"]

    def decode(self, prompt: list[int], steps: int, feed: list[int] | None = None) -> tuple[np.ndarray, list[int]]:
        feed = None if feed is None else list(map(int, feed))
        reply = self.call("decode", prompt=list(map(int, prompt)), steps=steps, feed=feed)
        return reply["logits"], reply["tokens"]

    def speed(self, prompt: list[int], steps: int) -> float:
        return self.call("speed", prompt=list(map(int, prompt)), steps=steps)["seconds"]

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(BrokenPipeError):
                self.proc.stdin.write(json.dumps({"command": "quit"}) + "\n")
                self.proc.stdin.flush()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        for stream in (self.proc.stdin, self.proc.stdout):
            stream.close()
        shutil.rmtree(self.out_dir, ignore_errors=True)

    def __enter__(self) -> LlamaCppWorker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m modeling_itera.gguf_runtime", description=__doc__.splitlines()[0])
    parser.add_argument("path")
    parser.add_argument("--no-repack", action="store_true", help="use_extra_bufts=False (llama.cpp's --no-repack)")
    parser.add_argument("--logits-all", action="store_true", help="keep the logits of every position")
    parser.add_argument("--threads", type=int, default=THREADS)
    parser.add_argument("--out-dir", default=None)
    serve(parser.parse_args(argv))


if __name__ == "__main__":
    main()
