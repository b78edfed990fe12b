"""Fine-tune a saved Itera-Lite model on your own text with `Trainer`.

    python -m training.finetune --model checkpoints/itera-lite-tinystories --train_file my_stories.txt \
        --valid_file my_valid.txt --output_dir runs/my-finetune

The same program as `training.pretrain` (same flags, same outputs: model folder, metrics.json, loss.png), with the
"finetune" recipe as defaults and the model and tokenizer taken from `--model`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from training import pretrain


@dataclass
class FinetuneArguments(pretrain.ScriptArguments):
    init_from: str | None = field(
        default=None,
        metadata={"aliases": ["--model"], "help": "Required: the saved model folder (or Hub id) to fine-tune."},
    )


def parse_args(argv: list[str] | None = None):
    """`training.pretrain`'s parser with the "finetune" recipe and `--model` for `--init_from`; both required."""
    args, training_args = pretrain.parse_args(argv, default_recipe="finetune", script_arguments=FinetuneArguments)
    if not args.init_from:
        raise ValueError("--model is required: the saved model folder (or Hub id) to fine-tune")
    if not args.train_file:
        raise ValueError("--train_file is required: a .txt or .jsonl file of your own text")
    return args, training_args


def main(argv: list[str] | None = None) -> dict:
    return pretrain.train(*parse_args(argv))


if __name__ == "__main__":
    pretrain.run_cli(main)
