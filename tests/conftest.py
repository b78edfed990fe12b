"""Shared fixtures: a tiny config and a fixed seed. Nothing here needs a GPU, the network or ../shared."""

from __future__ import annotations

import pytest
import torch

from modeling_itera import IteraLiteConfig, IteraLiteForCausalLM

TINY = dict(
    vocab_size=99, hidden_size=32, num_hidden_layers=2, state_size=8, head_dim=16, intermediate_size=64,
    num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, chunk_size=8,
)  # fmt: skip


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny_config() -> IteraLiteConfig:
    return IteraLiteConfig(**TINY)


@pytest.fixture
def tiny_model(tiny_config) -> IteraLiteForCausalLM:
    return IteraLiteForCausalLM(tiny_config).eval()
