"""Pretrain Itera-Lite (or the Llama baseline) with `Trainer`.

    python -m training.pretrain --train_file ../shared/data/tinystories/train.txt \
        --valid_file ../shared/data/tinystories/valid.txt --output_dir runs/tiny

Defaults come from a recipe in `configuration/recipes.json` (`--recipe`), the model shape from a preset in
`configuration/models.json` (`--model_preset`, `--config_overrides "hidden_size=128,num_hidden_layers=2"`); every
`TrainingArguments` field is a flag of its own (`--learning_rate`, `--max_steps`, `--bf16`, `--push_to_hub`, ...).
Writes the model with its tokenizer and generation config (loadable by `AutoModelForCausalLM` and
`pipeline("text-generation")`), `metrics.json` and `loss.png` into `--output_dir`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    GenerationConfig,
    HfArgumentParser,
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import logging

import modeling_itera
from modeling_itera.defaults import nf4_config
from modeling_itera.generation import have_cpp_compiler
from training import data, evaluate, reports
from training.precision import resolve_auto_precision
from training.tokenizer import load_or_train

logger = logging.get_logger("training.pretrain")
# accelerate reads these when Trainer builds its TorchDynamoPlugin (transformers passes only backend and mode).
REGIONAL_COMPILATION_ENV = {
    "ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION": "true",
    "ACCELERATE_DYNAMO_USE_FULLGRAPH": "true",
}
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configuration"
# What the shipped generation_config.json says; the pipeline would otherwise sample with its own defaults.
GENERATION_DEFAULTS = dict(
    do_sample=True, temperature=0.8, top_k=50, top_p=0.95, repetition_penalty=1.1, max_new_tokens=200
)


@dataclass
class ScriptArguments:
    recipe: str = field(default="tinystories", metadata={"help": "A recipe of configuration/recipes.json."})
    model_preset: str = field(default="tiny", metadata={"help": "A preset of configuration/models.json."})
    arch: str = field(default="itera", metadata={"help": "itera, or llama for the transformer baseline."})
    config_overrides: str | None = field(default=None, metadata={"help": "e.g. hidden_size=128,num_hidden_layers=2"})
    init_from: str | None = field(default=None, metadata={"help": "A saved model to continue from (fine-tuning)."})
    train_file: str | None = field(default=None, metadata={"help": "Local .txt/.jsonl file or folder."})
    valid_file: str | None = field(default=None, metadata={"help": "Local .txt/.jsonl validation file."})
    dataset_name: str = field(default="roneneldan/TinyStories", metadata={"help": "Hub dataset, if no train_file."})
    tokenizer: str | None = field(default=None, metadata={"help": "Tokenizer folder (default: train one)."})
    vocab_size: int = 8192
    block_size: int = 256
    max_eval_blocks: int | None = field(default=None, metadata={"help": "Blocks for evaluation during training."})
    packing_boundaries: bool = field(
        default=True,
        metadata={"help": "Reset the SSM state and conv at each document start inside a packed block (itera only)."},
    )
    time_budget: float | None = field(
        default=None, metadata={"help": "Stop (and checkpoint) after this many seconds of training."}
    )
    resume: bool = field(default=False, metadata={"help": "Resume from the last checkpoint in output_dir."})
    data_cache_dir: str = ".cache/itera-data"
    save_dtype: str = field(default="float32", metadata={"help": "Storage dtype of the final weights."})
    lora_r: int = field(default=0, metadata={"help": "LoRA rank; > 0 trains only LoRA adapters (peft)."})
    lora_alpha: int = 16
    load_in_4bit: bool = field(
        default=False, metadata={"help": "QLoRA: load --init_from in 4-bit nf4 (bitsandbytes) and train LoRA adapters."}
    )
    lora_targets: str = field(
        default="in_proj,out_proj,gate_up_proj,down_proj",
        metadata={"help": "Modules that get LoRA adapters: the SSM projections, the MLPs and the experts."},
    )


def load_json(name: str) -> dict:
    return json.loads((CONFIG_DIR / name).read_text())


def choose(table: dict, key: str, what: str) -> dict:
    if key not in table or key.startswith("_"):
        valid = ", ".join(k for k in table if not k.startswith("_"))
        raise ValueError(f"unknown {what} {key!r}; valid {what}s: {valid}")
    return dict(table[key])


def parse_overrides(text: str | None) -> dict:
    """ "a=1,b=0.5,c=true" -> {"a": 1, "b": 0.5, "c": True}, values parsed as JSON where they can be."""
    out = {}
    for item in filter(None, (text or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"config override {item!r} is not key=value")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def parse_args(
    argv: list[str] | None = None, default_recipe: str = "tinystories", script_arguments: type = ScriptArguments
):
    """Recipe values become the parser's defaults, so any flag on the command line wins over the recipe.

    The recipe name itself is read by a first pass of the same parser (without --help, and ignoring what it does not
    know yet), so `--recipe smoke`, `--recipe=smoke` and argparse's other spellings all select it."""
    argv = sys.argv[1:] if argv is None else list(argv)
    first_pass = HfArgumentParser((script_arguments, TrainingArguments), add_help=False)
    first_pass.set_defaults(recipe=default_recipe)
    recipe_name = first_pass.parse_known_args(argv)[0].recipe
    recipe = resolve_auto_precision(choose(load_json("recipes.json"), recipe_name, "recipe"))
    parser = HfArgumentParser((script_arguments, TrainingArguments))
    # On a machine without an accelerator, say so: transformers 5.24 otherwise ignores a torchrun/accelerate launch
    # on CPU (each process trains alone and they all write the same folder) instead of running DDP over gloo.
    no_accelerator = not torch.accelerator.is_available()
    parser.set_defaults(
        recipe=recipe_name, output_dir=f"runs/{recipe_name}", report_to="none", use_cpu=no_accelerator, **recipe
    )
    script_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    return script_args, training_args


