"""The GraniteMoeHybrid export (`python -m modeling_itera.export --format granite`): stock transformers loads the
folder with no code of ours and gives Itera-Lite's logits (fp32, within 2e-5) and greedy tokens, cached and
left-padded."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, GraniteMoeHybridForCausalLM

from modeling_itera import IteraLiteConfig, IteraLiteForCausalLM
from modeling_itera.export import main as export_main
from modeling_itera.export_granite import write_granite_folder
from modeling_itera.granite import cost_per_token
from tests.conftest import TINY

BUNDLED = Path(__file__).resolve().parent.parent / "checkpoints" / "itera-lite-tinystories"
TOLERANCE = 2e-5
NEW_TOKENS = 40
PRESETS = {
    "tiny": TINY,
    # another expand, kernel, expert count and top-k, an untied head, every layer MoE (a shared expert of width 0)
    "expand3-k3-e3-top1-untied-all-moe": {
        **TINY,
        "expand": 3,
        "conv_kernel": 3,
        "num_experts": 3,
        "num_experts_per_tok": 1,
        "moe_layer_period": 1,
        "moe_layer_offset": 0,
        "num_hidden_layers": 3,
        "tie_word_embeddings": False,
    },
    "dense-only": {**TINY, "num_experts": 0},
}

# Runs where `import modeling_itera` fails and the cwd is outside the repository: only stock transformers remains.
STOCK = textwrap.dedent("""
    import sys; sys.modules["modeling_itera"] = None
    import json, torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder, prompts, new = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    kwargs = dict(do_sample=False, max_new_tokens=new, repetition_penalty=1.0)
    one = model.generate(**tokenizer(prompts[0], return_tensors="pt"), **kwargs)
    batch = model.generate(**tokenizer(prompts, return_tensors="pt", padding=True), **kwargs)
    print(json.dumps({"module": type(model).__module__, "one": one.tolist(), "batch": batch.tolist()}))
""")
PROMPTS = ["Once upon a time, there was a little girl named Lily.", "The dog ran"]


def itera_and_granite(config_kwargs: dict, folder: Path):
    torch.manual_seed(0)
    model = IteraLiteForCausalLM(IteraLiteConfig(**config_kwargs)).eval()
    write_granite_folder(model, folder)
    return model, GraniteMoeHybridForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def padded_batch(vocab: int, lengths=(12, 7, 3)) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids, left-padded to the longest row, and their mask."""
    ids = torch.randint(3, vocab, (len(lengths), max(lengths)))
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, -n:] = 1
    return ids * mask, mask


@pytest.mark.parametrize("preset", list(PRESETS))
@torch.no_grad()
def test_logits_equal_itera_lite_on_random_presets(preset, tmp_path):
    model, granite = itera_and_granite(PRESETS[preset], tmp_path / "granite")
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (2, 24))
    assert (granite(ids).logits - model(ids).logits).abs().max() < TOLERANCE
    ids, mask = padded_batch(vocab)
    real = mask.bool()
    ours, theirs = model(ids, attention_mask=mask).logits, granite(ids, attention_mask=mask).logits
    assert (theirs[real] - ours[real]).abs().max() < TOLERANCE
    # cached decode: a prompt, then tokens one at a time through the cache
    prompt, steps = ids[:1, -12:], torch.randint(3, vocab, (1, 5))
    out = granite(prompt, use_cache=True)
    cache, rows = out.cache, [out.logits[:, -1]]
    for t in range(steps.shape[1]):
        out = granite(steps[:, t : t + 1], cache=cache, use_cache=True)
        rows.append(out.logits[:, -1])
    full = model(torch.cat([prompt, steps], dim=1)).logits[:, prompt.shape[1] - 1 :]
    assert (torch.stack(rows, dim=1) - full).abs().max() < TOLERANCE


def test_config_is_plain_json_with_the_fields_readers_need(tmp_path):
    _, granite = itera_and_granite(TINY, tmp_path / "granite")
    text = (tmp_path / "granite" / "config.json").read_text()
    config = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert "__float__" not in text and "time_step_limit" not in config
    assert config["model_type"] == "granitemoehybrid" and config["architectures"] == ["GraniteMoeHybridForCausalLM"]
    assert config["layer_types"] == ["mamba"] * TINY["num_hidden_layers"] + ["attention"]
    assert config["rms_norm_eps"] == IteraLiteConfig().rms_norm_eps and config["position_embedding_type"] == "nope"
    assert config["tie_word_embeddings"] is True
    for key in ("embedding_multiplier", "residual_multiplier", "attention_multiplier", "logits_scaling"):
        assert config[key] == 1.0
    assert granite.config.time_step_limit == (0.0, float("inf"))  # the default, a no-op clamp
    assert granite.model.rotary_emb is None


def test_cost_accounting_counts_the_tensors_written(tmp_path):
    model, granite = itera_and_granite(TINY, tmp_path / "granite")
    cost = cost_per_token(model.config)
    assert cost["itera_lite"]["parameters"] == sum(p.numel() for p in model.parameters())
    assert cost["granite"]["parameters"] == sum(p.numel() for p in granite.parameters())
    assert cost["granite"]["macs_per_token"] > cost["itera_lite"]["macs_per_token"]


@pytest.fixture(scope="module")
def bundled_granite(tmp_path_factory):
    folder = tmp_path_factory.mktemp("granite") / "itera-granite"
    assert export_main(["--format", "granite", "--model", str(BUNDLED), "--output", str(folder)]) == 0
    return folder


@torch.no_grad()
def test_bundled_model_logits_and_left_padded_batch(bundled_granite):
    model = IteraLiteForCausalLM.from_pretrained(BUNDLED, dtype=torch.float32).eval()
    granite = GraniteMoeHybridForCausalLM.from_pretrained(bundled_granite, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(bundled_granite)
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    real = batch["attention_mask"].bool()
    ours, theirs = model(**batch).logits, granite(**batch).logits
    assert (theirs[real] - ours[real]).abs().max() < TOLERANCE


def test_stock_transformers_generates_itera_lite_tokens_without_the_package(bundled_granite, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", STOCK, str(bundled_granite), json.dumps(PROMPTS), str(NEW_TOKENS)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    stock = json.loads(proc.stdout.strip().splitlines()[-1])
    assert stock["module"] == "transformers.models.granitemoehybrid.modeling_granitemoehybrid"

    model = IteraLiteForCausalLM.from_pretrained(BUNDLED, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(BUNDLED)
    kwargs = dict(do_sample=False, max_new_tokens=NEW_TOKENS, repetition_penalty=1.0)
    with torch.no_grad():
        one = model.generate(**tokenizer(PROMPTS[0], return_tensors="pt"), **kwargs)
        batch = model.generate(**tokenizer(PROMPTS, return_tensors="pt", padding=True), **kwargs)
    assert stock["one"] == one.tolist() and len(stock["one"][0]) > len(tokenizer(PROMPTS[0])["input_ids"]) + 10
    assert stock["batch"] == batch.tolist()
