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
def _grouped_mm_t_kernel(a_ptr, sa_ptr, b_ptr, sb_ptr, out_ptr, group_end_ptr, E,
                         M, K_TILES, stride_am, stride_sam, stride_sak, stride_be, stride_bn, stride_sbe, stride_sbn,
                         stride_om, N_BLOCKS,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # one-dimensional grid, the column blocks of a row tile adjacent: the programs running together
    # share their rows of A (read from L2 instead of memory) and their group's weights
    pid = tl.program_id(0)
    pid_n = pid % N_BLOCKS
    pid_m = pid // N_BLOCKS
    # row tile pid_m -> (group g, first row): the groups' row tiles are numbered in order, each group
    # starting a new tile, so no tile crosses a group; programs past the last tile have g = -1
    zero = pid_m * 0  # int32 scalars: the loop-carried values keep one type
    g = zero - 1
    row0 = zero
    row_end = zero
    start = zero
    first_tile = zero
    for e in range(0, E):
        end = tl.load(group_end_ptr + e)
        n_tiles = (end - start + BLOCK_M - 1) // BLOCK_M
        hit = (pid_m >= first_tile) & (pid_m < first_tile + n_tiles)
        g = tl.where(hit, e, g)
        row0 = tl.where(hit, start + (pid_m - first_tile) * BLOCK_M, row0)
        row_end = tl.where(hit, end, row_end)
        first_tile += n_tiles
        start = end
    if g >= 0:
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
            sa = tl.load(sa_ptr + rows_in * stride_sam + kt * stride_sak)
            if BLOCK_N == 128:  # one weight block: one scale
                sb = tl.load(sb_ptr + g * stride_sbe + pid_n * stride_sbn + kt)
                acc += tl.dot(a, tl.trans(b)) * (sa[:, None] * sb)
            else:  # several 128-row weight blocks side by side: a scale per column
                sb = tl.load(sb_ptr + g * stride_sbe + (cols // 128) * stride_sbn + kt)
                acc += tl.dot(a, tl.trans(b)) * (sa[:, None] * sb[None, :])
        tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], acc.to(tl.bfloat16), mask=keep[:, None])


@triton.jit
def _wgrad_tile(acc, a_ptr, sa_ptr, b_ptr, sb_ptr, ns, ks, t, ts, start, end, stride_a, stride_san, stride_sat,
                stride_b, stride_sbk, stride_sbt, MASKED: tl.constexpr):
    """acc + the scaled FP8 product of token tile t; MASKED: only tokens start <= t < end count."""
    toks = t * 128 + ts
    if MASKED:
        mine = (toks >= start) & (toks < end)
        a = tl.load(a_ptr + ns[:, None] * stride_a + toks[None, :], mask=mine[None, :], other=0)
        b = tl.load(b_ptr + ks[:, None] * stride_b + toks[None, :], mask=mine[None, :], other=0)
    else:
        a = tl.load(a_ptr + ns[:, None] * stride_a + toks[None, :])
        b = tl.load(b_ptr + ks[:, None] * stride_b + toks[None, :])
    sa = tl.load(sa_ptr + ns * stride_san + t * stride_sat)
    sb = tl.load(sb_ptr + ks * stride_sbk + t * stride_sbt)
    prod = tl.dot(a.to(tl.float8e4nv, bitcast=True), tl.trans(b.to(tl.float8e4nv, bitcast=True)))
    return acc + prod * (sa[:, None] * sb[None, :])


@triton.jit
def _grouped_wgrad_kernel(a_ptr, sa_ptr, b_ptr, sb_ptr, out_ptr, offs_ptr, stride_a, stride_san, stride_sat,
                          stride_b, stride_sbk, stride_sbt, stride_oe, stride_on, N_BLOCKS, K_BLOCKS,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # one-dimensional grid, a group's programs adjacent: those running together read the same
    # group's tokens (from L2 after the first)
    pid = tl.program_id(0)
    pid_k = pid % K_BLOCKS
    pid_n = (pid // K_BLOCKS) % N_BLOCKS
    e = pid // (K_BLOCKS * N_BLOCKS)
    end = tl.load(offs_ptr + e)
    start = tl.load(offs_ptr + e - 1, mask=e > 0, other=0)
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    ts = tl.arange(0, 128)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    # 128-token tiles wholly inside the group: plain loads the compiler can pipeline; then the (at
    # most two) tiles the group shares with its neighbours, whose other tokens are masked to zero
    t_lo = (start + 127) // 128
    t_hi = end // 128
    for t in range(t_lo, t_hi):
        acc = _wgrad_tile(acc, a_ptr, sa_ptr, b_ptr, sb_ptr, ns, ks, t, ts, start, end, stride_a, stride_san,
                          stride_sat, stride_b, stride_sbk, stride_sbt, False)
    for t in range(start // 128, t_lo):
        acc = _wgrad_tile(acc, a_ptr, sa_ptr, b_ptr, sb_ptr, ns, ks, t, ts, start, end, stride_a, stride_san,
                          stride_sat, stride_b, stride_sbk, stride_sbt, True)
    for t in range(tl.maximum(t_hi, t_lo), (end + 127) // 128):
        acc = _wgrad_tile(acc, a_ptr, sa_ptr, b_ptr, sb_ptr, ns, ks, t, ts, start, end, stride_a, stride_san,
                          stride_sat, stride_b, stride_sbk, stride_sbt, True)
    tl.store(out_ptr + e * stride_oe + ns[:, None] * stride_on + ks[None, :], acc)


def grouped_mm_t(aq: Tensor, sa: Tensor, bq: Tensor, sb: Tensor, offsets: Tensor,
                 block_m: Optional[int] = None, num_warps: Optional[int] = None, num_stages: int = 3,
                 block_n: int = BLOCK) -> Tensor:
    """aq [M, Kp] e4m3 (1x128 scales sa [M, Kp/128]) with rows sorted by group; bq [E, Np, Kp] e4m3
    (128x128 scales sb [E, Np/128, Kp/128]) -> bf16 [M, Np], rows past offsets[-1] are zero.
    block_m: rows per program; None = 128 when groups average >= 256 rows, else 64. block_n: output
    columns per program, 128 or 256 (256 only where Np is a multiple of it, else 128; 256 was slower at
    every launch the probe tried on an H100, so the product keeps 128). num_warps
    (None: 8 for 128 rows, else 4) and num_stages: the launch's; `benchmarks/fp8_ops_probe.py --tiles`
    times the alternatives."""
    m, kp = aq.shape
    e, np_, _ = bq.shape
    if block_m is None:
        block_m = 128 if m >= 256 * e else 64
    out = torch.zeros(m, np_, device=aq.device, dtype=torch.bfloat16)
    if m == 0:
        return out
    a, b = aq.contiguous().view(torch.uint8), bq.contiguous().view(torch.uint8)
    sb = sb.contiguous()  # sa: any strides (the Triton quantizers write it column-major)
    # a static bound of the row tiles (each group may start one more), so no host sync on the counts
    if block_n not in (BLOCK, 2 * BLOCK):
        raise ValueError(f"grouped_mm_t: block_n must be {BLOCK} or {2 * BLOCK}, got {block_n}")
    if np_ % block_n:
        block_n = BLOCK
    n_blocks = np_ // block_n
    grid = (((m + block_m - 1) // block_m + e) * n_blocks,)
    _grouped_mm_t_kernel[grid](a, sa, b, sb, out, offsets.to(torch.int32).contiguous(), e,
                               m, kp // BLOCK, a.stride(0), sa.stride(0), sa.stride(1), b.stride(0), b.stride(1), sb.stride(0),
                               sb.stride(1), out.stride(0), n_blocks, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=BLOCK,
                               num_warps=num_warps or (8 if block_m == 128 else 4), num_stages=num_stages)
    return out


def grouped_wgrad(gq: Tensor, sg: Tensor, xq: Tensor, sx: Tensor, offsets: Tensor, block_k: Optional[int] = None,
                  num_warps: int = 8, num_stages: int = 3) -> Tensor:
    """gq [Np, Mp] e4m3 and xq [Kp, Mp] e4m3, both with 1x128 scales along the tokens ([Np, Mp/128],
    [Kp, Mp/128]); tokens of group e are offsets[e-1]:offsets[e] -> float32 [E, Np, Kp].
    block_k: output columns per program (None: 256 where Kp allows, else 128); num_warps and
    num_stages: the launch's (`benchmarks/fp8_ops_probe.py --tiles` times the alternatives)."""
    np_, mp = gq.shape
    kp = xq.shape[0]
    if mp % BLOCK or xq.shape[1] != mp:
        raise ValueError(f"grouped_wgrad: token dimensions {mp} and {xq.shape[1]} must be equal multiples of {BLOCK}")
    e = offsets.numel()
    out = torch.empty(e, np_, kp, device=gq.device, dtype=torch.float32)
    a, b = gq.contiguous().view(torch.uint8), xq.contiguous().view(torch.uint8)
    if block_k is None:
        block_k = 256 if kp % 256 == 0 else BLOCK  # 128 x 256 output tiles: ~20% faster on an H200 than 128 x 128
    if block_k % BLOCK or kp % block_k:
        raise ValueError(f"grouped_wgrad: block_k {block_k} must be a multiple of {BLOCK} dividing {kp}")
    n_blocks, k_blocks = np_ // BLOCK, kp // block_k
    _grouped_wgrad_kernel[(e * n_blocks * k_blocks,)](
        a, sg, b, sx, out, offsets.to(torch.int32).contiguous(), a.stride(0), sg.stride(0), sg.stride(1), b.stride(0),
        sx.stride(0), sx.stride(1), out.stride(0), out.stride(1), n_blocks, k_blocks,
        BLOCK_N=BLOCK, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages)
    return out


# ---------------------------------------------------------------------------------- quantizers
# One pass over the operand per quantization, instead of about ten eager torch ops. They give the
# bits of `lit_deepseek.kernels.fp8`'s torch quantizers (the reference): the same exact power-of-two
# scale from the float32 bits of the tile maximum (`_pow2_scale`), the same round-to-nearest e4m3.
@triton.jit
def _pow2_scales(amax):
    """(2^s, 2^-s): the largest power of two 2^s with amax * 2^s <= 448, amax clamped to >= 1e-12."""
    bits = tl.maximum(amax, 1e-12).to(tl.int32, bitcast=True)
    e = ((bits >> 23) & 0xFF) - 127
    s = tl.where((bits & 0x7FFFFF) <= 0x600000, 8 - e, 7 - e)
    return ((s + 127) << 23).to(tl.float32, bitcast=True), ((127 - s) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _to_e4m3_bits(x):
    """x (|x| <= 448) -> e4m3 bits as uint8, rounded to nearest even. The rounding happens in float32
    first ((|x| + c) - c with c = 1.5 * 2^(E + 20) rounds to a multiple of 2^(E - 3), the e4m3 spacing
    of x's binade E, or 2^-9 below 2^-6), so the conversion that follows is exact."""
    bits = x.to(tl.int32, bitcast=True)
    e = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)
    c = (((e + 147) << 23) | 0x400000).to(tl.float32, bitcast=True)
    r = (tl.abs(x) + c) - c
    # the sign bit is set on the bits, so that a negative value that rounds to 0 gives -0 (0x80) as
    # the torch conversion does (negating a float zero in the kernel may give +0)
    sign = ((bits >> 24) & 0x80).to(tl.uint8)
    return r.to(tl.float8e4nv).to(tl.uint8, bitcast=True) | sign


@triton.jit
def _quantize_tiles_kernel(x_ptr, q_ptr, s_ptr, R, C, stride_xr, stride_xc, stride_qr, stride_sr, stride_sk,
                           BLOCK_R: tl.constexpr):
    """Rows r < R_out (the grid) of x (R x C data, unit-stride rows: see `_tiles`; zeros past R and C) in 1x128 tiles."""
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    kt = tl.program_id(1)
    cols = (kt * 128 + tl.arange(0, 128)).to(tl.int64)
    x = tl.load(x_ptr + rows[:, None] * stride_xr + cols[None, :] * stride_xc,
                mask=(rows[:, None] < R) & (cols[None, :] < C), other=0.0).to(tl.float32)
    scale, inv = _pow2_scales(tl.max(tl.abs(x), axis=1))
    q = _to_e4m3_bits(tl.clamp(x * scale[:, None], -448.0, 448.0))
    tl.store(q_ptr + rows[:, None] * stride_qr + cols[None, :], q)
    tl.store(s_ptr + rows * stride_sr + kt * stride_sk, inv)


@triton.jit
def _quantize_dual_kernel(x_ptr, q_ptr, s_ptr, qt_ptr, st_ptr, T, C, stride_xt, stride_xc, stride_qt, stride_st,
                          stride_sc, stride_qtc, stride_stc, stride_stt):
    """One 128x128 block (program: token block, channel block) of x [T, C], read once and quantized
    twice: in 1x128 tiles along the channels (q [T, Cp], scales s [T, Cp/128]) and along the tokens
    (qt [Cp, Tp] = the tiles of x.T, scales st [Cp, Tp/128]); zeros past T and C."""
    pid_t = tl.program_id(0)
    pid_c = tl.program_id(1)
    toks = (pid_t * 128 + tl.arange(0, 128)).to(tl.int64)
    cols = (pid_c * 128 + tl.arange(0, 128)).to(tl.int64)
    x = tl.load(x_ptr + toks[:, None] * stride_xt + cols[None, :] * stride_xc,
                mask=(toks[:, None] < T) & (cols[None, :] < C), other=0.0).to(tl.float32)
    ax = tl.abs(x)
    scale, inv = _pow2_scales(tl.max(ax, axis=1))  # per token
    q = _to_e4m3_bits(tl.clamp(x * scale[:, None], -448.0, 448.0))
    tl.store(q_ptr + toks[:, None] * stride_qt + cols[None, :], q, mask=toks[:, None] < T)
    tl.store(s_ptr + toks * stride_st + pid_c * stride_sc, inv, mask=toks < T)
    scale_t, inv_t = _pow2_scales(tl.max(ax, axis=0))  # per channel
    qt = _to_e4m3_bits(tl.clamp(x * scale_t[None, :], -448.0, 448.0))
    tl.store(qt_ptr + cols[None, :] * stride_qtc + toks[:, None], qt)
    tl.store(st_ptr + cols * stride_stc + pid_t * stride_stt, inv_t)


@triton.jit
def _quantize_blocks_kernel(w_ptr, q_ptr, s_ptr, N, K, stride_we, stride_wn, stride_wk, stride_qe, stride_qn,
                            stride_se, stride_sn):
    """One 128x128 block (program: block row, block column, leading index) of w [E, N, K]."""
    e = tl.program_id(2).to(tl.int64)
    rows = (tl.program_id(0) * 128 + tl.arange(0, 128)).to(tl.int64)
    cols = (tl.program_id(1) * 128 + tl.arange(0, 128)).to(tl.int64)
    w = tl.load(w_ptr + e * stride_we + rows[:, None] * stride_wn + cols[None, :] * stride_wk,
                mask=(rows[:, None] < N) & (cols[None, :] < K), other=0.0).to(tl.float32)
    scale, inv = _pow2_scales(tl.max(tl.max(tl.abs(w), axis=1), axis=0))
    q = _to_e4m3_bits(tl.clamp(w * scale, -448.0, 448.0))
    tl.store(q_ptr + e * stride_qe + rows[:, None] * stride_qn + cols[None, :], q)
    tl.store(s_ptr + e * stride_se + tl.program_id(0) * stride_sn + tl.program_id(1), inv)


@triton.jit
def _rows_amax_kernel(x_ptr, amax_ptr, R, C, stride_xr, stride_xc, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Largest magnitude of each row of x [R, C] (unit-stride rows) into amax (zeros before): one program
    per block of rows and chunk of columns, so that long rows (a transposed activation) still fill the
    GPU."""
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cols = (tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    x = tl.load(x_ptr + rows[:, None] * stride_xr + cols[None, :] * stride_xc,
                mask=(rows[:, None] < R) & (cols[None, :] < C), other=0.0).to(tl.float32)
    tl.atomic_max(amax_ptr + rows, tl.max(tl.abs(x), axis=1), mask=rows < R)


@triton.jit
def _rows_quantize_kernel(x_ptr, amax_ptr, q_ptr, s_ptr, R, C, stride_xr, stride_xc, stride_qr,
                          BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Rows of x quantized with the scale of their largest magnitude (`_rows_amax_kernel`)."""
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cols = (tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    mask = (rows[:, None] < R) & (cols[None, :] < C)
    x = tl.load(x_ptr + rows[:, None] * stride_xr + cols[None, :] * stride_xc, mask=mask, other=0.0).to(tl.float32)
    scale, inv = _pow2_scales(tl.load(amax_ptr + rows, mask=rows < R, other=0.0))
    q = _to_e4m3_bits(tl.clamp(x * scale[:, None], -448.0, 448.0))
    tl.store(q_ptr + rows[:, None] * stride_qr + cols[None, :], q, mask=mask)
    if tl.program_id(1) == 0:
        tl.store(s_ptr + rows, inv, mask=rows < R)


@triton.jit
def _rows_quantize_whole_kernel(x_ptr, q_ptr, s_ptr, R, C, stride_xr, stride_qr,
                                BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Contiguous rows of x [R, C] (C <= BLOCK_C) held whole by one program: the row maximum and
    the quantization from one read, no atomics (rows short enough for registers: activations and
    weights along their channels)."""
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cols = tl.arange(0, BLOCK_C).to(tl.int64)
    mask = (rows[:, None] < R) & (cols[None, :] < C)
    x = tl.load(x_ptr + rows[:, None] * stride_xr + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    scale, inv = _pow2_scales(tl.max(tl.abs(x), axis=1))
    q = _to_e4m3_bits(tl.clamp(x * scale[:, None], -448.0, 448.0))
    tl.store(q_ptr + rows[:, None] * stride_qr + cols[None, :], q, mask=mask)
    tl.store(s_ptr + rows, inv, mask=rows < R)


_ROWS = 32
#: rows up to this length are quantized by `_rows_quantize_whole_kernel` (one read); longer ones
#: (tokens along the row) by the amax + quantize pair, whose column chunks fill the GPU when there are
#: few rows. Both read unit-stride rows only (`quantize_rows` copies a transposed operand first): on
#: an H100 (Triton 3.6) the single-read kernel's output differed from the torch quantizer's for
#: several tile shapes when it read a transposed operand in place, as `_tiles` did
_WHOLE_ROW_MAX = 4096
_WHOLE_ROW_ELEMENTS = 4096  # elements a program holds (BLOCK_R x BLOCK_C): <= 94 registers at 8 warps (sm_90)


def _tiles(x: Tensor) -> tuple[Tensor, Tensor]:
    """x [R, C] -> (e4m3 [R, Cp], float32 [R, Cp/128], scales column-major). torch copies x to
    unit-stride rows first when they are not: read in place, a transposed bf16 x gave wrong e4m3
    bits on an H100 (Triton 3.6; 227 to 4096 tokens, 256 to 2048 channels, a quarter of the values;
    float32 was right), which made the FP8 weight gradients wrong on the GPU. The tiles of x.T come
    from `quantize_1x128_dual` instead, which reads x in its own order."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    r, c = x.shape
    kt = -(-c // BLOCK)
    rows_alloc = -(-r // _ROWS) * _ROWS  # whole programs; the extra rows are dropped below
    q = torch.empty(rows_alloc, kt * BLOCK, device=x.device, dtype=torch.uint8)
    # scales column-major ([kt, rows] in memory), the layout cuBLAS block scaling takes for them
    s = torch.empty(kt, rows_alloc, device=x.device, dtype=torch.float32).t()
    if rows_alloc and kt:
        _quantize_tiles_kernel[(rows_alloc // _ROWS, kt)](x, q, s, r, c, x.stride(0), x.stride(1), q.stride(0),
                                                         s.stride(0), s.stride(1), BLOCK_R=_ROWS, num_warps=4)
    return q[:r].view(torch.float8_e4m3fn), s[:r]


def quantize_1x128(x: Tensor) -> tuple[Tensor, Tensor]:
    """`lit_deepseek.kernels.fp8.quantize_1x128` in one kernel: x [..., K] -> (e4m3 [..., Kp], [..., Kp/128])."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    q, s = _tiles(x2)
    return q.reshape(*lead, q.shape[-1]), s.reshape(*lead, s.shape[-1])


def quantize_1x128_t(x: Tensor) -> tuple[Tensor, Tensor]:
    """`lit_deepseek.kernels.fp8.quantize_1x128_t` in one kernel: x [T, N] -> the 1x128 tiles of x.T
    with N padded to a multiple of 128: (e4m3 [Np, Tp], [Np, Tp/128]). The tiles come from
    `quantize_1x128_dual`, which reads x in its own order, 128x128 blocks at a time; its tiles along
    the channels are written and dropped. That costs one byte per element, against the four of a
    unit-stride copy of x.T (bf16) that `_tiles` would need first. A variant of the kernel that
    skipped those tiles gave wrong bits for float32 x ([128, 256], [4096, 256]) on an H100 (Triton
    3.6) while bf16 x came out right; the whole kernel gives the torch quantizer's bits for both."""
    return quantize_1x128_dual(x)[2:]


def quantize_1x128_dual(x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """`lit_deepseek.kernels.fp8.quantize_1x128_dual` in one kernel (x read once): x [T, C] ->
    (`quantize_1x128(x)`, `quantize_1x128_t(x)`), all scales column-major."""
    if x.stride(-1) != 1:  # unit-stride rows only, for the reason `_tiles` gives
        x = x.contiguous()
    t, c = x.shape
    tt, ct = -(-t // BLOCK), -(-c // BLOCK)
    q = torch.empty(t, ct * BLOCK, device=x.device, dtype=torch.uint8)
    s = torch.empty(ct, t, device=x.device, dtype=torch.float32).t()
    qt = torch.empty(ct * BLOCK, tt * BLOCK, device=x.device, dtype=torch.uint8)
    st = torch.empty(tt, ct * BLOCK, device=x.device, dtype=torch.float32).t()
    if t and c:
        _quantize_dual_kernel[(tt, ct)](x, q, s, qt, st, t, c, x.stride(0), x.stride(1), q.stride(0), s.stride(0),
                                        s.stride(1), qt.stride(0), st.stride(0), st.stride(1), num_warps=8)
    e4m3 = torch.float8_e4m3fn
    return q.view(e4m3), s, qt.view(e4m3), st


@triton.jit
def _transpose_kernel(src_ptr, dst_ptr, R, C, stride_sb, stride_sr, stride_db, stride_dc, C_TILES,
                      BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    # one tile of one matrix: unit-stride rows read, unit-stride rows of the transpose written
    pid, b = tl.program_id(0), tl.program_id(1)
    rows = (pid // C_TILES) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = (pid % C_TILES) * BLOCK_C + tl.arange(0, BLOCK_C)
    inside = (rows[:, None] < R) & (cols[None, :] < C)
    tile = tl.load(src_ptr + b * stride_sb + rows[:, None] * stride_sr + cols[None, :], mask=inside)
    tl.store(dst_ptr + b * stride_db + cols[:, None] * stride_dc + rows[None, :], tl.trans(tile),
             mask=tl.trans(inside))


def transposed_blocks(q: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
    """`lit_deepseek.kernels.fp8.transposed_blocks` in one kernel: the blocks [..., Np, Kp] (2 or 3
    dims) and scales of w -> those of w.transpose(-2, -1), the same bytes. torch's copy of a transposed
    one-byte view runs its generic strided kernel (about 0.3 TB/s on an H100); this one moves 128x128
    tiles."""
    u = q.view(torch.uint8)
    u3 = u if u.dim() == 3 else u.unsqueeze(0)
    if u3.stride(-1) != 1:
        u3 = u3.contiguous()
    b, r, c = u3.shape
    out = torch.empty(b, c, r, device=q.device, dtype=torch.uint8)
    if b and r and c:
        c_tiles = -(-c // BLOCK)
        _transpose_kernel[(-(-r // BLOCK) * c_tiles, b)](u3, out, r, c, u3.stride(0), u3.stride(1), out.stride(0),
                                                          out.stride(1), c_tiles, BLOCK_R=BLOCK, BLOCK_C=BLOCK,
                                                          num_warps=8)
    out = out.view(torch.float8_e4m3fn)
    return (out if q.dim() == 3 else out[0]), s.transpose(-2, -1).contiguous()


def quantize_128x128(w: Tensor) -> tuple[Tensor, Tensor]:
    """`lit_deepseek.kernels.fp8.quantize_128x128` in one kernel: w [..., N, K] (2 or 3 dims) ->
    (e4m3 [..., Np, Kp], [..., Np/128, Kp/128]). The kernel reads unit-stride rows only: a
    transposed view (a backward's w.t()) is quantized in its memory order and the result transposed,
    the same blocks and scales; on an H200 (Triton 3.6) the in-place strided read gave wrong bits for
    w.t() of [512, 1024], [576, 640] and [2048, 1408] while [72, 200] and [300, 200] were right."""
    if w.dim() >= 2 and w.stride(-1) != 1 and w.transpose(-2, -1).is_contiguous():
        return transposed_blocks(*quantize_128x128(w.transpose(-2, -1)))
    if w.stride(-1) != 1:
        w = w.contiguous()
    w3 = w if w.dim() == 3 else w.unsqueeze(0)
    e, n, k = w3.shape
    nt, kt = -(-n // BLOCK), -(-k // BLOCK)
    q = torch.empty(e, nt * BLOCK, kt * BLOCK, device=w.device, dtype=torch.uint8)
    s = torch.empty(e, nt, kt, device=w.device, dtype=torch.float32)
    if e and nt and kt:
        _quantize_blocks_kernel[(nt, kt, e)](w3, q, s, n, k, w3.stride(0), w3.stride(1), w3.stride(2), q.stride(0),
                                             q.stride(1), s.stride(0), s.stride(1), num_warps=8)
    q = q.view(torch.float8_e4m3fn)
    return (q, s) if w.dim() == 3 else (q[0], s[0])


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """`lit_deepseek.kernels.fp8.quantize_rows` in one kernel for rows up to `_WHOLE_ROW_MAX` long,
    else two (row maxima, then the quantization): x [..., K] -> (e4m3 [..., K], [..., 1])."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:  # a transposed operand (the row-wise weight gradient's g.t(), x.t()): unit-stride
        x2 = x2.contiguous()  # rows first, for the reason `_tiles` gives
    r, c = x2.shape
    q = torch.empty(r, c, device=x.device, dtype=torch.uint8)
    s = torch.empty(r, device=x.device, dtype=torch.float32)
    if r and c and c <= _WHOLE_ROW_MAX:
        block_c = triton.next_power_of_2(c)
        block_r = max(1, _WHOLE_ROW_ELEMENTS // block_c)
        _rows_quantize_whole_kernel[(-(-r // block_r),)](x2, q, s, r, c, x2.stride(0), q.stride(0),
                                                         BLOCK_R=block_r, BLOCK_C=block_c, num_warps=8)
    elif r and c:
        amax = torch.zeros(r, device=x.device, dtype=torch.float32)
        grid = (-(-r // _ROWS), -(-c // 256))
        _rows_amax_kernel[grid](x2, amax, r, c, x2.stride(0), x2.stride(1), BLOCK_R=_ROWS, BLOCK_C=256, num_warps=4)
        _rows_quantize_kernel[grid](x2, amax, q, s, r, c, x2.stride(0), x2.stride(1), q.stride(0), BLOCK_R=_ROWS,
                                    BLOCK_C=256, num_warps=4)
    return q.view(torch.float8_e4m3fn).reshape(x.shape), s.reshape(*x.shape[:-1], 1)
