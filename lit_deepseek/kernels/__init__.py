"""Fast paths and their references: FP8 products, eager Triton kernels, decode attention."""

from __future__ import annotations

from typing import Any


def is_dtensor(t: Any) -> bool:
    """Whether t is a `torch.distributed.tensor.DTensor` (tensor-parallel weights and activations),
    which the fast paths hand to their references or treat shard by shard. By type name, so that
    nothing distributed is imported."""
    return type(t).__name__ == "DTensor"
