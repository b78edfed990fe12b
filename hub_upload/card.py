"""The model card (README.md) of an Itera-Lite Hub repository, built from the model folder alone.

Metadata goes through `ModelCardData`, so the Hub's widgets, search filters and leaderboard (`model-index`) read it;
the body is plain Markdown assembled here. Everything is derived from files in the folder (config, metrics.json,
weights), so the same folder always gives the same card, byte for byte: re-pushing an unchanged model changes nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from safetensors import safe_open

from modeling_itera import IteraLiteConfig, IteraLiteForCausalLM

from .folder import files_to_ship, read_config, remote_code_files

DATASET_ID, DATASET_NAME, DATASET_LICENSE = "roneneldan/TinyStories", "TinyStories", "CDLA-Sharing-1.0"
# Weights trained on TinyStories are a derivative of it, and CDLA-Sharing asks derivatives to keep its terms.
DEFAULT_LICENSE = "cdla-sharing-1.0"
TAGS = ["itera-lite", "state-space-model", "mamba2", "mixture-of-experts", "tinystories", "custom_code"]


def count_parameters(config: IteraLiteConfig) -> tuple[int, int, list[str]]:
    """Total parameters, parameters active per token, and the layers 4-bit loading must skip.

    The model is built on the meta device: shapes only, no memory, no weights read. Active = total minus, in each
    MoE layer, the `num_experts - num_experts_per_tok` experts a token does not visit (tied weights counted once).
    """
    with torch.device("meta"):
        model = IteraLiteForCausalLM(config)
    total = sum(p.numel() for p in model.parameters())
    unused = 0
    for layer, kind in zip(model.model.layers, config.layers_block_type):
        if kind == "moe":
            per_expert = sum(p.numel() for p in layer.feed_forward.experts[0].parameters())
            unused += (config.num_experts - config.num_experts_per_tok) * per_expert
    kept = sorted(name.rsplit(".", 1)[-1] for name in model.modules_kept_out_of_quantization())
    return total, total - unused, kept


def weights_summary(folder: Path) -> str:
    files = sorted(folder.glob("*.safetensors"))
    dtypes = set()
    for path in files:
        with safe_open(path, framework="pt") as f:
            dtypes |= {f.get_slice(key).get_dtype() for key in f.keys()}
    size = sum(path.stat().st_size for path in files)
    return f"safetensors, {'/'.join(sorted(dtypes))}, {size / 1e6:.1f} MB"


def card_data(repo_id: str, metrics: dict, license: str) -> ModelCardData:
    name = repo_id.split("/")[-1]
    results = []
    if "perplexity" in metrics:
        results.append(
            EvalResult(
                task_type="text-generation",
                task_name="Text Generation",
                dataset_type=DATASET_ID,
                dataset_name=DATASET_NAME,
                dataset_split="validation",
                metric_type="perplexity",
                metric_name="Perplexity",
                metric_value=round(float(metrics["perplexity"]), 4),
            )
        )
    return ModelCardData(
        model_name=name,
        language="en",
        license=license,
        library_name="transformers",
        pipeline_tag="text-generation",
        datasets=[DATASET_ID],
        tags=TAGS,
        metrics=["perplexity"],
        eval_results=results or None,
    )


def short(n: int) -> str:
    """7367520 -> "7.37 M"."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return str(n)


def exact(n: int) -> str:
    return f"{n:,} ({short(n)})"


def architecture(config: IteraLiteConfig, total: int, active: int, weights: str) -> str:
    moe = config.layers_block_type.count("moe")
    experts = (
        f"{moe} layer{'s' * (moe > 1)}, {config.num_experts} SwiGLU experts of width "
        f"{config.moe_intermediate_size}, top-{config.num_experts_per_tok} routing"
    )
    rows = [
        ("Parameters", f"{exact(total)} total, {exact(active)} active per token"),
        ("Layers", f"{config.num_hidden_layers}: feed-forward per layer {', '.join(config.layers_block_type)}"),
        ("Hidden size", str(config.hidden_size)),
        (
            "SSM mixer",
            f"Mamba-2 SSD, {config.num_heads} heads × {config.head_dim} channels, state size "
            f"{config.state_size}, expand {config.expand}, causal conv kernel {config.conv_kernel}",
        ),
        ("Dense MLP", f"SwiGLU, width {config.intermediate_size}"),
        ("Sparse MoE", experts if moe else "none"),
        ("Vocabulary", f"{config.vocab_size} (byte-level BPE)"),
        ("Tied embeddings", "yes" if config.tie_word_embeddings else "no"),
        ("Weights", weights),
    ]
    table = "\n".join(f"| {key} | {value} |" for key, value in rows)
    return (
        "## Architecture\n\n"
        "Itera-Lite replaces attention with a selective state-space mixer (Mamba-2's SSD form): each layer keeps a "
        "fixed-size recurrent state, so generation costs the same per token however long the text is, and the "
        "cache does not grow. Every MoE layer routes each token to a few small experts, so only part of the "
        "parameters run per token.\n\n"
        f"| | |\n|---|---|\n{table}\n"
    )


def evaluation(metrics: dict) -> str:
    if "perplexity" not in metrics:
        return "## Evaluation\n\nNo evaluation was recorded for this checkpoint (no perplexity in metrics.json).\n"
    loss = f"{metrics['eval_loss']:.4f}" if "eval_loss" in metrics else "n/a"
    return (
        "## Evaluation\n\n"
        "| Dataset | Split | Perplexity | Eval loss (nats/token) |\n|---|---|---|---|\n"
        f"| [{DATASET_NAME}](https://huggingface.co/datasets/{DATASET_ID}) | validation "
        f"| {metrics['perplexity']:.4f} | {loss} |\n\n"
        "Perplexity is per token of this model's own tokenizer, so it compares only with models that share it.\n"
        + per_story_evaluation(metrics)
    )


