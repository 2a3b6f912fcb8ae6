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
    def _rotated(x, xp, c, s, sign, dt: tl.constexpr):
        """x c + sign xp s, each product rounded to dt before the sum as torch rounds it (rounding is
        symmetric, so a negated rounded product is the rounded negated product)."""
        return ((x * c).to(dt).to(tl.float32) + sign * (xp * s).to(dt).to(tl.float32)).to(dt)

    @triton.jit
    def _qk_fwd_kernel(q_ptr, kn_ptr, kr_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr, NR, S, H,
                       sq_b, sq_s, sq_h, sk_b, sk_s, sk_h, sr_b, sr_s, sc_b, sc_s,
                       NOPE: tl.constexpr, WIDTH: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        # rows are (token, head) pairs, columns the head's [nope | rope] channels: whole head rows
        # are read and written with unit stride; a rotary channel's pair partner is re-read (cached)
        r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
        tok, h = r // H, r % H
        bi, si = tok // S, tok % S
        dt: tl.constexpr = qo_ptr.dtype.element_ty
        cols = tl.arange(0, BLOCK_D)
        j = tl.maximum(cols - NOPE, 0)  # rotary channel
        rope = (cols >= NOPE) & (cols < WIDTH)
        sign = tl.where(j % 2 == 0, -1.0, 1.0)[None, :]  # y0 = x0 c - x1 s, y1 = x1 c + x0 s
        rm = (r < NR)[:, None]
        dm, nm, rpm = rm & (cols < WIDTH)[None, :], rm & (cols < NOPE)[None, :], rm & rope[None, :]
        cs = (bi * sc_b + si * sc_s)[:, None] + (j // 2)[None, :]
        c = tl.load(cos_ptr + cs, mask=rpm, other=0.0).to(dt).to(tl.float32)
        s = tl.load(sin_ptr + cs, mask=rpm, other=0.0).to(dt).to(tl.float32)
        q_row = (q_ptr + bi * sq_b + si * sq_s + h * sq_h)[:, None]
        x = tl.load(q_row + cols[None, :], mask=dm, other=0.0)
        xp = tl.load(q_row + (NOPE + (j ^ 1))[None, :], mask=rpm, other=0.0).to(tl.float32)
        y = tl.where(rope[None, :], _rotated(x.to(tl.float32), xp, c, s, sign, dt), x.to(dt))
        out = r[:, None] * WIDTH + cols[None, :]
        tl.store(qo_ptr + out, y, mask=dm)
        k = tl.load((kn_ptr + bi * sk_b + si * sk_s + h * sk_h)[:, None] + cols[None, :], mask=nm, other=0.0)
        r_row = (kr_ptr + bi * sr_b + si * sr_s)[:, None]
        z = tl.load(r_row + j[None, :], mask=rpm, other=0.0).to(tl.float32)
        zp = tl.load(r_row + (j ^ 1)[None, :], mask=rpm, other=0.0).to(tl.float32)
        tl.store(ko_ptr + out, tl.where(rope[None, :], _rotated(z, zp, c, s, sign, dt), k.to(dt)), mask=dm)

    @triton.jit
    def _q_bwd_kernel(dq_ptr, cos_ptr, sin_ptr, gq_ptr, NR, S, H, sq_b, sq_s, sq_h, sc_b, sc_s,
                      NOPE: tl.constexpr, WIDTH: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
        tok, h = r // H, r % H
        bi, si = tok // S, tok % S
        dt: tl.constexpr = gq_ptr.dtype.element_ty
        cols = tl.arange(0, BLOCK_D)
        j = tl.maximum(cols - NOPE, 0)
        rope = (cols >= NOPE) & (cols < WIDTH)
        sign = tl.where(j % 2 == 0, 1.0, -1.0)[None, :]  # dx0 = d0 c + d1 s, dx1 = d1 c - d0 s
        rm = (r < NR)[:, None]
        dm, rpm = rm & (cols < WIDTH)[None, :], rm & rope[None, :]
        cs = (bi * sc_b + si * sc_s)[:, None] + (j // 2)[None, :]
        c = tl.load(cos_ptr + cs, mask=rpm, other=0.0).to(dt).to(tl.float32)
        s = tl.load(sin_ptr + cs, mask=rpm, other=0.0).to(dt).to(tl.float32)
        d_row = (dq_ptr + bi * sq_b + si * sq_s + h * sq_h)[:, None]
        d = tl.load(d_row + cols[None, :], mask=dm, other=0.0)
        dp = tl.load(d_row + (NOPE + (j ^ 1))[None, :], mask=rpm, other=0.0).to(tl.float32)
        g = tl.where(rope[None, :], _rotated(d.to(tl.float32), dp, c, s, sign, dt), d.to(dt))
        tl.store(gq_ptr + r[:, None] * WIDTH + cols[None, :], g, mask=dm)

    @triton.jit
    def _k_rope_bwd_kernel(dk_ptr, cos_ptr, sin_ptr, gr_ptr, T, S, H, sk_b, sk_s, sk_h, sc_b, sc_s,
                           NOPE: tl.constexpr, R: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
                           BLOCK_RP: tl.constexpr):
        # the shared key's gradient: dk's rotary channels summed over heads (float32, rounded once
        # as `sum` rounds), then the rotation's gradient
        tok = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
        bi, si = tok // S, tok % S
        dt: tl.constexpr = gr_ptr.dtype.element_ty
        heads = tl.arange(0, BLOCK_H)
        j = tl.arange(0, BLOCK_RP)
        sign = tl.where(j % 2 == 0, 1.0, -1.0)[None, :]
        tm = tok < T
        jm = tm[:, None] & (j < R)[None, :]
        m3 = tm[:, None, None] & (heads < H)[None, :, None] & (j < R)[None, None, :]
        base = (dk_ptr + bi * sk_b + si * sk_s)[:, None, None] + (heads * sk_h)[None, :, None] + NOPE
        e = tl.sum(tl.load(base + j[None, None, :], mask=m3, other=0.0).to(tl.float32), axis=1)
        ep = tl.sum(tl.load(base + (j ^ 1)[None, None, :], mask=m3, other=0.0).to(tl.float32), axis=1)
        cs = (bi * sc_b + si * sc_s)[:, None] + (j // 2)[None, :]
        c = tl.load(cos_ptr + cs, mask=jm, other=0.0).to(dt).to(tl.float32)
        s = tl.load(sin_ptr + cs, mask=jm, other=0.0).to(dt).to(tl.float32)
        g = _rotated(e.to(dt).to(tl.float32), ep.to(dt).to(tl.float32), c, s, sign, dt)
        tl.store(gr_ptr + tok[:, None] * R + j[None, :], g, mask=jm)


def _unit_last(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def _cos_sin(cos: Tensor, sin: Tensor, b: int, s: int) -> tuple[Tensor, Tensor, int, int]:
    """cos/sin broadcast to [B, S, R/2] with unit last stride, and their (batch, position) strides."""
    cos, sin = (_unit_last(t.expand(b, s, t.shape[-1])) for t in (cos, sin))
    if cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    return cos, sin, cos.stride(0), cos.stride(1)


def _rows_launch(b: int, s: int, h: int, width: int) -> tuple[tuple[int], dict[str, int]]:
    """Grid and tile of the (token, head)-row kernels: ~4K elements per program."""
    block_d = triton.next_power_of_2(width)
    block_r = max(1, 4096 // block_d)
    return (triton.cdiv(b * s * h, block_r),), dict(WIDTH=width, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4)


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
            grid, tile = _rows_launch(b, s, h, nope + r)
            _qk_fwd_kernel[grid](q, k_nope, k_rope, cos, sin, q_out, k_out, b * s * h, s, h,
                                 q.stride(0), q.stride(1), q.stride(2), k_nope.stride(0), k_nope.stride(1),
                                 k_nope.stride(2), k_rope.stride(0), k_rope.stride(1), sc_b, sc_s, NOPE=nope, **tile)
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
            grid, tile = _rows_launch(b, s, h, width)
            _q_bwd_kernel[grid](dq, cos, sin, grad_q, b * s * h, s, h, dq.stride(0), dq.stride(1), dq.stride(2),
                                cos.stride(0), cos.stride(1), NOPE=nope, **tile)
            block_h, block_rp = triton.next_power_of_2(h), triton.next_power_of_2(r)
            block_t = max(1, 4096 // (block_h * block_rp))
            _k_rope_bwd_kernel[(triton.cdiv(b * s, block_t),)](
                dk, cos, sin, grad_rope, b * s, s, h, dk.stride(0), dk.stride(1), dk.stride(2), cos.stride(0),
                cos.stride(1), NOPE=nope, R=r, BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_RP=block_rp, num_warps=4)
        return grad_q, dk[..., :nope], grad_rope, None, None


__all__ = ["AssembleQKFunction", "assemble_qk", "assemble_qk_reference", "fused_applies"]
