"""MLA's per-head queries and keys for the training form, with RoPE, as one Triton kernel each way.

The training form of multi-head latent attention hands `scaled_dot_product_attention` queries
[q_nope, rope(q_rope)] and keys [k_nope, rope(k_rope)], where k_rope is one rotary key per token
shared by all heads. In eager mode the reference (`assemble_qk_reference`) is a dozen small kernels
forward (the cos/sin casts, four products, a sum and a difference, the pair interleave, two
concatenations, one of them of the broadcast shared key) and more backward (the products again,
the slice and stack gradients, the head sum of the shared key's gradient). The kernels read q,
k_nope and the shared key once and write the two operands of attention; backward reads their
gradients once and writes dq and the shared key's gradient (k_nope's gradient is a view of dk).

Roundings follow the reference in the activations' dtype: cos and sin are rounded to it, each
product is rounded before the sum or difference, and backward rounds each product of a gradient
with cos or sin the same way; the shared key's gradient is summed over heads in float32 and rounded
once, as `sum` does. Dispatch as in `lit_deepseek.kernels.eager`: CUDA tensors outside compiled
regions take the kernels, everything else the reference. Set TRITON_INTERPRET=1 to run the kernels
on CPU tensors.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lit_deepseek.kernels.eager import HAS_TRITON, triton_applies

if HAS_TRITON:
    import triton
    import triton.language as tl


def assemble_qk_reference(q: Tensor, k_nope: Tensor, k_rope: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """q [B, S, H, nope + R] (rotary part last), k_nope [B, S, H, nope], shared k_rope [B, S, R],
    cos/sin [B or 1, S, R/2] -> (q, k) [B, S, H, nope + R] with both rotary parts rotated."""
    from lit_deepseek.model.rope import apply_rotary  # the model imports this module

    b, s, h, nope = k_nope.shape
    r = k_rope.shape[-1]
    q_nope, q_rope = q.split([nope, q.shape[-1] - nope], dim=-1)
    q = torch.cat((q_nope, apply_rotary(q_rope, cos, sin)), dim=-1)
    k_rope = apply_rotary(k_rope.unsqueeze(2), cos, sin)
    return q, torch.cat((k_nope, k_rope.expand(b, s, h, r)), dim=-1)


def fused_applies(q: Tensor, k_nope: Tensor, k_rope: Tensor) -> bool:
    """Whether `assemble_qk` takes the Triton kernels: also needs one floating dtype for the three
    operands and a rotary part as wide as the shared key."""
    return (q.dtype == k_nope.dtype == k_rope.dtype and q.dtype.is_floating_point
            and q.shape[-1] == k_nope.shape[-1] + k_rope.shape[-1] and k_rope.shape[-1] % 2 == 0
            and triton_applies("MLA RoPE", q, k_nope, k_rope))


def assemble_qk(q: Tensor, k_nope: Tensor, k_rope: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """`assemble_qk_reference`: the Triton kernels where `fused_applies`, else the reference."""
    if fused_applies(q, k_nope, k_rope):
        return AssembleQKFunction.apply(q, k_nope, k_rope, cos, sin)
    return assemble_qk_reference(q, k_nope, k_rope, cos, sin)


if HAS_TRITON:

    @triton.jit
    def _rotate(x0, x1, c, s, dt: tl.constexpr):
        """(x0 c - x1 s, x1 c + x0 s), each product rounded to dt before the sum, as torch does."""
        y0 = (x0 * c).to(dt).to(tl.float32) - (x1 * s).to(dt).to(tl.float32)
        y1 = (x1 * c).to(dt).to(tl.float32) + (x0 * s).to(dt).to(tl.float32)
        return y0.to(dt), y1.to(dt)

    @triton.jit
    def _unrotate(d0, d1, c, s, dt: tl.constexpr):
        """The gradient of `_rotate` for output gradients (d0, d1), with autograd's roundings."""
        g0 = (d0 * c).to(dt).to(tl.float32) + (d1 * s).to(dt).to(tl.float32)
        g1 = (d1 * c).to(dt).to(tl.float32) - (d0 * s).to(dt).to(tl.float32)
        return g0.to(dt), g1.to(dt)

    @triton.jit
    def _qk_fwd_kernel(q_ptr, kn_ptr, kr_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr, S, H,
                       sq_b, sq_s, sq_h, sk_b, sk_s, sk_h, sr_b, sr_s, sc_b, sc_s,
                       NOPE: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
                       BLOCK_NOPE: tl.constexpr, BLOCK_HALF: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)  # one token per program, all its heads
        bi, si = row // S, row % S
        dt: tl.constexpr = qo_ptr.dtype.element_ty
        width: tl.constexpr = NOPE + 2 * HALF
        heads = tl.arange(0, BLOCK_H)
        cols = tl.arange(0, BLOCK_NOPE)
        pairs = tl.arange(0, BLOCK_HALF)
        hm = heads < H
        nm = hm[:, None] & (cols < NOPE)[None, :]
        rm = hm[:, None] & (pairs < HALF)[None, :]
        out = row * H * width + heads[:, None] * width
        c = tl.load(cos_ptr + bi * sc_b + si * sc_s + pairs, mask=pairs < HALF, other=0.0).to(dt).to(tl.float32)
        s = tl.load(sin_ptr + bi * sc_b + si * sc_s + pairs, mask=pairs < HALF, other=0.0).to(dt).to(tl.float32)
        q_row = q_ptr + bi * sq_b + si * sq_s + heads[:, None] * sq_h
        tl.store(qo_ptr + out + cols[None, :], tl.load(q_row + cols[None, :], mask=nm, other=0.0), mask=nm)
        k_row = kn_ptr + bi * sk_b + si * sk_s + heads[:, None] * sk_h
        tl.store(ko_ptr + out + cols[None, :], tl.load(k_row + cols[None, :], mask=nm, other=0.0), mask=nm)
        x0 = tl.load(q_row + NOPE + 2 * pairs[None, :], mask=rm, other=0.0).to(tl.float32)
        x1 = tl.load(q_row + NOPE + 2 * pairs[None, :] + 1, mask=rm, other=0.0).to(tl.float32)
        y0, y1 = _rotate(x0, x1, c[None, :], s[None, :], dt)
        tl.store(qo_ptr + out + NOPE + 2 * pairs[None, :], y0, mask=rm)
        tl.store(qo_ptr + out + NOPE + 2 * pairs[None, :] + 1, y1, mask=rm)
        r_row = kr_ptr + bi * sr_b + si * sr_s
        r0 = tl.load(r_row + 2 * pairs, mask=pairs < HALF, other=0.0).to(tl.float32)
        r1 = tl.load(r_row + 2 * pairs + 1, mask=pairs < HALF, other=0.0).to(tl.float32)
        z0, z1 = _rotate(r0, r1, c, s, dt)
        zero = tl.zeros((BLOCK_H, BLOCK_HALF), dtype=dt)
        tl.store(ko_ptr + out + NOPE + 2 * pairs[None, :], zero + z0[None, :], mask=rm)
        tl.store(ko_ptr + out + NOPE + 2 * pairs[None, :] + 1, zero + z1[None, :], mask=rm)

    @triton.jit
    def _qk_bwd_kernel(dq_ptr, dk_ptr, cos_ptr, sin_ptr, gq_ptr, gr_ptr, S, H,
                       sq_b, sq_s, sq_h, sk_b, sk_s, sk_h, sc_b, sc_s,
                       NOPE: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
                       BLOCK_NOPE: tl.constexpr, BLOCK_HALF: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        bi, si = row // S, row % S
        dt: tl.constexpr = gq_ptr.dtype.element_ty
        width: tl.constexpr = NOPE + 2 * HALF
        heads = tl.arange(0, BLOCK_H)
        cols = tl.arange(0, BLOCK_NOPE)
        pairs = tl.arange(0, BLOCK_HALF)
        hm = heads < H
        nm = hm[:, None] & (cols < NOPE)[None, :]
        rm = hm[:, None] & (pairs < HALF)[None, :]
        out = row * H * width + heads[:, None] * width
        c = tl.load(cos_ptr + bi * sc_b + si * sc_s + pairs, mask=pairs < HALF, other=0.0).to(dt).to(tl.float32)
        s = tl.load(sin_ptr + bi * sc_b + si * sc_s + pairs, mask=pairs < HALF, other=0.0).to(dt).to(tl.float32)
        dq_row = dq_ptr + bi * sq_b + si * sq_s + heads[:, None] * sq_h
        tl.store(gq_ptr + out + cols[None, :], tl.load(dq_row + cols[None, :], mask=nm, other=0.0), mask=nm)
        d0 = tl.load(dq_row + NOPE + 2 * pairs[None, :], mask=rm, other=0.0).to(tl.float32)
        d1 = tl.load(dq_row + NOPE + 2 * pairs[None, :] + 1, mask=rm, other=0.0).to(tl.float32)
        g0, g1 = _unrotate(d0, d1, c[None, :], s[None, :], dt)
        tl.store(gq_ptr + out + NOPE + 2 * pairs[None, :], g0, mask=rm)
        tl.store(gq_ptr + out + NOPE + 2 * pairs[None, :] + 1, g1, mask=rm)
        dk_row = dk_ptr + bi * sk_b + si * sk_s + heads[:, None] * sk_h
        e0 = tl.sum(tl.load(dk_row + NOPE + 2 * pairs[None, :], mask=rm, other=0.0).to(tl.float32), axis=0)
        e1 = tl.sum(tl.load(dk_row + NOPE + 2 * pairs[None, :] + 1, mask=rm, other=0.0).to(tl.float32), axis=0)
        h0, h1 = _unrotate(e0.to(dt).to(tl.float32), e1.to(dt).to(tl.float32), c, s, dt)
        gr = gr_ptr + row * 2 * HALF + 2 * pairs
        tl.store(gr, h0, mask=pairs < HALF)
        tl.store(gr + 1, h1, mask=pairs < HALF)


def _unit_last(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def _cos_sin(cos: Tensor, sin: Tensor, b: int, s: int) -> tuple[Tensor, Tensor, int, int]:
    """cos/sin broadcast to [B, S, R/2] with unit last stride, and their (batch, position) strides."""
    cos, sin = (_unit_last(t.expand(b, s, t.shape[-1])) for t in (cos, sin))
    if cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    return cos, sin, cos.stride(0), cos.stride(1)


def _launch_shape(h: int, nope: int, half: int) -> dict[str, int]:
    block_h = triton.next_power_of_2(h)
    return dict(NOPE=nope, HALF=half, BLOCK_H=block_h, BLOCK_NOPE=triton.next_power_of_2(nope),
                BLOCK_HALF=triton.next_power_of_2(half), num_warps=4 if block_h * nope <= 8192 else 8)


class AssembleQKFunction(torch.autograd.Function):
    """The Triton forward and backward of `assemble_qk_reference`."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k_nope: Tensor, k_rope: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        b, s, h, nope = k_nope.shape
        r = k_rope.shape[-1]
        if q.shape != (b, s, h, nope + r) or k_rope.shape != (b, s, r) or r % 2:
            raise ValueError(f"MLA RoPE: q {tuple(q.shape)}, k_nope {tuple(k_nope.shape)} and k_rope "
                             f"{tuple(k_rope.shape)} do not fit [B, S, H, nope + R], [B, S, H, nope], [B, S, R]")
        q, k_nope, k_rope = _unit_last(q), _unit_last(k_nope), _unit_last(k_rope)
        cos, sin, sc_b, sc_s = _cos_sin(cos, sin, b, s)
        q_out = torch.empty((b, s, h, nope + r), device=q.device, dtype=q.dtype)
        k_out = torch.empty_like(q_out)
        if q_out.numel():
            _qk_fwd_kernel[(b * s,)](q, k_nope, k_rope, cos, sin, q_out, k_out, s, h,
                                     q.stride(0), q.stride(1), q.stride(2), k_nope.stride(0), k_nope.stride(1),
                                     k_nope.stride(2), k_rope.stride(0), k_rope.stride(1), sc_b, sc_s,
                                     **_launch_shape(h, nope, r // 2))
        ctx.save_for_backward(cos, sin)
        ctx.nope = nope
        return q_out, k_out

    @staticmethod
    def backward(ctx: Any, dq: Tensor, dk: Tensor) -> tuple[Tensor, Tensor, Tensor, None, None]:
        cos, sin = ctx.saved_tensors
        nope = ctx.nope
        b, s, h, width = dq.shape
        r = width - nope
        dq, dk = _unit_last(dq), _unit_last(dk)
        grad_q = torch.empty((b, s, h, width), device=dq.device, dtype=dq.dtype)
        grad_rope = torch.empty((b, s, r), device=dq.device, dtype=dk.dtype)
        if grad_q.numel():
            _qk_bwd_kernel[(b * s,)](dq, dk, cos, sin, grad_q, grad_rope, s, h, dq.stride(0), dq.stride(1),
                                     dq.stride(2), dk.stride(0), dk.stride(1), dk.stride(2), cos.stride(0),
                                     cos.stride(1), **_launch_shape(h, nope, r // 2))
        return grad_q, dk[..., :nope], grad_rope, None, None


__all__ = ["AssembleQKFunction", "assemble_qk", "assemble_qk_reference", "fused_applies"]
