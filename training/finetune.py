"""Fine-tune a saved Itera-Lite model on your own text with `Trainer`.

    python -m training.finetune --model checkpoints/itera-lite-tinystories --train_file my_stories.txt \
        --valid_file my_valid.txt --output_dir runs/my-finetune

The same program as `training.pretrain` (same flags, same outputs: model folder, metrics.json, loss.png), with the
"finetune" recipe as defaults and the model and tokenizer taken from `--model`.
"""

from __future__ import annotations

import sys

from training import pretrain


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--model" not in argv:
        raise ValueError("--model is required: the saved model folder (or Hub id) to fine-tune")
    argv[argv.index("--model")] = "--init_from"
    if "--train_file" not in argv:
        raise ValueError("--train_file is required: a .txt or .jsonl file of your own text")
    return pretrain.main(argv, default_recipe="finetune")


if __name__ == "__main__":
    pretrain.run_cli(main)