def prepare_data(args: ScriptArguments, out: Path):
    """The tokenizer (loaded, or trained and saved in `out/tokenizer`) and the packed train and eval blocks."""
    train_texts = data.load_texts(args.train_file or args.dataset_name, split="train")
    valid_texts = None
    if args.valid_file or not args.train_file:
        valid_texts = data.load_texts(args.valid_file or args.dataset_name, split="validation")
    if args.tokenizer or args.init_from:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.init_from)
    else:
        tokenizer = load_or_train(out / "tokenizer", train_texts["text"], args.vocab_size)
    train_blocks = data.tokenize_and_pack(train_texts, tokenizer, args.block_size, args.data_cache_dir)
    eval_blocks = None
    if valid_texts is not None:
        eval_blocks = data.tokenize_and_pack(valid_texts, tokenizer, args.block_size, args.data_cache_dir)
    return tokenizer, train_blocks, eval_blocks


def build_model(args: ScriptArguments, tokenizer):
    """A fresh model from a preset, or a saved one to continue from."""
    if args.init_from and args.load_in_4bit:
        if args.lora_r <= 0:
            raise ValueError("--load_in_4bit trains LoRA adapters on a frozen 4-bit model: give --lora_r > 0")
        from peft import prepare_model_for_kbit_training

        model = AutoModelForCausalLM.from_pretrained(args.init_from, quantization_config=nf4_config())
        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if args.init_from:
        return AutoModelForCausalLM.from_pretrained(args.init_from, dtype=torch.float32)
    preset = choose(load_json("models.json"), args.model_preset, "model preset")
    preset.update(parse_overrides(args.config_overrides))
    ids = dict(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    if args.arch == "itera":
        return modeling_itera.IteraLiteForCausalLM(modeling_itera.IteraLiteConfig(**{**preset, **ids}))
    if args.arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**{**preset, **ids}))
    raise ValueError(f"unknown --arch {args.arch!r}; valid: itera, llama")


def use_fused_training_loss(model) -> None:
    """The recipes train Itera-Lite through its fused LM head + cross-entropy (no logits held: less memory, the
    training speed measured in benchmarks.train); a model of another architecture is left as it is."""
    for module in model.modules():
        if isinstance(module, modeling_itera.IteraLiteForCausalLM):
            module.fused_training_loss = True


def add_lora(model, args: ScriptArguments):
    """Freezes the model and adds trainable LoRA adapters (peft) to `args.lora_targets`."""
    from peft import LoraConfig, get_peft_model

    targets = [t.strip() for t in args.lora_targets.split(",") if t.strip()]
    config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, target_modules=targets, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def merged(peft_model, args: ScriptArguments):
    """The trained adapters merged into a full-precision copy of the base model. After QLoRA the base in memory is
    4-bit; merging there would re-quantize, so the adapters go onto the fp32 weights loaded again."""
    if not args.load_in_4bit:
        return peft_model.merge_and_unload()
    from peft import set_peft_model_state_dict
    from peft.utils import get_peft_model_state_dict

    adapters = get_peft_model_state_dict(peft_model)
    base = add_lora(AutoModelForCausalLM.from_pretrained(args.init_from, dtype=torch.float32), args)
    set_peft_model_state_dict(base, {k: v.float() for k, v in adapters.items()})
    base = base.merge_and_unload()
    base.generation_config = peft_model.generation_config
    return base


class TimeBudget(TrainerCallback):
    """Stops training after `seconds` of wall-clock time (the equal-cost comparison), and saves a checkpoint."""

    def __init__(self, seconds: float):
        self.seconds, self.start = seconds, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if time.perf_counter() - self.start >= self.seconds:
            control.should_training_stop = True
            control.should_save = True  # so that --resume can go on from here


class DivergenceGuard(TrainerCallback):
    """A NaN or infinite loss stops training with an error, before a broken model is saved."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            raise FloatingPointError(
                f"training loss became {loss} at step {state.global_step}: stopped before saving a broken model. "
                f"Lower --learning_rate, keep --max_grad_norm, or resume from the last checkpoint."
            )


@contextlib.contextmanager
def compilation_for(training_args: TrainingArguments):
    """Around the construction of the Trainer: `--torch_compile true` compiles each block on its own (accelerate's
    regional compilation: the repeated `IteraLiteBlock` is one graph, compiled once, with `fullgraph=True`, so a graph
    break is an error) rather than the whole model, whose loss (torch's chunked cross-entropy) runs eager anyway.
    On a CPU without a C++ compiler, which Inductor needs there, it warns and trains eager."""
    if not training_args.torch_compile:
        yield
        return
    if not torch.accelerator.is_available() and not have_cpp_compiler():
        logger.warning("--torch_compile: no C++ compiler (g++, clang++ or $CXX) for Inductor on CPU; training eager")
        training_args.torch_compile = False
        training_args.torch_compile_backend = training_args.torch_compile_mode = None
        for name in ("ACCELERATE_DYNAMO_BACKEND", "ACCELERATE_DYNAMO_MODE"):  # set by TrainingArguments
            os.environ.pop(name, None)
        yield
        return
    # Under activation checkpointing the MoE's expert-usage counter (a buffer update) is a side effect that dynamo
    # refuses to replay in the recomputation; not replaying it is right (eager counts the batch twice). Global, as in
    # accelerate's FSDP2 regional recipe: it must hold when the blocks compile, at the first step.
    torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    # A second batch shape (evaluation's batch size, an epoch's last batch) would otherwise recompile the blocks with
    # dynamic shapes, whose kernels train ~25% slower here (benchmarks.train); static graphs, one per shape, instead.
    torch._dynamo.config.automatic_dynamic_shapes = False
    modeling_itera.loss.use_compiled_loss(True)  # the bf16 loss's chunk, fused (the loss is outside the blocks)
    saved = {name: os.environ.get(name) for name in REGIONAL_COMPILATION_ENV}
    os.environ.update(REGIONAL_COMPILATION_ENV)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def last_complete_checkpoint(folder: Path) -> str | None:
    """The newest checkpoint that was written to the end. A run killed while saving leaves a partial folder
    (Trainer writes in place); `get_last_checkpoint` would pick it and the resume would fail."""
    newest = get_last_checkpoint(str(folder))
    candidates = sorted(folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]), reverse=True)
    for path in candidates:
        if all((path / name).exists() for name in ("trainer_state.json", "optimizer.pt", "scheduler.pt")):
            if str(path) != newest:
                logger.warning("skipping the incomplete checkpoint %s; resuming from %s", newest, path)
            return str(path)
    return None


def collator_for(args: ScriptArguments, tokenizer):
    """Batches that keep the packed documents apart (`--packing_boundaries`, Itera-Lite), or plain packed blocks."""
    if args.packing_boundaries and args.arch == "itera":
        return data.PackedDocumentsCollator(tokenizer.bos_token_id)
    if args.packing_boundaries:
        logger.warning("--packing_boundaries: --arch %s trains on packed blocks without boundaries", args.arch)
    return DataCollatorForLanguageModeling(tokenizer=tokenizer, mlm=False)


def steps_for_budget(model, args: ScriptArguments, training_args: TrainingArguments, vocab: int) -> int:
    """Optimizer steps that fit in `time_budget`, from the timed cost of a few forward+backward passes, so the
    learning-rate schedule ends when the budget does."""
    batch = training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
    ids = torch.randint(3, vocab, (training_args.per_device_train_batch_size, args.block_size))
    model.train()
    for i in range(4):
        if i == 1:
            start = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
    model.zero_grad(set_to_none=True)
    per_micro = (time.perf_counter() - start) / 3
    per_step = per_micro * batch / training_args.per_device_train_batch_size * 1.1  # + optimizer and logging
    return max(1, int(args.time_budget / per_step))


def main(argv: list[str] | None = None, default_recipe: str = "tinystories") -> dict:
    return train(*parse_args(argv, default_recipe))


def train(args: ScriptArguments, training_args: TrainingArguments) -> dict:
    """Trains as the parsed arguments say; returns the metrics (also written to `output_dir/metrics.json`)."""
    # Trainer hides NaN/inf losses from its logs by default; the divergence guard needs to see them.
    training_args.logging_nan_inf_filter = False
    torch.manual_seed(training_args.seed)
    out = Path(training_args.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    # Under torchrun/accelerate the main process trains the tokenizer and packs the data first; the others then
    # read its files (all writing them at once would race).
    with training_args.main_process_first(desc="tokenizer and data"):
        tokenizer, train_blocks, eval_blocks = prepare_data(args, out)
    if eval_blocks is None:
        training_args.eval_strategy = "no"

    model = build_model(args, tokenizer)
    use_fused_training_loss(model)
    model.generation_config = GenerationConfig(
        **GENERATION_DEFAULTS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if args.lora_r > 0:
        model = add_lora(model, args)
    if args.time_budget and training_args.max_steps <= 0:
        training_args.max_steps = steps_for_budget(model, args, training_args, len(tokenizer))
    callbacks = [DivergenceGuard()] + ([TimeBudget(args.time_budget)] if args.time_budget is not None else [])
    eval_during = eval_blocks
    if eval_blocks is not None and args.max_eval_blocks:
        eval_during = eval_blocks.select(range(min(args.max_eval_blocks, len(eval_blocks))))
    with compilation_for(training_args):
        trainer = Trainer(
            model=model,
            args=training_args,
            train_dataset=train_blocks,
            eval_dataset=eval_during,
            data_collator=collator_for(args, tokenizer),
            processing_class=tokenizer,
            callbacks=callbacks,
        )
    resume = last_complete_checkpoint(out) if args.resume else None
    if args.resume and resume is None:
        raise FileNotFoundError(f"--resume: no complete checkpoint-* folder in {out}")
    start = time.perf_counter()
    train_result = trainer.train(resume_from_checkpoint=resume)
    train_seconds = time.perf_counter() - start

    metrics = {
        "arch": args.arch,
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_seconds": round(train_seconds, 1),
        "global_step": trainer.state.global_step,
        "train_tokens": trainer.state.global_step
        * training_args.per_device_train_batch_size
        * training_args.gradient_accumulation_steps
        * max(1, training_args.world_size)
        * args.block_size,
        "train_loss": train_result.training_loss,
        "block_size": args.block_size,
    }
    if eval_blocks is not None:
        # Trainer's eval_loss includes the MoE load-balancing term; perplexity is the cross-entropy's alone.
        metrics["eval_loss"] = trainer.evaluate(eval_dataset=eval_blocks)["eval_loss"]
        trainer.model.eval()
        scored = evaluate.perplexity(trainer.model, eval_blocks, training_args.per_device_eval_batch_size)
        metrics["eval_cross_entropy"], metrics["perplexity"] = scored["loss"], scored["perplexity"]
    metrics["log_history"] = trainer.state.log_history
    if trainer.is_world_process_zero():
        final = merged(trainer.model, args) if args.lora_r > 0 else trainer.model  # a plain model again
        reports.save_final(final, tokenizer, out, args.save_dtype)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        reports.plot_losses(trainer.state.log_history, out / "loss.png", title=f"{args.arch} {args.model_preset}")
        if training_args.push_to_hub:
            # Trainer's own Hub support pushed the checkpoints as they were saved (hub_strategy); the final folder
            # goes up as a complete repository, with the model card and remote code, like `python -m hub_upload`.
            from hub_upload import push_model

            repo_id = training_args.hub_model_id or out.name
            push_model(
                out,
                repo_id,
                private=bool(training_args.hub_private_repo),
                token=training_args.hub_token,
                commit_message=f"Itera-Lite trained with training.pretrain ({trainer.state.global_step} steps)",
            )
    return metrics


def run_cli(program) -> None:
    """Runs a training program from the command line: its summary as JSON, or a one-line error and exit code 1."""
    try:
        result = program()
    except (ValueError, FileNotFoundError, FloatingPointError) as err:
        sys.exit(f"error: {err}")
    print(json.dumps({k: v for k, v in result.items() if k != "log_history"}, indent=2))


if __name__ == "__main__":
    run_cli(main)
