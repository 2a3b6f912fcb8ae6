"""RMSNorm, computed in float32 whatever the activation dtype.

The arithmetic lives in `lit_deepseek.kernels.rms_norm`: a PyTorch reference, and one Triton kernel
each way for CUDA tensors outside compiled regions.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lit_deepseek.kernels.rms_norm import rms_norm


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned per-channel gain (no bias, no mean subtraction)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight.device.type != "meta":
            with torch.no_grad():
                self.weight.fill_(1.0)

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