def per_story_evaluation(metrics: dict) -> str:
    """The per-story figures that `training.evaluate` adds to metrics.json, where they are there."""
    if "per_story" not in metrics:
        return ""
    story = metrics["per_story"]
    lines = [
        f"\nEach of the {story['stories']} validation stories scored alone (`<s> story </s>`): "
        f"**{story['bits_per_byte']:.4f} bits per byte** (tokenizer-independent), per-token perplexity "
        f"{story['perplexity']:.2f}, word perplexity {story['word_perplexity']:.2f}."
    ]
    if "names" in metrics:
        lines.append(
            f" Name consistency (the share of character-name mentions that repeat a name already used in the same "
            f"sample, over 50 seeded samples of up to 150 tokens): {metrics['names']['name_consistency']:.3f}."
        )
    return "".join(lines) + "\n"


def usage(repo_id: str, skip_4bit: list[str], code_files: list[str]) -> str:
    code = ", ".join(f"`{name}`" for name in code_files)
    kept_names = ", ".join(f"`{name}`" for name in skip_4bit)
    return f"""## Usage

The model's code ships in this repository ({code}), so loading needs
`trust_remote_code=True`; read those files first if you do not trust the source. Requires `transformers>=5.24` and
`torch`.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{repo_id}", trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained("{repo_id}", trust_remote_code=True)
inputs = tokenizer("Once upon a time", return_tensors="pt")
output = model.generate(**inputs, max_new_tokens=100)
print(tokenizer.decode(output[0], skip_special_tokens=True))
```

With a pipeline (sampling settings come from `generation_config.json`):

```python
from transformers import pipeline

generator = pipeline("text-generation", model="{repo_id}", trust_remote_code=True)
print(generator("Once upon a time", max_new_tokens=100)[0]["generated_text"])
```

In bfloat16 (half the memory; on CPUs prefer bfloat16 to float16, which is far slower there):

```python
import torch

model = AutoModelForCausalLM.from_pretrained("{repo_id}", trust_remote_code=True, dtype=torch.bfloat16)
```

In 4 bits with `bitsandbytes` (on GPU, and on CPU with bitsandbytes >= 0.49). The model itself keeps
{kept_names} in full precision (the LM head is tied to the embedding, the router picks discrete routes, and
odd shapes do not fit the 4-bit kernels), so the config is all you pass:

```python
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
model = AutoModelForCausalLM.from_pretrained("{repo_id}", trust_remote_code=True, quantization_config=quantization)
```
"""


def training(metrics: dict) -> str:
    tokens = f" The model saw {metrics['train_tokens']:,} training tokens." if "train_tokens" in metrics else ""
    return (
        "## Training data\n\n"
        f"Trained on [TinyStories](https://huggingface.co/datasets/{DATASET_ID}) "
        "(Eldan & Li, 2023, [arXiv:2305.07759](https://arxiv.org/abs/2305.07759)): short English stories for "
        f"young children, written by GPT-3.5 and GPT-4 with a vocabulary a 3-4 year old understands.{tokens} The "
        f"dataset is licensed under **{DATASET_LICENSE}**. The tokenizer was trained on the same text.\n"
    )


LIMITATIONS = """## Limitations

- It writes simple English children's stories and little else: it has not seen facts, instructions, dialogue
  formats, code or other languages, and will not follow prompts like a chat model.
- It is small: long generations drift, repeat or contradict themselves. Do not rely on its output for anything.
- The training stories were generated by GPT-3.5/GPT-4 and carry their biases; the model was not aligned or
  filtered for safety.
- It is a stateful (recurrent) model: assisted generation and prompt-lookup decoding are not supported, and
  contrastive search needs a Hub `custom_generate` repository.
- Custom code: loading runs the `.py` files of this repository (`trust_remote_code=True`).
"""


def build_model_card(model_folder: str | Path, repo_id: str, *, license: str = DEFAULT_LICENSE) -> ModelCard:
    """The README.md of the Hub repository `repo_id` for the model saved in `model_folder`.

    Args:
        model_folder: a folder written by `training.pretrain` (model, tokenizer, generation config, metrics.json;
            metrics are optional).
        repo_id: "namespace/name"; the usage snippets load this id.
        license: license of the weights and code (a Hub license id).

    Returns:
        The card; `card.save(path)` writes it, `card.data` holds the metadata.
    """
    folder = Path(model_folder)
    files_to_ship(folder)  # a card for a folder that cannot be shipped would describe nothing
    code_files = remote_code_files(folder, read_config(folder))
    config = IteraLiteConfig.from_pretrained(folder)
    metrics_path = folder / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    total, active, skip_4bit = count_parameters(config)
    data = card_data(repo_id, metrics, license)
    body = "\n".join(
        [
            f"# {repo_id.split('/')[-1]}\n\nA small causal language model for short English stories: a Mamba-2-style "
            "state-space mixer with a sparse mixture-of-experts feed-forward "
            f"({short(total)} parameters, {short(active)} active per token).\n",
            architecture(config, total, active, weights_summary(folder)),
            evaluation(metrics),
            usage(repo_id, skip_4bit, code_files),
            training(metrics),
            LIMITATIONS,
            f"## License\n\nWeights: {license}. Code: Apache-2.0. Training data: {DATASET_LICENSE} ({DATASET_NAME}).\n",
        ]
    )
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")
