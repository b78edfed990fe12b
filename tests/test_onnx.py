"""The ONNX export and its torch-free runtime, on a tiny model trained here for a few seconds (a random one greedily
repeats one token, which would hide a wrong state): logits equal PyTorch's (fp32, atol 1e-4) at prefill and over 100
decode steps, greedy tokens equal `generate()` at batch 1 and in a left-padded batch, a prompt continued from
exported states equals one prefill, int8 costs < 1% perplexity, and the generator runs where `import torch` fails."""

from __future__ import annotations

import inspect
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime", reason="the [onnx] extra is not installed (pip install -e '.[onnx]')")
pytest.importorskip("onnxscript", reason="the [onnx] extra is not installed (pip install -e '.[onnx]')")

from modeling_itera import IteraLiteConfig, IteraLiteForCausalLM  # noqa: E402
from modeling_itera.export import METADATA_FILE, export_model, quantize_export  # noqa: E402
from modeling_itera.onnx_runtime import IteraOnnxModel, NotAnExportError, Sampler  # noqa: E402
from tests.conftest import TINY, WORDS  # noqa: E402

ATOL = 1e-4  # fp32 logits of ~unit scale; onnxruntime and torch differ in summation order only (measured ~2e-7)
RUNTIME = Path(__file__).resolve().parent.parent / "modeling_itera" / "onnx_runtime.py"
SPECIALS = ["<pad>", "<s>", "</s>"]


def structured_ids(n: int, length: int, seed: int) -> torch.Tensor:
    """Sequences in which the next id follows from the last one 90% of the time: something a model can learn."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.empty(n, length, dtype=torch.long)
    ids[:, 0] = torch.randint(3, TINY["vocab_size"], (n,), generator=g)
    for t in range(1, length):
        follow = (ids[:, t - 1] + 2) % (TINY["vocab_size"] - 3) + 3  # a cycle through all 96 ids
        ids[:, t] = torch.where(torch.rand(n, generator=g) < 0.9, follow, torch.randint(3, 99, (n,), generator=g))
    return ids


def word_tokenizer_json(path: Path) -> None:
    """A word-level tokenizer over the test words (ids 3..), written with `tokenizers` alone."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(SPECIALS + sorted(set(WORDS)) + ["."])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path))


@pytest.fixture(scope="module")
def model() -> IteraLiteForCausalLM:
    torch.manual_seed(0)
    # no eos: 100 greedy steps are compared without a stop in between (eos is tested on its own)
    model = IteraLiteForCausalLM(IteraLiteConfig(**TINY, eos_token_id=None))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = structured_ids(64, 48, seed=0)
    for step in range(100):
        batch = data[(step * 8) % 64 :][:8]
        model(batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory) -> Path:
    out = export_model(model, tmp_path_factory.mktemp("onnx") / "fp32")
    word_tokenizer_json(out / "tokenizer.json")
    return out


@pytest.fixture(scope="module")
def onnx_model(exported) -> IteraOnnxModel:
    return IteraOnnxModel(exported)


def torch_states(cache) -> list[np.ndarray]:
    return [t.numpy() for layer in cache.layers for t in (layer.conv_states[0], layer.recurrent_states[0])]


def test_prefill_and_100_decode_steps_equal_pytorch(model, onnx_model):
    ids = structured_ids(2, 13, seed=1)
    with torch.no_grad():
        out = model(ids, use_cache=True)
    logits, states = onnx_model.prefill(ids.numpy())
    np.testing.assert_allclose(logits, out.logits[:, -1].numpy(), atol=ATOL)
    for ours, theirs in zip(states, torch_states(out.cache)):
        np.testing.assert_allclose(ours, theirs, atol=ATOL)
    cache, token = out.cache, ids[:, -1:]
    for _ in range(100):
        token = structured_ids(2, 1, seed=int(token.sum()))
        with torch.no_grad():
            expected = model(token, cache=cache, use_cache=True).logits[:, -1].numpy()
        logits, states = onnx_model.decode(token.numpy(), states)
        np.testing.assert_allclose(logits, expected, atol=ATOL)


