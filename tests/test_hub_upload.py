"""hub_upload against a local stand-in for the Hub (tests/local_hub.py): card, dry run, push, reload as remote code,
idempotent re-push, retries and error messages. No network: every request goes to 127.0.0.1."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoTokenizer, GenerationConfig, pipeline

from hub_upload import HubUploadError, build_model_card, count_parameters, push_model, refresh_code
from hub_upload.__main__ import main
from modeling_itera import IteraLiteConfig, IteraLiteForCausalLM
from tests.conftest import TINY, smoke_args, write_stories
from tests.local_hub import TOKEN, LocalHub, free_port
from training.tokenizer import train_tokenizer

REPO = "local/itera-tiny"
PERPLEXITY = 123.456
# Plus the remote-code .py files, whichever modeling_itera has (configuration_itera.py, modeling_itera.py, ssm.py, ...).
FILES = {
    "README.md",
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
}
PROMPT, NEW_TOKENS = "once upon a", 8

# Runs where modeling_itera cannot be imported, so the model can only come from the repository's remote code.
LOAD_BACK = textwrap.dedent("""
    import sys; sys.modules["modeling_itera"] = None
    import json
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline
    repo, prompt, new = sys.argv[1], sys.argv[2], int(sys.argv[3])
    model = AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(repo, trust_remote_code=True)
    out = model.generate(**tokenizer(prompt, return_tensors="pt"), do_sample=False, max_new_tokens=new)
    generator = pipeline("text-generation", model=repo, trust_remote_code=True)
    text = generator(prompt, do_sample=False, max_new_tokens=new)[0]["generated_text"]
    print(json.dumps({"module": type(model).__module__, "tokens": out[0].tolist(), "text": text}))
