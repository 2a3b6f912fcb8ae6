"""RMSNorm, computed in float32 whatever the activation dtype.

The arithmetic lives in `lit_deepseek.kernels.rms_norm`: a PyTorch reference, and one Triton kernel
each way for CUDA tensors outside compiled regions.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lit_deepseek.kernels.rms_norm import rms_norm
from lit_deepseek.precision import compute_dtype


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

    def forward(self, x: Tensor, for_matmul: bool = False) -> Tensor:
        """`for_matmul`: the output feeds matmuls only, so it comes in their dtype (bf16 under
        autocast, where the projections would cast it anyway; unchanged without autocast)."""
        return rms_norm(x, self.weight, self.eps, compute_dtype(x) if for_matmul else None)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