@pytest.mark.parametrize("padded", [False, True], ids=["batch-1", "left-padded-batch"])
def test_greedy_tokens_equal_generate(model, onnx_model, padded):
    if padded:
        ids = structured_ids(3, 11, seed=2)
        mask = torch.ones_like(ids)
        mask[0, :4], mask[1, :7] = 0, 0
        ids = ids.masked_fill(mask == 0, 0)
    else:
        ids, mask = structured_ids(1, 9, seed=3), torch.ones(1, 9, dtype=torch.long)
    expected = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=100)
    tokens = np.stack(list(onnx_model.generate_ids(ids.numpy(), mask.numpy(), max_new_tokens=100, greedy=True)), 1)
    assert len(set(tokens.ravel().tolist())) > 5  # the trained model does not just repeat a token
    np.testing.assert_array_equal(tokens, expected[:, ids.shape[1] :].numpy())


def test_continuing_from_states_equals_one_prefill(model, onnx_model):
    ids = structured_ids(2, 37, seed=4)  # 21 new tokens: two whole chunks of 8 through prefill, 5 decode steps
    whole_logits, whole_states = onnx_model.prefill(ids.numpy())
    _, states = onnx_model.prefill(ids[:, :16].numpy())
    logits, states = onnx_model.prefill(ids[:, 16:].numpy(), states=states)
    np.testing.assert_allclose(logits, whole_logits, atol=ATOL)
    for a, b in zip(states, whole_states):
        np.testing.assert_allclose(a, b, atol=ATOL)
    with torch.no_grad():
        np.testing.assert_allclose(logits, model(ids).logits[:, -1].numpy(), atol=ATOL)


def test_int8_perplexity_within_one_percent(exported, onnx_model, tmp_path):
    int8_dir = tmp_path / "int8"
    shutil.copytree(exported, int8_dir)
    quantize_export(int8_dir)
    text = structured_ids(8, 64, seed=5).numpy()  # held-out sequences of the training distribution
    fp32, int8 = onnx_model.perplexity(text), IteraOnnxModel(int8_dir).perplexity(text)
    assert fp32 < 40  # well below the vocabulary's 99: the model learned the structure
    assert abs(int8 - fp32) / fp32 < 0.01
    sizes = {p.name: p.stat().st_size for p in int8_dir.glob("*.onnx")}
    assert all(sizes[name] < (exported / name).stat().st_size for name in sizes)
    assert json.loads((int8_dir / METADATA_FILE).read_text())["int8"] is True


def test_eos_stops_a_row_and_pads_it(onnx_model):
    ids = structured_ids(2, 6, seed=6).numpy()
    free = np.stack(list(onnx_model.generate_ids(ids, max_new_tokens=20, greedy=True)), 1)
    eos = int(free[0, 3])  # pretend the 4th token of row 0 is the eos
    steps = np.stack(list(onnx_model.generate_ids(ids, max_new_tokens=20, greedy=True, eos_token_id=eos)), 1)
    np.testing.assert_array_equal(steps[0, :4], free[0, :4])
    assert (steps[0, 4:] == onnx_model.pad_token_id).all()
    rest = free[1, : steps.shape[1]]
    np.testing.assert_array_equal(steps[1], np.where(np.cumsum(rest == eos) - (rest == eos) > 0, 0, rest))


def test_sampling_is_seeded(onnx_model):
    ids = structured_ids(1, 5, seed=7).numpy()
    kwargs = dict(max_new_tokens=30, temperature=3.0, top_k=5, seed=123)
    a = np.stack(list(onnx_model.generate_ids(ids, **kwargs)), 1)
    np.testing.assert_array_equal(a, np.stack(list(onnx_model.generate_ids(ids, **kwargs)), 1))
    greedy = np.stack(list(onnx_model.generate_ids(ids, max_new_tokens=30, greedy=True)), 1)
    assert not np.array_equal(a, greedy)


def test_sampler_keeps_top_k_and_top_p():
    logits = np.random.default_rng(0).normal(size=(4, 50)).astype(np.float32)
    seen = np.zeros_like(logits, dtype=bool)
    top3 = np.argsort(-logits, -1)[:, :3]
    draws = np.stack([Sampler(temperature=5.0, top_k=3, seed=s)(logits, seen) for s in range(200)], 1)
    assert all(set(draws[i]) <= set(top3[i]) and len(set(draws[i])) == 3 for i in range(4))
    argmax_only = Sampler(top_p=1e-6, seed=0)(logits, seen)
    np.testing.assert_array_equal(argmax_only, logits.argmax(-1))


