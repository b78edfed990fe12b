"""The GGUF export (`python -m modeling_itera.export --format gguf`) run in real llama.cpp (llama-cpp-python built
from its source distribution): f32 logits and greedy tokens equal Itera-Lite's, llama.cpp's tokenization equals
ours, f16 and q8_0 keep the argmax and the perplexity, a checkpoint llama.cpp cannot express is refused.

llama.cpp runs in a worker process (`modeling_itera.gguf_runtime`): on AMX CPUs quantized files crash in its weight
repack path, and the worker then retries with repacking off; the tests say so in a warning."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from modeling_itera import IteraLiteConfig, IteraLiteForCausalLM
from modeling_itera.export import main as export_main
from modeling_itera.export_gguf import write_gguf
from tests.conftest import TINY

pytest.importorskip("llama_cpp")
pytest.importorskip("gguf")

from modeling_itera.gguf_runtime import LlamaCppWorker  # noqa: E402  (after the skip: it needs llama_cpp)

BUNDLED = Path(__file__).resolve().parent.parent / "checkpoints" / "itera-lite-tinystories"
PROMPT = "Once upon a time, there was a little girl named Lily. She"
STEPS = 40
F32_TOLERANCE = 1e-3
STORIES = [
    "Tom had a red ball. He liked to throw it high in the sky. One day the ball got stuck in a tree. Tom was sad. "
    "His friend Sue came and shook the tree, and the ball fell down. Tom said thank you and they played together.",
    "Once upon a time there was a little bird. The bird wanted to fly far away, but it was scared. Its mom said, "
    '"You can do it!" The bird flapped its wings and flew over the big blue lake. It was very happy.',
    "Anna and her dad went to the park. They saw a big dog with a funny hat. The dog barked and ran to Anna. "
    "She laughed and gave the dog a hug. Then they all ate ice cream under a tree.",
]


def worker(path, **kwargs) -> LlamaCppWorker:
    w = LlamaCppWorker(path, **kwargs)
    if w.retried:
        warnings.warn(f"{Path(path).name}: {w.retried}", stacklevel=2)
    return w


@pytest.fixture(scope="module")
def bundled():
    model = IteraLiteForCausalLM.from_pretrained(BUNDLED, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(BUNDLED)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The bundled model as f32 (through the command line), f16 and q8_0 GGUF files."""
    folder = tmp_path_factory.mktemp("gguf")
    out = {}
    for outtype in ("f32", "f16", "q8_0"):
        out[outtype] = folder / f"itera-{outtype}.gguf"
        args = ["--format", "gguf", "--outtype", outtype, "--model", str(BUNDLED), "--output", str(out[outtype])]
        assert export_main(args) == 0
    return out


@pytest.fixture(scope="module")
def f32_run(bundled, files):
    """llama.cpp's prompt + STEPS greedy decode steps on the f32 file: (prompt ids, logits (STEPS + 1, v), tokens)."""
    _, tokenizer = bundled
    ids = tokenizer(PROMPT)["input_ids"]
    with worker(files["f32"]) as w:
        logits, tokens = w.decode(ids, STEPS)
    return ids, logits, tokens


@torch.no_grad()
def itera_logits(model, ids: list[int], tokens: list[int]) -> np.ndarray:
    """Itera-Lite's logits after the prompt and after each of `tokens` fed in turn (its full forward)."""
    full = model(torch.tensor([ids + tokens])).logits[0, len(ids) - 1 :]
    return full.numpy()


def test_f32_logits_and_greedy_tokens_equal_itera_lite(bundled, f32_run):
    model, _ = bundled
    ids, logits, tokens = f32_run
    ours = itera_logits(model, ids, tokens[:STEPS])
    assert np.abs(logits - ours).max() < F32_TOLERANCE
    with torch.no_grad():
        greedy = model.generate(
            torch.tensor([ids]), do_sample=False, max_new_tokens=STEPS, min_new_tokens=STEPS, repetition_penalty=1.0
        )
    assert tokens[:STEPS] == greedy[0, len(ids) :].tolist()


