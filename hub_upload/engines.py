"""Push the engine formats of an Itera-Lite model as repositories of their own: a GGUF file (llama.cpp, ollama) or a
GraniteMoeHybrid folder (transformers without remote code, vLLM), each with a model card that says how to run it.

    python -m hub_upload itera-q8_0.gguf user/itera-lite-gguf --format gguf
    python -m hub_upload itera-granite/ user/itera-lite-granite --format granite

Both are written by `python -m modeling_itera.export --format gguf|granite`. The push itself is `push.py`'s: one
commit, the same bounded retries, no commit when nothing changed.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from huggingface_hub import HfApi, ModelCard, ModelCardData

from .card import DATASET_ID, DEFAULT_LICENSE
from .folder import TOKENIZER_FILES
from .push import PushResult, commit_folder, head, with_retries

GRANITE_FILES = ("config.json", "model.safetensors", "generation_config.json")
TAGS = ["itera-lite", "state-space-model", "mamba2", "mixture-of-experts", "tinystories"]


def gguf_files(path: Path) -> list[str]:
    if not path.is_file() or path.suffix != ".gguf":
        raise FileNotFoundError(f"{path} is not a .gguf file (write one with python -m modeling_itera.export)")
    return [path.name]


def granite_files(folder: Path) -> list[str]:
    config = folder / "config.json"
    if not config.is_file() or json.loads(config.read_text()).get("model_type") != "granitemoehybrid":
        raise ValueError(f"{folder} is not a GraniteMoeHybrid folder (modeling_itera.export --format granite)")
    missing = [name for name in GRANITE_FILES[:2] if not (folder / name).is_file()]
    if missing or not (folder / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{folder} lacks {', '.join(missing or ['tokenizer.json'])}")
    return [name for name in (*GRANITE_FILES, *TOKENIZER_FILES) if (folder / name).is_file()]


def gguf_card(repo_id: str, filename: str, license: str) -> ModelCard:
    name = repo_id.split("/")[-1]
    data = ModelCardData(
        model_name=name, language="en", license=license, library_name="gguf", pipeline_tag="text-generation",
        datasets=[DATASET_ID], tags=[*TAGS, "gguf", "llama.cpp", "granitehybrid"],
    )  # fmt: skip
    body = f"""# {name}

Itera-Lite (a Mamba-2-style state-space model with a sparse mixture-of-experts feed-forward, trained on TinyStories)
as one GGUF file for llama.cpp's `granitehybrid` architecture, tokenizer included. It is written exactly as a
GraniteMoeHybrid model: every layer a Mamba-2 layer, plus one identity attention layer (zero projections) that
llama.cpp's hybrid memory needs; dense layers carry zero routed experts, MoE layers a zero shared expert.

## llama.cpp

```bash
llama-cli -m {filename} -p "Once upon a time" -n 200
llama-server -m {filename} --port 8080
```

On Intel CPUs with AMX, quantized files may crash in llama.cpp's weight-repack path: add `--no-repack`
(`use_extra_bufts=False` in llama-cpp-python).

## ollama

`Modelfile`:

```
FROM ./{filename}
PARAMETER temperature 0.8
PARAMETER top_p 0.95
PARAMETER repeat_penalty 1.1
PARAMETER stop "</s>"
```

```bash
ollama create itera-lite -f Modelfile
ollama run itera-lite "Once upon a time"
```

## vLLM

vLLM does not serve GGUF hybrids; use the GraniteMoeHybrid folder export (`--format granite`) with `vllm serve`.

## Limitations

It writes simple English children's stories and little else; it is small and not aligned for safety.
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def granite_card(repo_id: str, license: str) -> ModelCard:
    name = repo_id.split("/")[-1]
    data = ModelCardData(
        model_name=name, language="en", license=license, library_name="transformers", pipeline_tag="text-generation",
        datasets=[DATASET_ID], tags=[*TAGS, "granitemoehybrid"],
    )  # fmt: skip
    body = f"""# {name}

Itera-Lite (a Mamba-2-style state-space model with a sparse mixture-of-experts feed-forward, trained on TinyStories)
written exactly as transformers' **GraniteMoeHybrid**: stock transformers (>= 5.25) and vLLM load it with no custom
code. Every layer is a Mamba-2 layer, plus one identity attention layer (zero projections, no RoPE) without which
an all-Mamba GraniteMoeHybrid fails with a cache in transformers 5.25; dense layers carry zero routed experts and a
zero router, MoE layers a zero shared expert. Logits equal Itera-Lite's within float rounding (fp32).

## transformers

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{repo_id}")
model = AutoModelForCausalLM.from_pretrained("{repo_id}")
out = model.generate(**tokenizer("Once upon a time", return_tensors="pt"), max_new_tokens=100)
print(tokenizer.decode(out[0], skip_special_tokens=True))
```

## vLLM

```bash
vllm serve {repo_id} --max-model-len 4096
```

Not tested by the exporter's authors (no GPU there); vLLM has `GraniteMoeHybridForCausalLM` and reads these
weight names.

## llama.cpp and ollama

Use the GGUF export (`python -m modeling_itera.export --format gguf`), or convert this folder with llama.cpp's
`convert_hf_to_gguf.py`.

## Limitations

It writes simple English children's stories and little else; it is small and not aligned for safety.
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def push_engine_format(
    source: str | Path,
    repo_id: str,
    fmt: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    license: str = DEFAULT_LICENSE,
    token: str | None = None,
    endpoint: str | None = None,
    attempts: int = 3,
    retry_wait: float = 2.0,
) -> PushResult:
    """Pushes a GGUF file (`fmt="gguf"`) or a GraniteMoeHybrid folder (`fmt="granite"`) with its card to `repo_id`.

    Raises:
        FileNotFoundError / ValueError: not such a file or folder (before any request); HubUploadError: the push.
    """
    source = Path(source).resolve()
    if fmt == "gguf":
        names, folder, card = gguf_files(source), source.parent, gguf_card(repo_id, source.name, license)
    elif fmt == "granite":
        names, folder, card = granite_files(source), source, granite_card(repo_id, license)
    else:
        raise ValueError(f"format must be 'gguf' or 'granite', got {fmt!r}")
    api = HfApi(endpoint=endpoint, token=token)
    retry = dict(attempts=attempts, wait=retry_wait, endpoint=api.endpoint, repo_id=repo_id)
    branch = revision or "main"
    with tempfile.TemporaryDirectory(prefix="hub_upload-") as tmp:
        for name in names:
            shutil.copyfile(folder / name, Path(tmp) / name)
        card.save(Path(tmp) / "README.md")
        names = sorted([*names, "README.md"])
        with_retries(lambda: api.create_repo(repo_id, private=private or None, exist_ok=True), **retry)
        if branch != "main":
            with_retries(lambda: api.create_branch(repo_id, branch=branch, exist_ok=True), **retry)
        before = with_retries(lambda: head(api, repo_id, branch), **retry)
        message = commit_message or f"Upload {source.name} ({fmt}) with hub_upload"
        info = with_retries(
            lambda: commit_folder(
                api, Path(tmp), names, repo_id, commit_message=message, revision=branch, create_pr=False
            ),
            **retry,
        )
    return PushResult(
        repo_id=repo_id, files=names, commit_oid=info.oid, commit_url=info.commit_url, changed=info.oid != before
    )