def test_text_generation_and_streaming_agree(onnx_model):
    tok = onnx_model.tokenizer
    prompt_ids = tok.encode("the cat").ids
    new_ids = np.stack(list(onnx_model.generate_ids(np.array([prompt_ids]), max_new_tokens=12, greedy=True)), 1)[0]
    assert onnx_model.generate("the cat", max_new_tokens=12, greedy=True) == tok.decode(new_ids.tolist())
    streamed = "".join(onnx_model.stream("the cat", max_new_tokens=12, greedy=True))
    assert tok.decode(prompt_ids) + streamed == tok.decode(prompt_ids + new_ids.tolist())
    batch = onnx_model.generate(["the cat", "a big red ball"], max_new_tokens=12, greedy=True)
    assert batch[0] == onnx_model.generate("the cat", max_new_tokens=12, greedy=True)  # left padding changes nothing


def test_generator_runs_where_torch_cannot_be_imported(exported, onnx_model):
    script = f"""
import sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
try:
    import torch
except ImportError:
    pass
else:
    raise SystemExit("torch is importable")
import importlib.util, json
spec = importlib.util.spec_from_file_location("onnx_runtime", {str(RUNTIME)!r})
runtime = importlib.util.module_from_spec(spec)
spec.loader.exec_module(runtime)
model = runtime.IteraOnnxModel({str(exported)!r})
print(json.dumps(model.generate(["the cat", "a big red ball"], max_new_tokens=12, greedy=True)))
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    expected = onnx_model.generate(["the cat", "a big red ball"], max_new_tokens=12, greedy=True)
    assert json.loads(result.stdout) == expected


def test_a_folder_that_is_not_an_export(tmp_path):
    with pytest.raises(NotAnExportError, match="no itera_onnx.json"):
        IteraOnnxModel(tmp_path)
    with pytest.raises(NotAnExportError, match="not a folder"):
        IteraOnnxModel(tmp_path / "missing")


def test_a_graph_from_another_model(exported, tmp_path):
    import onnx

    mixed = tmp_path / "mixed"
    shutil.copytree(exported, mixed)
    proto = onnx.load(str(mixed / "decode.onnx"))
    next(p for p in proto.metadata_props if p.key == "itera_config_hash").value = "0" * 64  # another model's stamp
    onnx.save(proto, str(mixed / "decode.onnx"))
    with pytest.raises(NotAnExportError, match="decode.onnx was exported from another model"):
        IteraOnnxModel(mixed)


def test_mismatched_states_and_ids_out_of_range(onnx_model):
    states = onnx_model.zero_states(2)
    with pytest.raises(ValueError, match=r"conv_state_0 has shape \(2, 80, 4\), expected \(1, 80, 4\)"):
        onnx_model.decode(np.array([[5]]), states)
    with pytest.raises(ValueError, match="expected 4 state arrays"):
        onnx_model.decode(np.array([[5], [6]]), states[:3])
    with pytest.raises(ValueError, match=r"token id 99, outside \[0, vocab_size=99\)"):
        onnx_model.prefill(np.array([[3, 99]]))
    with pytest.raises(ValueError, match="cannot be padded"):
        onnx_model.prefill(np.array([[3, 4]]), np.array([[0, 1]]), states=onnx_model.zero_states(1))


def test_cli_backend_onnx(exported, onnx_model, capsys, tmp_path):
    from modeling_itera import __main__ as cli

    flags = ["--backend", "onnx", "--model", str(exported), "--greedy", "--max-new-tokens", "8"]
    assert cli.main([*flags, "the cat"]) == 0
    streamed = "".join(onnx_model.stream("the cat", max_new_tokens=8, greedy=True))
    assert capsys.readouterr().out == f"the cat{streamed}\n"
    assert cli.main(["--backend", "onnx", "--model", str(tmp_path), "the cat"]) == 2
    assert "no itera_onnx.json" in capsys.readouterr().err


GENERATION_ARGUMENTS = "max_new_tokens greedy temperature top_k top_p repetition_penalty seed eos_token_id".split()


@pytest.mark.parametrize("method", ["generate", "stream"])
def test_generate_and_stream_show_their_arguments_and_refuse_others(onnx_model, method):
    parameters = inspect.signature(getattr(IteraOnnxModel, method)).parameters
    assert [*GENERATION_ARGUMENTS, "skip_special_tokens"] == [
        p for p in parameters if p not in ("self", "prompts", "prompt")
    ]
    assert all(p.kind is not inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    run = getattr(onnx_model, method)
    with pytest.raises(TypeError, match="max_tokens"):
        list(run("the cat", max_tokens=3))
    with pytest.raises(ValueError, match="max_new_tokens"):
        list(run("the cat", max_new_tokens=-1))
