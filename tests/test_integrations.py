"""The tools users already use: PEFT LoRA, pipelines with batches, streaming from a worker thread; and misuse:
damaged weight files, a training run killed mid-way, random inputs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, TextIteratorStreamer, pipeline

from modeling_itera import IteraLiteConfig, IteraLiteForCausalLM
from training import finetune, pretrain
from training.tokenizer import train_tokenizer

from .conftest import TINY, smoke_args


@pytest.fixture
def model_folder(tmp_path):
    """A tiny random model with a real tokenizer, saved like a trained one."""
    tokenizer = train_tokenizer([f"the cat {i} saw the dog {i * 7} in the park" for i in range(300)], vocab_size=300)
    model = IteraLiteForCausalLM(IteraLiteConfig(**{**TINY, "vocab_size": len(tokenizer)}))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def test_lora_fine_tuning_changes_only_the_adapted_modules(story_files, tmp_path):
    base = tmp_path / "base"
    pretrain.main(smoke_args(story_files, base))
    train, valid = story_files
    out = tmp_path / "lora"
    argv = ["--model", str(base), "--train_file", str(train), "--valid_file", str(valid), "--output_dir", str(out)]
    argv += ["--max_steps", "3", "--block_size", "32", "--lora_r", "4", "--learning_rate", "1e-2"]
    metrics = finetune.main([*argv, "--data_cache_dir", str(tmp_path / "cache")])
    assert metrics["global_step"] == 3
    before, after = load_file(base / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys()  # merged back: a plain model, no adapter tensors left
    targets = ("in_proj", "out_proj", "gate_up_proj", "down_proj")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(any(t in k for t in targets) for k in changed)
    assert AutoModelForCausalLM.from_pretrained(out)(torch.tensor([[1, 5, 9]])).logits.shape[-1] == 300


def test_pipeline_generates_for_a_batch_of_prompts(model_folder):
    generator = pipeline("text-generation", model=str(model_folder))
    prompts = ["the cat", "the dog saw the park and"]
    batched = generator(prompts, batch_size=2, max_new_tokens=6, do_sample=False)
    alone = [generator(p, max_new_tokens=6, do_sample=False)[0]["generated_text"] for p in prompts]
    assert [b[0]["generated_text"] for b in batched] == alone


def test_text_iterator_streamer_streams_from_a_worker_thread(model_folder):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_folder)
    model = AutoModelForCausalLM.from_pretrained(model_folder)
    inputs = tokenizer("the cat", return_tensors="pt")
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=60)
    kwargs = dict(**inputs, max_new_tokens=12, min_new_tokens=12, do_sample=False, streamer=streamer)
    worker = threading.Thread(target=model.generate, kwargs=kwargs)
    worker.start()
    pieces = list(streamer)
    worker.join()
    full = model.generate(**inputs, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    expected = tokenizer.decode(full[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert len(pieces) > 1 and "".join(pieces) == expected


def test_truncated_weights_file_names_the_file(model_folder):
    path = model_folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(OSError, match=r"model\.safetensors is truncated or corrupted"):
        AutoModelForCausalLM.from_pretrained(model_folder)


def test_weights_that_do_not_fit_the_config_name_the_tensor(model_folder):
    weights = load_file(model_folder / "model.safetensors")
    weights["model.layers.1.mixer.out_proj.weight"] = torch.zeros(32, 7)
    save_file(weights, model_folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(OSError, match=r"'model\.layers\.1\.mixer\.out_proj\.weight' has shape \(32, 7\)"):
        AutoModelForCausalLM.from_pretrained(model_folder)


def test_training_killed_with_sigkill_resumes_from_its_last_checkpoint(story_files, tmp_path):
    """SIGKILL mid-run, then --resume: the losses after the checkpoint equal those of a run never interrupted."""
    steps = ["--max_steps", "60", "--save_steps", "4", "--logging_steps", "1"]
    whole = pretrain.main(smoke_args(story_files, tmp_path / "whole", *steps))
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "training.pretrain", *smoke_args(story_files, out, *steps)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=os.getcwd())
    deadline = time.time() + 600
    # Kill once checkpoint-4 is complete: the run is then in its next steps or writing checkpoint-8.
    while not (out / "checkpoint-4" / "trainer_state.json").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / "checkpoint-4").exists() and not (out / "model.safetensors").exists()  # killed mid-run
    resumed = pretrain.main(smoke_args(story_files, out, *steps, "--resume", "true"))

    def losses(metrics):
        return {e["step"]: e["loss"] for e in metrics["log_history"] if "loss" in e}

    tail = {s: v for s, v in losses(resumed).items() if s > 4}
    assert resumed["global_step"] == 60 and tail
    assert tail == pytest.approx({s: losses(whole)[s] for s in tail}, rel=1e-4)


def test_two_process_ddp_training_follows_the_single_process_curve(story_files, tmp_path):
    """`torchrun --nproc_per_node 2` (DDP over gloo on CPU), unchanged program, same global batch of 4."""
    common = ["--max_steps", "6", "--logging_steps", "1", "--save_strategy", "no", "--eval_strategy", "no"]
    single = pretrain.main(smoke_args(story_files, tmp_path / "one", *common, "--per_device_train_batch_size", "4"))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    two_args = smoke_args(story_files, tmp_path / "two", *common, "--per_device_train_batch_size", "2")
    cmd = [*launcher, "-m", "training.pretrain", *two_args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=os.getcwd())
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if "Error" in line or "error" in line]
    assert proc.returncode == 0, "\n".join(errors[-20:]) or proc.stderr[-3000:]
    assert "parallel_mode != ParallelMode.DISTRIBUTED" not in proc.stderr  # really DDP, not 2 lone processes
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())

    def losses(metrics):
        return [e["loss"] for e in metrics["log_history"] if "loss" in e]

    assert len(losses(two)) == 6
    assert losses(two) == pytest.approx(losses(single), rel=0.01)  # the same curve, within float noise


@pytest.mark.skipif(shutil.which("lm_eval") is None, reason="lm-evaluation-harness (lm-eval) is not installed")
def test_lm_evaluation_harness_scores_a_local_task(model_folder, tmp_path):
    """`lm_eval --model hf` on an Itera-Lite folder, offline, with a perplexity task over a local JSONL file."""
    data = tmp_path / "stories.jsonl"
    data.write_text("".join(json.dumps({"text": f"the cat {i} saw the dog in the park."}) + "\n" for i in range(6)))
    task = (Path(__file__).resolve().parent.parent / "lm_eval_tasks" / "tinystories_ppl.yaml").read_text()
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "stories.yaml").write_text(
        task.replace("tinystories_ppl", "stories_ppl").replace("lm_eval_tasks/tinystories_valid.jsonl", str(data))
    )
    cmd = ["lm_eval", "--model", "hf", "--model_args", f"pretrained={model_folder},trust_remote_code=True"]
    cmd += ["--tasks", "stories_ppl", "--include_path", str(tmp_path / "tasks"), "--device", "cpu"]
    cmd += ["--batch_size", "2", "--output_path", str(tmp_path / "out")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "home")}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=os.getcwd())
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"]["stories_ppl"]
    assert 1.0 < results["byte_perplexity,none"] < 300  # a finite, sane perplexity from the random tiny model


BUNDLED = Path(__file__).resolve().parents[1] / "checkpoints" / "itera-lite-tinystories"


def test_trl_sft_trainer_fine_tunes_the_bundled_model_and_the_result_loads_and_generates(tmp_path):
    """TRL reads the logits of every training step (its token accuracy): they must be there."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback

    stories = [
        "Once upon a time, there was a little cat named Tom. Tom liked to play in the sun.",
        "Lily had a red ball. She threw it to her dog, and the dog ran after it.",
        "One day, a boy went to the park with his mom. They saw a big tree and sat under it.",
        "The bird sang a happy song. All the animals in the forest came to listen.",
    ] * 4
    logged = []

    class KeepLogs(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            logged.append(dict(logs or {}))

    tokenizer = AutoTokenizer.from_pretrained(BUNDLED)
    model = AutoModelForCausalLM.from_pretrained(BUNDLED, dtype=torch.float32)
    args = trl.SFTConfig(
        output_dir=str(tmp_path / "run"),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-4,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        max_length=64,
        use_cpu=True,
        dataloader_num_workers=0,
    )
    trainer = trl.SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_dict({"text": stories}),
        processing_class=tokenizer,
        callbacks=[KeepLogs()],
    )
    trainer.train()
    accuracies = [entry["mean_token_accuracy"] for entry in logged if "mean_token_accuracy" in entry]
    assert len(accuracies) == 4 and all(0.0 < a <= 1.0 for a in accuracies)
    trainer.save_model(str(tmp_path / "tuned"))
    tuned = AutoModelForCausalLM.from_pretrained(tmp_path / "tuned").eval()
    prompt = tokenizer("Once upon a time", return_tensors="pt")
    out = tuned.generate(**prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert out.shape[1] == prompt["input_ids"].shape[1] + 8
    assert tokenizer.decode(out[0, prompt["input_ids"].shape[1] :]).strip()
