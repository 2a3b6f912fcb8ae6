"""Shared test fixtures."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lit_deepseek.config import MLAConfig, ModelConfig, MoEConfig  # noqa: E402


def tiny_model_config(**overrides: object) -> ModelConfig:
    """A few-layer model small enough for CPU tests; keyword overrides use 'mla.x' / 'moe.x' for nested fields."""
    cfg = ModelConfig(
        vocab_size=97, num_layers=3, first_dense_layers=1, dense_intermediate_size=48, mtp_depth=1,
        mla=MLAConfig(d_model=32, d_latent=16, d_q_latent=24, num_heads=4, qk_nope_head_dim=8,
                      qk_rope_head_dim=4, v_head_dim=6, max_context_length=64),
        moe=MoEConfig(num_experts=8, num_experts_per_token=2, expert_intermediate_size=16,
                      num_expert_groups=4, num_limited_groups=2, route_scale=2.5),
    )
    for key, value in overrides.items():
        target = cfg
        *parents, leaf = key.split(".")
        for part in parents:
            target = getattr(target, part)
        setattr(target, leaf, value)
    return cfg


@pytest.fixture
def tiny_config() -> ModelConfig:
    return tiny_model_config()
