"""Tokenizer, data pipeline and the Trainer programs, on small text files the tests write themselves."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

from hub_upload import refresh_code
from modeling_itera.defaults import BUNDLED_MODEL as BUNDLED
from training import data, finetune, precision, pretrain
from training.tokenizer import train_tokenizer

from .conftest import smoke_args, write_stories


def test_tokenizer_round_trips_unicode_and_has_the_full_vocabulary(tmp_path):
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 7))) for _ in range(300)]
    texts = ["Once upon a time, Lily met Ben.", "Zoë ate crème brûlée 🍮 in Kraków!", "日本語のテキスト"] * 20
    texts += [" ".join(rng.choice(words) for _ in range(20)) for _ in range(300)]
    tokenizer = train_tokenizer(texts, vocab_size=400)
    assert len(tokenizer) == 400
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    for text in texts[:3] + ["never seen: Ωμέγα ✓"]:
        encoded = tokenizer(text)["input_ids"]
        assert encoded[0] == tokenizer.bos_token_id
        assert tokenizer.decode(encoded, skip_special_tokens=True) == text
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded("Zoë 🍮")["input_ids"] == tokenizer("Zoë 🍮")["input_ids"]
    assert reloaded.padding_side == "left" and reloaded.pad_token == "<pad>"


def test_packing_loses_no_token_and_ends_each_document_with_eos(tmp_path):
    stories = write_stories(tmp_path / "t.txt", n=30)
    texts = data.load_texts(str(tmp_path / "t.txt"))
    tokenizer = train_tokenizer(texts["text"], vocab_size=300)
    expected = [t for s in stories for t in tokenizer(s)["input_ids"] + [tokenizer.eos_token_id]]
    block = 16
    blocks = data.tokenize_and_pack(texts, tokenizer, block)
    flat = [t for b in blocks["input_ids"] for t in b]
    assert all(len(b) == block for b in blocks["input_ids"])
    assert flat == expected[: len(expected) // block * block]  # only the tail shorter than a block is dropped
    assert flat.count(tokenizer.eos_token_id) == sum(1 for t in expected[: len(flat)] if t == tokenizer.eos_token_id)


def test_packed_blocks_are_cached_between_runs(tmp_path):
    write_stories(tmp_path / "t.txt")
    texts = data.load_texts(str(tmp_path / "t.txt"))
    tokenizer = train_tokenizer(texts["text"], vocab_size=300)
    first = data.tokenize_and_pack(texts, tokenizer, 16, tmp_path / "cache")
    cached = list((tmp_path / "cache").iterdir())
    assert len(cached) == 1
    second = data.tokenize_and_pack(texts, tokenizer, 16, tmp_path / "cache")
    assert second["input_ids"] == first["input_ids"]
    assert list((tmp_path / "cache").iterdir()) == cached


def test_jsonl_files_are_read_by_their_text_field(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "one story"}\n{"text": "two"}\n')
    assert data.load_texts(str(path))["text"] == ["one story", "two"]


def test_a_missing_data_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        data.load_texts(str(tmp_path / "nope.txt"))


def test_an_empty_data_file_says_so(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="empty"):
        data.load_texts(str(tmp_path / "empty.txt"))


def test_an_unknown_preset_lists_the_valid_ones(story_files, tmp_path):
    with pytest.raises(ValueError, match="unknown model preset 'huge'.*tiny"):
        pretrain.main(smoke_args(story_files, tmp_path / "run", "--model_preset", "huge"))
    with pytest.raises(ValueError, match="unknown recipe 'nope'.*tinystories"):
        pretrain.main(["--recipe", "nope"])


@pytest.mark.parametrize("spelling", [["--recipe", "smoke"], ["--recipe=smoke"]], ids=["space", "equals"])
def test_both_flag_spellings_select_the_recipe(spelling):
    args, training_args = pretrain.parse_args([*spelling, "--block_size=48"])
    assert args.recipe == "smoke" and training_args.max_steps == 5 and training_args.output_dir == "runs/smoke"
    assert args.block_size == 48  # a flag still wins over the recipe


@pytest.mark.parametrize("native", [True, False], ids=["bf16-hardware", "no-bf16-hardware"])
def test_the_recipe_turns_bf16_on_only_where_the_hardware_has_it(monkeypatch, native):
    monkeypatch.setattr(precision, "native_bf16_available", lambda: native)
    assert pretrain.parse_args([])[1].bf16 is native  # the tinystories recipe says "auto"
    assert pretrain.parse_args(["--bf16", "false"])[1].bf16 is False  # a flag still decides
    assert pretrain.parse_args(["--recipe", "smoke"])[1].bf16 is False  # a recipe without "auto" is not touched


def test_native_bf16_is_read_off_this_machine():
    from_cpuinfo = None
    if Path("/proc/cpuinfo").exists() and not torch.accelerator.is_available():
        flags = Path("/proc/cpuinfo").read_text()
        from_cpuinfo = "avx512_bf16" in flags or "amx_bf16" in flags
    if from_cpuinfo is not None:
        assert precision.native_bf16_available() is from_cpuinfo


@pytest.mark.parametrize("equals", [False, True], ids=["space", "equals"])
def test_finetune_reads_its_flags_in_both_spellings(equals):
    flags = {"--model": "some/model", "--train_file": "mine.txt", "--recipe": "smoke"}
    argv = [f"{k}={v}" for k, v in flags.items()] if equals else [x for kv in flags.items() for x in kv]
    args, training_args = finetune.parse_args(argv)
    assert (args.init_from, args.train_file, training_args.max_steps) == ("some/model", "mine.txt", 5)
    with pytest.raises(ValueError, match="--train_file is required"):
        finetune.parse_args(argv[:1] if equals else argv[:2])  # --model alone


def test_five_step_trainer_run_writes_a_loadable_model(story_files, tmp_path):
    out = tmp_path / "run"
    metrics = pretrain.main(smoke_args(story_files, out))
    assert metrics["global_step"] == 5
    assert torch.isfinite(torch.tensor(metrics["eval_loss"]))
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["perplexity"] == pytest.approx(torch.tensor(saved["eval_cross_entropy"]).exp().item(), rel=1e-6)
    assert saved["eval_loss"] > saved["eval_cross_entropy"]  # Trainer's eval loss includes the MoE aux term
    assert (out / "loss.png").stat().st_size > 0
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["do_sample"] is True and generation["max_new_tokens"] > 0
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.float32
    generator = pipeline("text-generation", model=str(out))
    text = generator("the cat", max_new_tokens=5, do_sample=False)[0]["generated_text"]
    assert text.startswith("the cat")


def test_config_overrides_and_training_flags_win_over_the_recipe(story_files, tmp_path):
    out = tmp_path / "run"
    pretrain.main(smoke_args(story_files, out, "--max_steps", "2", "--config_overrides", "hidden_size=48,head_dim=24"))
    config = json.loads((out / "config.json").read_text())
    assert config["hidden_size"] == 48
    assert json.loads((out / "metrics.json").read_text())["global_step"] == 2


def test_resume_continues_at_the_right_step(story_files, tmp_path):
    """A run stopped at step 3 and resumed to step 6 logs the same losses as a run that never stopped."""
    whole = pretrain.main(smoke_args(story_files, tmp_path / "whole", "--max_steps", "6", "--save_steps", "3"))
    out = tmp_path / "run"
    pretrain.main(smoke_args(story_files, out, "--max_steps", "6", "--save_steps", "3", "--time_budget", "0"))
    assert (out / "checkpoint-1").exists() and not (out / "checkpoint-6").exists()
    resumed = pretrain.main(smoke_args(story_files, out, "--max_steps", "6", "--save_steps", "3", "--resume", "true"))
    assert resumed["global_step"] == 6

    def losses(metrics):
        return {e["step"]: e["loss"] for e in metrics["log_history"] if "loss" in e}

    assert losses(resumed) == pytest.approx(losses(whole), rel=1e-4)


def test_resume_without_a_checkpoint_is_a_clear_error(story_files, tmp_path):
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        pretrain.main(smoke_args(story_files, tmp_path / "fresh", "--resume", "true"))


def test_finetune_continues_from_a_saved_model(story_files, tmp_path):
    base = tmp_path / "base"
    pretrain.main(smoke_args(story_files, base))
    out = tmp_path / "ft"
    train, valid = story_files
    argv = ["--model", str(base), "--train_file", str(train), "--valid_file", str(valid), "--output_dir", str(out)]
    argv += ["--max_steps", "2", "--block_size", "32", "--data_cache_dir", str(tmp_path / "cache")]
    metrics = finetune.main(argv)
    assert metrics["global_step"] == 2
    before = AutoModelForCausalLM.from_pretrained(base).state_dict()
    after = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_a_nan_loss_stops_training_before_saving(story_files, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(FloatingPointError, match="loss became nan"):
        pretrain.main(smoke_args(story_files, out, "--config_overrides", "initializer_range=1e30"))
    assert not (out / "model.safetensors").exists()


def test_the_bundled_model_loads_in_fp32_and_writes_english():
    tokenizer = AutoTokenizer.from_pretrained(BUNDLED)
    model = AutoModelForCausalLM.from_pretrained(BUNDLED).eval()
    assert model.dtype == torch.float32  # stored in bf16, loaded as fp32 by default (config.dtype)
    story = "Once upon a time, there was a little girl named Lily. She liked to play in the park with her dog."
    ids = tokenizer(story, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    assert loss < 3.5  # perplexity < 33 on a simple story; an untrained model is near ln(8192) = 9
    out = model.generate(**tokenizer("Once upon a time", return_tensors="pt"), max_new_tokens=30, do_sample=False)
    text = tokenizer.decode(out[0], skip_special_tokens=True)
    assert text.startswith("Once upon a time") and len(text.split()) > 15


def test_the_bundled_model_ships_the_current_model_code():
    """The folder's remote-code copies (used where the package is not installed) must not drift from the package:
    the same files, with the same text, as `save_pretrained` would write now."""
    problems = refresh_code.stale(BUNDLED)
    assert not problems, (
        "the bundled model's remote code is stale:\n  " + "\n  ".join(problems) + "\nrefresh it (weights untouched) "
        "with: python -m hub_upload.refresh_code checkpoints/itera-lite-tinystories"
    )


@pytest.mark.parametrize("flag,boundaries", [([], True), (["--packing_boundaries", "false"], False)], ids=["on", "off"])
def test_packing_boundaries_flag_picks_the_collator(story_files, tmp_path, flag, boundaries):
    args, _ = pretrain.parse_args(smoke_args(story_files, tmp_path / "out", *flag))
    tokenizer = train_tokenizer(["the cat ran", "the dog sat"] * 20, vocab_size=300)
    batch = pretrain.collator_for(args, tokenizer)([{"input_ids": [1, 5, 2, 1, 6, 2]}])
    assert ("seq_idx" in batch) == boundaries
    assert batch["labels"][0].tolist() == ([-100, 5, 2, -100, 6, 2] if boundaries else [1, 5, 2, 1, 6, 2])
