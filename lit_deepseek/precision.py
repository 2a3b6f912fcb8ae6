"""Where mixed precision decides a dtype by hand (ops that autocast has no rule for)."""

from __future__ import annotations

import torch
from torch import Tensor


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype matmuls run in: autocast's when it is on for x's device, else x's own.

    Under `training.precision: bf16-mixed` the weights are float32 masters and autocast runs
    linear layers in bf16; grouped GEMMs and the fused head + cross-entropy follow it through this.
    """
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype
