"""RMSNorm as one Triton kernel forward and one backward, for steps that are not compiled.

The reference (`rms_norm_reference`) is a chain of PyTorch ops: float32 upcast, square, mean,
rsqrt, scale, downcast, gain. Each is a kernel of its own in eager mode, and autograd keeps their
float32 intermediates for the backward: about 2 ms and several copies of the activations per
norm of a [32768, 1024] activation on an H100, ~60 norms per step of the small config.
`torch.compile` fuses the chain by itself, so compiled regions keep the reference.

The kernels reproduce the reference's roundings: the normalised activation is rounded to the input
dtype before the gain multiplies it, the gradient reaching it is rounded to the input dtype as
autograd does, and the output dtype is the promotion of the gain's and the input's dtypes (float32
under bf16-mixed, whose gains are float32) unless the caller names one: a norm whose output only
feeds matmuls asks for the matmul dtype (`lit_deepseek.precision.compute_dtype`), so under
autocast it writes bf16 once instead of float32 that each projection then casts (the same
round-to-nearest values; the bf16 gradient it receives is what the cast's backward would widen).
The sums run in another order, so results agree to
float32 rounding, not bit for bit (tests/test_eager_kernels.py).

`rms_norm` picks the path as `lit_deepseek.kernels.eager` says: the kernels for CUDA tensors
outside compiled regions when Triton is installed (LIT_DEEPSEEK_EAGER_KERNELS=torch keeps the
reference), the reference elsewhere. Set TRITON_INTERPRET=1 to run the kernels on CPU tensors.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

from lit_deepseek.kernels.eager import HAS_TRITON, as_rows, triton_applies

if HAS_TRITON:
    import triton
    import triton.language as tl


def rms_norm_reference(x: Tensor, weight: Tensor, eps: float, out_dtype: torch.dtype | None = None) -> Tensor:
    """weight * (x / rms(x)), the normalisation in float32, rounded to x's dtype before the gain;
    the product rounded to `out_dtype` when given."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    y = weight * x32.to(x.dtype)
    return y if out_dtype is None else y.to(out_dtype)


def fused_applies(x: Tensor, weight: Tensor) -> bool:
    """Whether `rms_norm` takes the Triton kernels (`lit_deepseek.kernels.eager.triton_applies`)."""
    return triton_applies("RMSNorm", x, weight)


def rms_norm(x: Tensor, weight: Tensor, eps: float, out_dtype: torch.dtype | None = None) -> Tensor:
    """RMSNorm over the last dim: the Triton kernels where `fused_applies`, else the reference.
    The output dtype is `out_dtype`, or the promotion of x's and the gain's when None."""
    if fused_applies(x, weight):
        return RMSNormFunction.apply(x, weight, eps, out_dtype)
    return rms_norm_reference(x, weight, eps, out_dtype)


if HAS_TRITON:

    @triton.jit
    def _rms_norm_fwd_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, M, N, stride_x, stride_y, eps,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_N)
        rmask = rows < M
        mask = rmask[:, None] & (cols < N)[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.math.rsqrt(tl.sum(x * x, axis=1) / N + eps)
        xh = (x * rstd[:, None]).to(x_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
        y = xh * w[None, :]
        tl.store(y_ptr + rows[:, None] * stride_y + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(rstd_ptr + rows, rstd, mask=rmask)

    @triton.jit
    def _rms_norm_bwd_kernel(x_ptr, w_ptr, dy_ptr, rstd_ptr, dx_ptr, dw_ptr, M, N, stride_x, stride_dy,
                             stride_dx, rows_per_program, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_N)
        cmask = cols < N
        w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        start = pid * rows_per_program
        for offset in range(0, rows_per_program, BLOCK_M):
            rows = start + offset + tl.arange(0, BLOCK_M)
            rmask = (rows < M) & (offset + tl.arange(0, BLOCK_M) < rows_per_program)
            mask = rmask[:, None] & cmask[None, :]
            x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + rows, mask=rmask, other=0.0)
            xh = (x * rstd[:, None]).to(x_ptr.dtype.element_ty).to(tl.float32)
            dw += dy * xh
            # the gradient reaching the normalised activation, in its dtype (as autograd rounds it)
            gxh = (dy * w[None, :]).to(x_ptr.dtype.element_ty).to(tl.float32)
            dot = tl.sum(gxh * x, axis=1)
            dx = gxh * rstd[:, None] - x * (rstd * rstd * rstd * dot / N)[:, None]
            tl.store(dx_ptr + rows[:, None] * stride_dx + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
        tl.store(dw_ptr + pid * N + cols, tl.sum(dw, axis=0), mask=cmask)


def _tiles(n: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps): ~4,096 elements per tile."""
    block_n = triton.next_power_of_2(n)
    block_m = max(1, min(16, 4096 // block_n))
    return block_m, block_n, 4 if block_m * block_n <= 4096 else 8


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2


class RMSNormFunction(torch.autograd.Function):
    """The Triton forward and backward of `rms_norm_reference` (x any float dtype, weight [N])."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, eps: float, out_dtype: torch.dtype | None = None) -> Tensor:
        n = x.shape[-1]
        if weight.shape != (n,):
            raise ValueError(f"RMSNorm: weight of shape {tuple(weight.shape)} for inputs with {n} channels")
        x2 = as_rows(x)
        m = x2.shape[0]
        y = torch.empty((m, n), device=x.device, dtype=out_dtype or torch.promote_types(weight.dtype, x.dtype))
        rstd = torch.empty(m, device=x.device, dtype=torch.float32)
        block_m, block_n, warps = _tiles(n)
        if m:
            _rms_norm_fwd_kernel[(triton.cdiv(m, block_m),)](x2, weight, y, rstd, m, n, x2.stride(0), y.stride(0),
                                                             eps, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.shape = x.shape
        return y.view(*x.shape[:-1], n)

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor, Tensor, None, None]:
        x2, weight, rstd = ctx.saved_tensors
        m, n = x2.shape
        dy2 = as_rows(dy)
        dx = torch.empty((m, n), device=x2.device, dtype=x2.dtype)
        block_m, block_n, warps = _tiles(n)
        programs = _multiprocessors(x2.device) * 8
        rows_per_program = max(block_m, triton.cdiv(max(m, 1), programs))
        programs = triton.cdiv(max(m, 1), rows_per_program)
        dw_parts = torch.empty((programs, n), device=x2.device, dtype=torch.float32)
        _rms_norm_bwd_kernel[(programs,)](x2, weight, dy2, rstd, dx, dw_parts, m, n, x2.stride(0), dy2.stride(0),
                                          dx.stride(0), rows_per_program, BLOCK_M=block_m, BLOCK_N=block_n,
                                          num_warps=warps)
        dw = dw_parts.sum(0).to(weight.dtype)
        return dx.view(ctx.shape), dw, None, None


__all__ = ["RMSNormFunction", "fused_applies", "rms_norm", "rms_norm_reference"]