def test_prompt_logits_in_one_batch_and_tokenization(bundled, files):
    model, tokenizer = bundled
    texts = [PROMPT, "The dog ran to the park!", ' "Hello," said Mom. 123 tokens\nnew line', STORIES[1]]
    with worker(files["f32"], logits_all=True) as w:
        assert w.tokenize(texts) == [tokenizer(t)["input_ids"] for t in texts]
        ids = tokenizer(STORIES[0])["input_ids"]
        logits = w.forward(ids)
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(logits - ours).max() < F32_TOLERANCE


def perplexity(w: LlamaCppWorker, tokenizer) -> float:
    nll, count = 0.0, 0
    for story in STORIES:
        ids = tokenizer(story)["input_ids"]
        logits = w.forward(ids)[:-1].astype(np.float64)
        log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        nll += float((log_z - logits[np.arange(len(ids) - 1), ids[1:]]).sum())
        count += len(ids) - 1
    return math.exp(nll / count)


@pytest.mark.parametrize("outtype", ["f16", "q8_0"])
def test_half_and_q8_0_keep_the_argmax_and_the_perplexity(outtype, bundled, files, f32_run):
    model, tokenizer = bundled
    ids, _, tokens = f32_run
    ours = itera_logits(model, ids, tokens[:STEPS]).argmax(-1)
    with worker(files[outtype]) as w:
        logits, _ = w.decode(ids, STEPS, feed=tokens[:STEPS])  # teacher-forced on the f32 greedy sequence
    assert (logits.argmax(-1) == ours).mean() >= 0.95
    with worker(files["f32"], logits_all=True) as w:
        reference = perplexity(w, tokenizer)
    with worker(files[outtype], logits_all=True) as w:
        quantized = perplexity(w, tokenizer)
    assert abs(quantized / reference - 1) < 0.01, (quantized, reference)
    if outtype == "q8_0":
        fp32_bytes = 4 * sum(p.numel() for p in model.parameters())
        assert files["q8_0"].stat().st_size <= 0.6 * fp32_bytes


@torch.no_grad()
def test_untied_all_moe_tiny_preset_matches_in_f32(bundled, tmp_path):
    """Another layout: every layer MoE (no shared expert in llama.cpp), an untied head (`output.weight`)."""
    _, tokenizer = bundled
    config = {**TINY, "vocab_size": len(tokenizer), "moe_layer_period": 1, "moe_layer_offset": 0}
    model = IteraLiteForCausalLM(IteraLiteConfig(**config, tie_word_embeddings=False)).eval()
    path = write_gguf(model, tmp_path / "tiny.gguf", tokenizer)
    ids = tokenizer(PROMPT)["input_ids"]
    with worker(path) as w:
        logits, tokens = w.decode(ids, 8)
    assert np.abs(logits - itera_logits(model, ids, tokens[:8])).max() < F32_TOLERANCE


def test_expand_other_than_two_is_refused_clearly(bundled, tmp_path, capsys):
    _, tokenizer = bundled
    model = IteraLiteForCausalLM(IteraLiteConfig(**{**TINY, "expand": 3, "vocab_size": len(tokenizer)}))
    with pytest.raises(ValueError, match=r"expand = 2 only.*expand=3.*--format granite"):
        write_gguf(model, tmp_path / "x.gguf", tokenizer)
    assert not (tmp_path / "x.gguf").exists()
    folder = tmp_path / "expand3"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    assert export_main(["--format", "gguf", "--model", str(folder), "--output", str(tmp_path / "y.gguf")]) == 2
    assert "expand = 2 only" in capsys.readouterr().err and not (tmp_path / "y.gguf").exists()


def test_repacking_off_runs_the_quantized_file_the_same(bundled, files, f32_run):
    """The fallback for AMX CPUs (use_extra_bufts=False, llama.cpp's --no-repack) loads and decodes the q8_0 file;
    on a CPU without repacked types for Q8_0 both paths give the same logits."""
    ids, _, tokens = f32_run
    with worker(files["q8_0"], repack=False) as plain:
        assert plain.repack is False and plain.retried is None
        off, _ = plain.decode(ids, 8, feed=tokens[:8])
    with worker(files["q8_0"]) as default:
        on, _ = default.decode(ids, 8, feed=tokens[:8])
    assert (off.argmax(-1) == on.argmax(-1)).all() and np.abs(off - on).max() < 0.1
