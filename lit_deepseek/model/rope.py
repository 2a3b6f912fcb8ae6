"""Rotary position embedding with YaRN context extension (DeepSeek-V3 report, section 4.3).

The rotary part of each query head and the shared rotary key are rotated on interleaved pairs
(x0, x1), (x2, x3), ... as in DeepSeek's checkpoints. Hugging Face's `rope_interleave` path writes
the rotated pairs de-interleaved; that is a fixed permutation applied to queries and keys alike,
so attention scores are identical.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from lit_deepseek.config import MLAConfig


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN attention temperature correction: 0.1 * mscale * ln(scale) + 1 (1 when not stretched)."""
    if scale <= 1.0:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def uses_yarn(mla: MLAConfig) -> bool:
    return mla.rope_factor > 1.0


def softmax_scale(mla: MLAConfig) -> float:
    """1/sqrt(qk head dim), times mscale(factor, mscale_all_dim)^2 under YaRN."""
    scale = mla.qk_head_dim ** -0.5
    if uses_yarn(mla) and mla.rope_mscale_all_dim:
        m = yarn_mscale(mla.rope_factor, mla.rope_mscale_all_dim)
        scale = scale * m * m
    return scale


def rope_cos_sin_scale(mla: MLAConfig) -> float:
    """Factor applied to cos/sin: mscale(f, mscale) / mscale(f, mscale_all_dim) under YaRN."""
    if not uses_yarn(mla):
        return 1.0
    if mla.rope_mscale and mla.rope_mscale_all_dim:
        return yarn_mscale(mla.rope_factor, mla.rope_mscale) / yarn_mscale(mla.rope_factor, mla.rope_mscale_all_dim)
    return yarn_mscale(mla.rope_factor)


def inverse_frequencies(mla: MLAConfig) -> Tensor:
    """Per-pair rotation frequencies; with YaRN, low frequencies are interpolated by rope_factor,
    high frequencies kept, with a linear ramp between the beta_fast and beta_slow boundaries."""
    dim, base = mla.qk_rope_head_dim, mla.rope_theta
    freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if not uses_yarn(mla):
        return freq
    factor, original = mla.rope_factor, mla.rope_original_context_length

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(mla.rope_beta_fast)), 0)
    high = min(math.ceil(correction_dim(mla.rope_beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1.0 - ramp  # 1 = extrapolate (keep the original frequency)
    return (freq / factor) * (1 - keep) + freq * keep


class RotaryEmbedding(nn.Module):
    """cos/sin tables for positions 0..max_context_length-1 (non-persistent buffers, rebuilt by
    reset_parameters after meta-device construction)."""

    def __init__(self, mla: MLAConfig) -> None:
        super().__init__()
        self.mla = mla
        half = mla.qk_rope_head_dim // 2
        self.register_buffer("cos", torch.empty(mla.max_context_length, half), persistent=False)
        self.register_buffer("sin", torch.empty(mla.max_context_length, half), persistent=False)
        self.reset_parameters()

    def _apply(self, fn: Any, recurse: bool = True) -> RotaryEmbedding:
        """Keep the tables in float32 when the model is cast; they are cast at use."""
        super()._apply(fn, recurse)
        if self.cos.dtype != torch.float32:
            self.cos, self.sin = self.cos.float(), self.sin.float()
        return self

    def reset_parameters(self) -> None:
        if self.cos.device.type == "meta":
            return
        freq = inverse_frequencies(self.mla).to(self.cos.device)
        positions = torch.arange(self.mla.max_context_length, device=self.cos.device, dtype=torch.float32)
        angles = positions[:, None] * freq[None, :]
        scale = rope_cos_sin_scale(self.mla)
        with torch.no_grad():
            self.cos.copy_(angles.cos() * scale)
            self.sin.copy_(angles.sin() * scale)

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos, sin [..., rope_dim/2] for integer positions."""
        return self.cos[positions], self.sin[positions]


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate interleaved pairs of x [B, S, H, R] by cos/sin [B or 1, S, R/2]."""
    cos = cos[:, :, None, :].to(x.dtype)
    sin = sin[:, :, None, :].to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
