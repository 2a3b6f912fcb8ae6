"""SwiGLU's activation, silu(gate) * up, as one Triton kernel forward and one backward.

In eager mode the reference is a silu kernel, a product kernel, and in backward two products and a
silu-gradient kernel, with the silu output kept for backward. Those passes over the experts'
[tokens x top-k, intermediate] activations are the largest elementwise work of an eager MoE step.
The kernels read gate and up once forward (keeping nothing but gate and up) and once backward.

Roundings follow the reference in the activations' dtype: silu(gate) is rounded before the
product, the gradients reaching silu's output and up are rounded as autograd rounds them, and the
gate gradient is rounded once at the end. Dispatch as in `lit_deepseek.kernels.eager`: CUDA tensors
outside compiled regions take the kernels, everything else the reference. Set TRITON_INTERPRET=1 to
run the kernels on CPU tensors.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lit_deepseek.kernels.eager import HAS_TRITON, as_rows, triton_applies

if HAS_TRITON:
    import triton
    import triton.language as tl

BLOCK_M, BLOCK_N = 4, 512  # 2,048 elements per program


def swiglu_reference(gate: Tensor, up: Tensor) -> Tensor:
    return F.silu(gate) * up


def fused_applies(gate: Tensor, up: Tensor) -> bool:
    """Whether `swiglu` takes the Triton kernels: also needs two same-shape, same-dtype operands."""
    return (gate.shape == up.shape and gate.dtype == up.dtype and gate.dtype.is_floating_point
            and triton_applies("SwiGLU", gate, up))


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up: the Triton kernels where `fused_applies`, else the reference."""
    if fused_applies(gate, up):
        return SwiGLUFunction.apply(gate, up)
    return swiglu_reference(gate, up)


if HAS_TRITON:

    @triton.jit
    def _swiglu_fwd_kernel(g_ptr, u_ptr, h_ptr, M, N, stride_g, stride_u,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = (rows < M)[:, None] & (cols < N)[None, :]
        g = tl.load(g_ptr + rows[:, None] * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + rows[:, None] * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        s = (g * tl.sigmoid(g)).to(h_ptr.dtype.element_ty).to(tl.float32)
        tl.store(h_ptr + rows[:, None] * N + cols[None, :], (s * u).to(h_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_bwd_kernel(g_ptr, u_ptr, dh_ptr, dg_ptr, du_ptr, M, N, stride_g, stride_u,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = (rows < M)[:, None] & (cols < N)[None, :]
        dense = rows[:, None] * N + cols[None, :]
        g = tl.load(g_ptr + rows[:, None] * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + rows[:, None] * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dh = tl.load(dh_ptr + dense, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(g)
        s = (g * sig).to(dg_ptr.dtype.element_ty).to(tl.float32)
        tl.store(du_ptr + dense, (dh * s).to(du_ptr.dtype.element_ty), mask=mask)
        ds = (dh * u).to(dg_ptr.dtype.element_ty).to(tl.float32)  # the gradient reaching silu's output
        tl.store(dg_ptr + dense, (ds * sig * (1.0 + g * (1.0 - sig))).to(dg_ptr.dtype.element_ty), mask=mask)


def _grid(m: int, n: int) -> tuple[int, int]:
    return triton.cdiv(m, BLOCK_M), triton.cdiv(n, BLOCK_N)


class SwiGLUFunction(torch.autograd.Function):
    """The Triton forward and backward of `swiglu_reference` (gate and up of one shape and dtype;
    row-strided inputs are read in place, outputs and gradients are contiguous)."""

    @staticmethod
    def forward(ctx: Any, gate: Tensor, up: Tensor) -> Tensor:
        g2, u2 = as_rows(gate), as_rows(up)
        m, n = g2.shape
        h = torch.empty((m, n), device=gate.device, dtype=gate.dtype)
        if h.numel():
            _swiglu_fwd_kernel[_grid(m, n)](g2, u2, h, m, n, g2.stride(0), u2.stride(0), BLOCK_M=BLOCK_M,
                                            BLOCK_N=BLOCK_N, num_warps=8)
        ctx.save_for_backward(g2, u2)
        ctx.shape = gate.shape
        return h.view(gate.shape)

    @staticmethod
    def backward(ctx: Any, dh: Tensor) -> tuple[Tensor, Tensor]:
        g2, u2 = ctx.saved_tensors
        m, n = g2.shape
        dh2 = dh.to(g2.dtype).reshape(m, n).contiguous()
        dg = torch.empty((m, n), device=g2.device, dtype=g2.dtype)
        du = torch.empty_like(dg)
        if dg.numel():
            _swiglu_bwd_kernel[_grid(m, n)](g2, u2, dh2, dg, du, m, n, g2.stride(0), u2.stride(0), BLOCK_M=BLOCK_M,
                                            BLOCK_N=BLOCK_N, num_warps=8)
        return dg.view(ctx.shape), du.view(ctx.shape)


__all__ = ["SwiGLUFunction", "fused_applies", "swiglu", "swiglu_reference"]
