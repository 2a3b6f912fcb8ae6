"""Triton kernels of the FP8 block-scaled grouped GEMMs (DeepSeek-V3's recipe for routed experts).

torch offers no block-scaled grouped GEMM (`torch._scaled_grouped_mm` takes row-wise and MX
recipes only), so the two products of the routed experts are written here. Both accumulate in
float32 and apply the float32 scales of each 128-wide contraction tile to the partial product of
that tile, the accumulation DeepSeek-V3 describes. FP8 operands travel as uint8 views (zero bits
are +0.0 in e4m3) and are bit-cast back inside the kernels, so masked loads need no FP8 constant.

* `grouped_mm_t`: out[rows of group e] = A[rows] @ B[e].T, A [M, Kp] with 1x128 scales [M, Kp/128],
  B [E, Np, Kp] with 128x128 scales [E, Np/128, Kp/128] (forward and input gradient).
* `grouped_wgrad`: out[e] = sum over tokens t of group e of G[:, t] x X[:, t].T, G [Np, Mp] and
  X [Kp, Mp] both with 1x128 scales along the tokens [., Mp/128] (weight gradient); a 128-token tile
  that straddles two groups is read by both, each masking the other group's tokens.

The reference is the float32 emulation in `lit_deepseek.kernels.fp8` (dequantize, then multiply).
Set TRITON_INTERPRET=1 to run these kernels on CPU tensors.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK = 128


@triton.jit
def _grouped_mm_t_kernel(a_ptr, sa_ptr, b_ptr, sb_ptr, out_ptr, tile_group_ptr, tile_row_ptr, group_end_ptr,
                         M, K_TILES, stride_am, stride_sam, stride_be, stride_bn, stride_sbe, stride_sbn, stride_om,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    g = tl.load(tile_group_ptr + pid_m)
    if g >= 0:
        row0 = tl.load(tile_row_ptr + pid_m)
        row_end = tl.load(group_end_ptr + g)
        rows = row0 + tl.arange(0, BLOCK_M)
        keep = rows < row_end
        rows_in = tl.minimum(rows, M - 1)  # rows past the group only feed rows that are not stored
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kt in range(0, K_TILES):
            kk = kt * BLOCK_K + ks
            a = tl.load(a_ptr + rows_in[:, None] * stride_am + kk[None, :]).to(tl.float8e4nv, bitcast=True)
            b = tl.load(b_ptr + g * stride_be + cols[:, None] * stride_bn + kk[None, :]).to(tl.float8e4nv, bitcast=True)
            sa = tl.load(sa_ptr + rows_in * stride_sam + kt)
            sb = tl.load(sb_ptr + g * stride_sbe + pid_n * stride_sbn + kt)
            acc += tl.dot(a, tl.trans(b)) * (sa[:, None] * sb)
        tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], acc.to(tl.bfloat16), mask=keep[:, None])


@triton.jit
def _grouped_wgrad_kernel(a_ptr, sa_ptr, b_ptr, sb_ptr, out_ptr, offs_ptr,
                          stride_a, stride_sa, stride_b, stride_sb, stride_oe, stride_on,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr):
    e = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    end = tl.load(offs_ptr + e)
    start = tl.load(offs_ptr + e - 1, mask=e > 0, other=0)
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    ts = tl.arange(0, BLOCK_T)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for t in range(start // BLOCK_T, (end + BLOCK_T - 1) // BLOCK_T):
        toks = t * BLOCK_T + ts
        mine = (toks >= start) & (toks < end)
        a = tl.load(a_ptr + ns[:, None] * stride_a + toks[None, :], mask=mine[None, :], other=0)
        b = tl.load(b_ptr + ks[:, None] * stride_b + toks[None, :], mask=mine[None, :], other=0)
        sa = tl.load(sa_ptr + ns * stride_sa + t)
        sb = tl.load(sb_ptr + ks * stride_sb + t)
        prod = tl.dot(a.to(tl.float8e4nv, bitcast=True), tl.trans(b.to(tl.float8e4nv, bitcast=True)))
        acc += prod * (sa[:, None] * sb[None, :])
    tl.store(out_ptr + e * stride_oe + ns[:, None] * stride_on + ks[None, :], acc)


def _tile_map(offsets: Tensor, m: int, block_m: int) -> tuple[Tensor, Tensor, int]:
    """Program -> (group, first row) for row tiles that never cross a group; -1 marks spare programs.
    Computed on the device (no host sync): the grid is the static bound ceil(M / BLOCK_M) + E."""
    ends = offsets.long()
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    tiles = (ends - starts + block_m - 1) // block_m
    cum = torch.cumsum(tiles, 0)
    n_prog = (m + block_m - 1) // block_m + ends.numel()
    pid = torch.arange(n_prog, device=offsets.device)
    group = torch.searchsorted(cum, pid, right=True)
    valid = group < ends.numel()
    g = group.clamp(max=ends.numel() - 1)
    first_row = starts[g] + (pid - (cum - tiles)[g]) * block_m
    return torch.where(valid, g, -1).to(torch.int32), first_row.to(torch.int32), n_prog


def grouped_mm_t(aq: Tensor, sa: Tensor, bq: Tensor, sb: Tensor, offsets: Tensor,
                 block_m: Optional[int] = None) -> Tensor:
    """aq [M, Kp] e4m3 (1x128 scales sa [M, Kp/128]) with rows sorted by group; bq [E, Np, Kp] e4m3
    (128x128 scales sb [E, Np/128, Kp/128]) -> bf16 [M, Np], rows past offsets[-1] are zero.
    block_m: rows per program; None = 128 when groups average >= 256 rows, else 64."""
    m, kp = aq.shape
    e, np_, _ = bq.shape
    if block_m is None:
        block_m = 128 if m >= 256 * e else 64
    out = torch.zeros(m, np_, device=aq.device, dtype=torch.bfloat16)
    if m == 0:
        return out
    a, b = aq.contiguous().view(torch.uint8), bq.contiguous().view(torch.uint8)
    sa, sb = sa.contiguous(), sb.contiguous()
    group, first_row, n_prog = _tile_map(offsets, m, block_m)
    grid = (n_prog, np_ // BLOCK)
    _grouped_mm_t_kernel[grid](a, sa, b, sb, out, group, first_row, offsets.to(torch.int32).contiguous(),
                               m, kp // BLOCK, a.stride(0), sa.stride(0), b.stride(0), b.stride(1), sb.stride(0),
                               sb.stride(1), out.stride(0), BLOCK_M=block_m, BLOCK_N=BLOCK, BLOCK_K=BLOCK,
                               num_warps=8 if block_m == 128 else 4, num_stages=3)
    return out


def grouped_wgrad(gq: Tensor, sg: Tensor, xq: Tensor, sx: Tensor, offsets: Tensor) -> Tensor:
    """gq [Np, Mp] e4m3 and xq [Kp, Mp] e4m3, both with 1x128 scales along the tokens ([Np, Mp/128],
    [Kp, Mp/128]); tokens of group e are offsets[e-1]:offsets[e] -> float32 [E, Np, Kp]."""
    np_, _ = gq.shape
    kp = xq.shape[0]
    e = offsets.numel()
    out = torch.empty(e, np_, kp, device=gq.device, dtype=torch.float32)
    a, b = gq.contiguous().view(torch.uint8), xq.contiguous().view(torch.uint8)
    sg, sx = sg.contiguous(), sx.contiguous()
    grid = (e, np_ // BLOCK, kp // BLOCK)
    _grouped_wgrad_kernel[grid](a, sg, b, sx, out, offsets.to(torch.int32).contiguous(), a.stride(0), sg.stride(0),
                                b.stride(0), sx.stride(0), out.stride(0), out.stride(1),
                                BLOCK_N=BLOCK, BLOCK_K=BLOCK, BLOCK_T=BLOCK, num_warps=8, num_stages=3)
    return out