""")


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """A tiny model as training.pretrain leaves it: model, tokenizer, generation config, metrics.json."""
    rng = random.Random(0)
    words = "once upon a time there was little cat dog who liked to play in the park sun happy friend tree".split()
    tokenizer = train_tokenizer([" ".join(rng.choices(words, k=12)) + "." for _ in range(300)], vocab_size=300)
    torch.manual_seed(0)
    model = IteraLiteForCausalLM(IteraLiteConfig(**{**TINY, "vocab_size": len(tokenizer)}))
    model.generation_config = GenerationConfig(
        do_sample=False, max_new_tokens=NEW_TOKENS, bos_token_id=1, eos_token_id=2, pad_token_id=0
    )
    folder = tmp_path_factory.mktemp("run") / "itera-tiny"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "metrics.json").write_text(
        json.dumps({"perplexity": PERPLEXITY, "eval_loss": 4.8159, "train_tokens": 12345, "log_history": []})
    )
    return folder


@pytest.fixture(scope="module")
def shipped(model_folder) -> set[str]:
    """The files the repository must hold: FILES and the remote code save_pretrained wrote."""
    code = {p.name for p in model_folder.glob("*.py")}
    assert {"configuration_itera.py", "modeling_itera.py"} <= code
    return FILES | code


@pytest.fixture(autouse=True)
def hf_env(tmp_path, monkeypatch):
    """The token the local Hub accepts, a private HF_HOME, and a temp dir we can check for leftovers."""
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    return scratch


@pytest.fixture
def hub():
    with LocalHub() as hub:
        yield hub


def front_matter(readme: str) -> dict:
    assert readme.startswith("---\n")
    return yaml.safe_load(readme.split("---\n")[1])


def test_card_metadata_parameters_and_sections(model_folder, tmp_path):
    card = build_model_card(model_folder, REPO)
    meta = front_matter(str(card))
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert meta["license"] == "cdla-sharing-1.0" and meta["datasets"] == ["roneneldan/TinyStories"]
    result = meta["model-index"][0]["results"][0]
    assert result["dataset"]["type"] == "roneneldan/TinyStories"
    assert result["metrics"][0] == {"type": "perplexity", "value": PERPLEXITY, "name": "Perplexity"}

    model = IteraLiteForCausalLM.from_pretrained(model_folder)
    total = sum(p.numel() for p in model.parameters())
    moe = [layer.feed_forward for layer in model.model.layers if hasattr(layer.feed_forward, "experts")]
    idle = sum(sum(p.numel() for e in ff.experts[ff.top_k :] for p in e.parameters()) for ff in moe)
    assert count_parameters(model.config)[:2] == (total, total - idle) and idle > 0
    text = card.text
    assert f"{total:,}" in text and f"{total - idle:,}" in text
    snippets = ("trust_remote_code=True", 'pipeline("text-generation"', "dtype=torch.bfloat16", "load_in_4bit=True")
    snippets += (f'from_pretrained("{REPO}"', "CDLA-Sharing-1.0", "## Limitations", "## Architecture")
    for snippet in snippets:
        assert snippet in text, snippet

    bare = tmp_path / "no-metrics"
    shutil.copytree(model_folder, bare)
    (bare / "metrics.json").unlink()
    card = build_model_card(bare, REPO)
    assert "model-index" not in front_matter(str(card)) and "No evaluation was recorded" in card.text

    scored = tmp_path / "per-story"
    shutil.copytree(model_folder, scored)
    metrics = json.loads((model_folder / "metrics.json").read_text())
    metrics["per_story"] = {"stories": 794, "bits_per_byte": 0.91234, "perplexity": 14.5, "word_perplexity": 27.1}
    metrics["names"] = {"name_consistency": 0.612}
    (scored / "metrics.json").write_text(json.dumps(metrics))
    text = build_model_card(scored, REPO).text
    assert "794 validation stories" in text and "0.9123 bits per byte" in text and "consistency" in text


def test_dry_run_writes_the_folder_and_contacts_nothing(model_folder, shipped, hub, tmp_path):
    out = tmp_path / "repo"
    result = push_model(model_folder, REPO, dry_run=True, output_dir=out, endpoint=hub.url)
    assert result.folder == out and set(result.files) == shipped
    assert {p.name for p in out.iterdir()} == shipped
    auto_map = json.loads((out / "config.json").read_text())["auto_map"]
    assert set(auto_map) == {"AutoConfig", "AutoModel", "AutoModelForCausalLM"}
    assert (out / "model.safetensors").read_bytes() == (model_folder / "model.safetensors").read_bytes()

    cli_out = tmp_path / "cli-repo"
    assert main([str(model_folder), REPO, "--dry-run", "--output-dir", str(cli_out)]) == 0
    assert (cli_out / "README.md").read_text() == (out / "README.md").read_text()
    assert main([str(model_folder), REPO, "--dry-run", "--output-dir", str(cli_out)]) == 1  # never overwrites
    assert hub.requests == [] and {p.name for p in tmp_path.iterdir()} >= {"repo", "cli-repo"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_push_then_load_back_as_remote_code(model_folder, shipped, hub, tmp_path):
    result = push_model(model_folder, REPO, endpoint=hub.url)
    assert result.changed and set(hub.files(REPO)) == shipped | {".gitattributes"}
    metric = front_matter(hub.files(REPO)["README.md"].decode())["model-index"][0]["results"][0]["metrics"][0]
    assert metric["value"] == PERPLEXITY

    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "fresh_home")}
    proc = subprocess.run(
        [sys.executable, "-c", LOAD_BACK, REPO, PROMPT, str(NEW_TOKENS)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    remote = json.loads(proc.stdout.strip().splitlines()[-1])
    assert remote["module"].startswith("transformers_modules.")  # the repository's code, not the local package

    model = IteraLiteForCausalLM.from_pretrained(model_folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_folder)
    local = model.generate(**tokenizer(PROMPT, return_tensors="pt"), do_sample=False, max_new_tokens=NEW_TOKENS)
    assert remote["tokens"] == local[0].tolist()
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    assert remote["text"] == generator(PROMPT, do_sample=False, max_new_tokens=NEW_TOKENS)[0]["generated_text"]


def test_pushing_an_unchanged_model_again_makes_no_commit(model_folder, shipped, hub, tmp_path):
    first = push_model(model_folder, REPO, endpoint=hub.url)
    commits = len(hub.commits)
    again = push_model(model_folder, REPO, endpoint=hub.url)
    assert not again.changed and again.commit_oid == first.commit_oid and len(hub.commits) == commits

    changed = tmp_path / "changed"
    shutil.copytree(model_folder, changed)
    (changed / "metrics.json").write_text(json.dumps({"perplexity": 99.0}))  # only the card differs
    third = push_model(changed, REPO, endpoint=hub.url)
    assert third.changed and len(hub.commits) == commits + 1
    assert hub.commits[-1][3] == sorted(shipped | {".gitattributes"})


def test_branch_and_pull_request(model_folder, shipped, hub):
    push_model(model_folder, REPO, endpoint=hub.url, revision="dev", commit_message="to dev", private=True)
    assert hub.repos[REPO].private and hub.commits[-1][1:3] == ("dev", "to dev")
    assert set(hub.files(REPO, "dev")) >= shipped and set(hub.files(REPO, "main")) == {".gitattributes"}
    result = push_model(model_folder, REPO, endpoint=hub.url, create_pr=True)
    assert result.pr_url and result.pr_url.endswith("/discussions/1")
    assert set(hub.files(REPO, "refs/pr/1")) >= shipped and set(hub.files(REPO, "main")) == {".gitattributes"}


def test_transient_failures_are_retried(model_folder, shipped, hub):
    hub.fail("POST", r"/preupload/", 503, times=1)  # retried by huggingface_hub's own http_backoff
    hub.fail("POST", r"/commit/", 500, times=1)  # the commit POST is not; hub_upload's bounded retry is
    result = push_model(model_folder, REPO, endpoint=hub.url, retry_wait=0.01)
    assert result.changed and set(hub.files(REPO)) >= shipped
    assert sum(path.endswith("/commit/main") for _, path in hub.requests) == 2


@pytest.mark.parametrize(
    "failure, cause",
    [
        pytest.param("bad-token", "authentication failed (HTTP 401)", id="401-bad-token"),
        pytest.param("forbidden", "permission denied (HTTP 403)", id="403-no-write-access"),
        pytest.param("server-error", "server failed (HTTP 500) after 3 attempts", id="500-after-retries"),
        pytest.param("down", "network error: could not reach the Hub", id="server-down"),
    ],
)
def test_failed_push_names_the_cause_and_leaves_nothing_behind(model_folder, hub, hf_env, monkeypatch, failure, cause):
    endpoint = hub.url
    if failure == "bad-token":
        monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    elif failure == "forbidden":
        hub.fail("POST", r"^/api/repos/create$", 403)
    elif failure == "server-error":
        hub.fail("POST", r"/commit/", 500)
    else:
        endpoint = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(HubUploadError, match=cause.replace("(", r"\(").replace(")", r"\)")):
        push_model(model_folder, REPO, endpoint=endpoint, retry_wait=0.01)
    assert list(hf_env.iterdir()) == []  # the temporary repository folder is gone
    assert [c for c in hub.commits if c[2] != "initial commit"] == []
    if failure == "server-error":
        assert sum(path.endswith("/commit/main") for _, path in hub.requests) == 3


def test_incomplete_model_folder_fails_before_any_request(model_folder, hub, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(model_folder, broken)
    (broken / "ssm.py").unlink()
    with pytest.raises(FileNotFoundError, match="ssm.py"):
        push_model(broken, REPO, endpoint=hub.url)
    assert hub.requests == []


def test_refresh_code_brings_back_what_save_pretrained_writes_and_leaves_the_weights(model_folder, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(model_folder, folder)
    assert refresh_code.stale(folder) == []  # the files it expects are the ones save_pretrained wrote
    weights, config = (folder / "model.safetensors").read_bytes(), json.loads((folder / "config.json").read_text())
    (folder / "moe.py").write_text("# an old copy\n")
    (folder / "ssm.py").unlink()
    (folder / "gone.py").write_text("# a module the package no longer has\n")
    broken = {**config, "auto_map": {"AutoConfig": config["auto_map"]["AutoConfig"]}}
    (folder / "config.json").write_text(json.dumps(broken))
    assert len(refresh_code.stale(folder)) == 4
    assert refresh_code.main([str(folder), "--check"]) == 1
    assert refresh_code.main([str(folder)]) == 0
    assert refresh_code.stale(folder) == [] and not (folder / "gone.py").exists()
    assert (folder / "model.safetensors").read_bytes() == weights
    assert json.loads((folder / "config.json").read_text()) == config
    assert refresh_code.main([str(folder), "--check"]) == 0


def test_pretraining_pushes_the_final_model_with_its_card(hub, tmp_path):
    """`training.pretrain --push_to_hub true`: Trainer's own Hub support during the run, the complete repository
    (weights, remote code, tokenizer, card with the measured perplexity) at the end."""
    write_stories(tmp_path / "train.txt")
    write_stories(tmp_path / "valid.txt", n=20, seed=1)
    push = ["--push_to_hub", "true", "--hub_model_id", "local/trained-tiny"]
    args = smoke_args((tmp_path / "train.txt", tmp_path / "valid.txt"), tmp_path / "run", *push)
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN, "HF_HOME": str(tmp_path / "home")}
    proc = subprocess.run(
        [sys.executable, "-m", "training.pretrain", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = hub.files("local/trained-tiny")
    assert {"model.safetensors", "modeling_itera.py", "tokenizer.json", "generation_config.json"} <= set(files)
    perplexity = json.loads((tmp_path / "run" / "metrics.json").read_text())["perplexity"]
    metric = front_matter(files["README.md"].decode())["model-index"][0]["results"][0]["metrics"][0]
    assert metric["value"] == pytest.approx(perplexity, rel=1e-3)


def test_gguf_and_granite_exports_push_as_their_own_repositories(model_folder, hub, tmp_path):
    """`--format gguf` / `--format granite`: each export is its own repository with a card saying how to run it;
    the Granite folder then loads from the Hub in stock transformers, without modeling_itera."""
    gguf = pytest.importorskip("gguf")
    from modeling_itera.export_gguf import write_gguf
    from modeling_itera.export_granite import write_granite_folder

    model = IteraLiteForCausalLM.from_pretrained(model_folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_folder)
    gguf_path = write_gguf(model, tmp_path / "itera-tiny-q8_0.gguf", tokenizer, outtype="q8_0")
    granite = write_granite_folder(model, tmp_path / "granite", tokenizer=tokenizer)

    from hub_upload.engines import push_engine_format

    assert main([str(tmp_path / "missing.gguf"), "local/itera-gguf", "--format", "gguf"]) == 1  # before any request
    assert main([str(model_folder), "local/itera-granite", "--format", "granite"]) == 1  # not a Granite folder
    assert hub.requests == []
    first = push_engine_format(gguf_path, "local/itera-gguf", "gguf", endpoint=hub.url)
    again = push_engine_format(gguf_path, "local/itera-gguf", "gguf", endpoint=hub.url)
    pushed = push_engine_format(granite, "local/itera-granite", "granite", endpoint=hub.url)
    assert first.changed and not again.changed
    files = hub.files("local/itera-gguf")
    assert set(files) == {"itera-tiny-q8_0.gguf", "README.md", ".gitattributes"}
    assert files["itera-tiny-q8_0.gguf"] == gguf_path.read_bytes()
    reader = gguf.GGUFReader(gguf_path)
    assert bytes(reader.fields["general.architecture"].parts[-1]).decode() == "granitehybrid"
    card = files["README.md"].decode()
    assert front_matter(card)["library_name"] == "gguf"
    for snippet in ("llama-cli -m itera-tiny-q8_0.gguf", "FROM ./itera-tiny-q8_0.gguf", "ollama run", "--no-repack"):
        assert snippet in card, snippet

    assert pushed.changed
    files = hub.files("local/itera-granite")
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= set(files)
    assert not any(name.endswith(".py") for name in files)  # no remote code: stock transformers
    card = files["README.md"].decode()
    assert "vllm serve local/itera-granite" in card and "trust_remote_code" not in card

    load = textwrap.dedent("""
        import sys; sys.modules["modeling_itera"] = None
        import json, torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
        with torch.no_grad():
            logits = model(torch.tensor([[1, 5, 9, 12, 7]])).logits
        print(json.dumps({"module": type(model).__module__, "logits": logits[0, -1].tolist()}))
    """)
    proc = subprocess.run(
        [sys.executable, "-c", load, "local/itera-granite"],
        env={**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "fresh_home")},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    remote = json.loads(proc.stdout.strip().splitlines()[-1])
    assert remote["module"].startswith("transformers.models.granitemoehybrid")
    with torch.no_grad():
        ours = model(torch.tensor([[1, 5, 9, 12, 7]])).logits[0, -1]
    assert (torch.tensor(remote["logits"]) - ours).abs().max() < 2e-5
