"""Shared fixtures and helpers: a tiny config, a fixed seed, small story files and the smoke-recipe training flags.
Nothing here needs a GPU, the network or ../shared."""

from __future__ import annotations

import random

import pytest
import torch

from modeling_itera import IteraLiteConfig, IteraLiteForCausalLM
from training import data

TINY = dict(
    vocab_size=99,
    hidden_size=32,
    num_hidden_layers=2,
    state_size=8,
    head_dim=16,
    intermediate_size=64,
    num_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    chunk_size=8,
)

WORDS = "the cat dog sun ran jumped happy little girl boy tree big red blue saw said mom park ball".split()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny_config() -> IteraLiteConfig:
    return IteraLiteConfig(**TINY)


@pytest.fixture
def tiny_model(tiny_config) -> IteraLiteForCausalLM:
    return IteraLiteForCausalLM(tiny_config).eval()


def write_stories(path, n=60, words=30, seed=0):
    """`n` random stories of `words` words, separated like the TinyStories text files; returns the stories."""
    rng = random.Random(seed)
    stories = [" ".join(rng.choice(WORDS) for _ in range(words)) + "." for _ in range(n)]
    path.write_text("".join(f"{s}\n{data.DOC_SEPARATOR}\n" for s in stories), encoding="utf-8")
    return stories


@pytest.fixture
def story_files(tmp_path):
    write_stories(tmp_path / "train.txt", seed=0)
    write_stories(tmp_path / "valid.txt", n=20, seed=1)
    return tmp_path / "train.txt", tmp_path / "valid.txt"


def smoke_args(story_files, out, *extra):
    """`training.pretrain` flags for a five-step run of the smoke recipe on `story_files`, writing into `out`."""
    train, valid = story_files
    files = ["--train_file", str(train), "--valid_file", str(valid), "--output_dir", str(out)]
    return ["--recipe", "smoke", *files, "--data_cache_dir", str(out.parent / "cache"), *extra]
