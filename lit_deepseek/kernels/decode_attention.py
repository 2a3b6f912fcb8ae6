"""Decode attention over the paged latent cache: a Triton split-KV kernel and a FlashMLA adapter.

The absorbed MLA decode step is multi-query attention with one shared 576-wide key (latent 512 +
rotary 64 at V3 scale) whose first 512 columns are also the value. It reads the whole cache once
per step, so its speed is HBM bandwidth. The Triton kernel (flash-decoding):

* stage 1, grid (head blocks, KV splits, query rows): each program walks its slice of one
  sequence's pages in tiles of BLOCK_N tokens, loads each tile once for BLOCK_H heads, and keeps
  an online softmax; it writes a partial output and its log-sum-exp;
* stage 2 merges the splits (log-sum-exp weighting).

An FP8 cache (float8 e4m3 + a latent and a rope scale per token) is read at one byte per value
and widened in registers; the per-token scales multiply the score columns and the probabilities,
not the tile. The head blocks of one KV slice are adjacent in the grid, so a tile read from HBM
for one head block is served from L2 to the others.

Queries may come several per sequence (a chunk after the prefill): each query row gets its own
causal length, so the same kernel serves them.

`decode_attention` picks, on CUDA: FlashMLA when `use_flash_mla` is set and `flash_mla` imports
(bf16 cache, 64-token pages), else the Triton kernel; the PyTorch reference
(`PagedLayerCache.attend_reference`) runs on CPU and is what tests compare against. A GPU fallback
is announced once.
"""

from __future__ import annotations

import importlib.util
import math
import warnings
from typing import Any

import torch
from torch import Tensor

try:  # the kernel is defined at import: TRITON_INTERPRET=1 (CPU emulation) must be set before it
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is a GPU extra
    _HAS_TRITON = False

FLASH_MLA_BLOCK = 64
_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=3)


def triton_available() -> bool:
    return _HAS_TRITON


def flash_mla_available() -> bool:
    return importlib.util.find_spec("flash_mla") is not None


# ------------------------------------------------------------------------------------ dispatch
def decode_attention(cache: Any, q_latent: Tensor, q_rope: Tensor, softmax_scale: float) -> Tensor:
    """Attention of the chunk's queries over a `PagedLayerCache` -> [B, s, H, C]."""
    if not q_latent.is_cuda:
        return cache.attend_reference(q_latent, q_rope, softmax_scale)
    pool = cache.pool
    if pool.use_flash_mla:
        reason = None
        if not flash_mla_available():
            reason = "flash_mla is not installed"
        elif pool.fp8:
            reason = "the FP8 cache is stored in our own layout, which FlashMLA does not read"
        elif pool.block_size != FLASH_MLA_BLOCK:
            reason = f"FlashMLA needs {FLASH_MLA_BLOCK}-token pages, the cache has {pool.block_size}"
        if reason is None:
            return flash_mla_attention(cache, q_latent, q_rope, softmax_scale)
        warn_once("flash_mla", f"model.mla.use_flash_mla: {reason}; decoding uses the Triton decode kernel")
    if triton_available():
        return triton_decode_attention(cache, q_latent, q_rope, softmax_scale)
    warn_once("triton", "decode attention: triton is not installed; the PyTorch reference path runs on the GPU")
    return cache.attend_reference(q_latent, q_rope, softmax_scale)


def _query_rows(cache: Any, s: int) -> tuple[Tensor, Tensor]:
    """Per query row (b, j): its sequence b and causal length lengths[b] + j + 1 (flattened [B * s])."""
    pool = cache.pool

    def compute() -> tuple[Tensor, Tensor]:
        lengths = pool.lengths[:, None] + torch.arange(1, s + 1, device=pool.lengths.device)[None]
        seq = torch.arange(pool.batch, device=lengths.device)[:, None].expand(-1, s)
        return seq.reshape(-1).int().contiguous(), lengths.reshape(-1).int().contiguous()

    return pool.memo(("rows", s), compute)


# ------------------------------------------------------------------------------------ FlashMLA
def flash_mla_inputs(cache: Any, q_latent: Tensor, q_rope: Tensor) -> dict[str, Any]:
    """Our pages in FlashMLA's layout (views, no copy): q [B, s, H, C + R], k_cache [blocks, 64, 1,
    C + R], block_table int32 [B, max blocks], cache_seqlens int32 [B] (after this chunk)."""
    pool = cache.pool
    s = q_latent.shape[1]
    return {
        "q": torch.cat((q_latent, q_rope), dim=-1).contiguous(),
        "k_cache": pool.kv[cache.layer].unsqueeze(2),
        "block_table": pool.block_table,
        "cache_seqlens": (pool.lengths + s).int(),
        "head_dim_v": pool.d_latent,
        "causal": s > 1,
    }


def flash_mla_attention(cache: Any, q_latent: Tensor, q_rope: Tensor, softmax_scale: float) -> Tensor:
    from flash_mla import flash_mla_with_kvcache, get_mla_metadata

    args = flash_mla_inputs(cache, q_latent, q_rope)
    s, h = q_latent.shape[1], q_latent.shape[2]
    metadata, num_splits = get_mla_metadata(args["cache_seqlens"], s * h, 1)
    out, _ = flash_mla_with_kvcache(args["q"], args["k_cache"], args["block_table"], args["cache_seqlens"],
                                    args["head_dim_v"], metadata, num_splits, softmax_scale=softmax_scale,
                                    causal=args["causal"])
    return out.to(q_latent.dtype)


# ------------------------------------------------------------------------------------ Triton
if _HAS_TRITON:
    @triton.jit
    def _stage1(Q, KV, SCALE, TABLE, ROW_SEQ, ROW_LEN, OUT, LSE,
               stride_qn, stride_qh, stride_kb, stride_kt, stride_tb, stride_on, stride_os, stride_oh,
               H, C, R, block_size, split_len, sm_scale,
               HAS_SCALE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr):
        hb = tl.program_id(0)  # fastest-varying: the head blocks of one KV slice run together (L2 reuse)
        split = tl.program_id(1)
        n = tl.program_id(2)
        seq = tl.load(ROW_SEQ + n)
        length = tl.load(ROW_LEN + n)
        start = split * split_len
        end = tl.minimum(start + split_len, length)
        heads = hb * BLOCK_H + tl.arange(0, BLOCK_H)
        offs_c = tl.arange(0, BLOCK_C)
        offs_r = tl.arange(0, BLOCK_R)
        hmask = heads < H
        cmask = offs_c < C
        rmask = offs_r < R
        q_base = Q + n * stride_qn + heads[:, None] * stride_qh
        q_lat = tl.load(q_base + offs_c[None, :], mask=hmask[:, None] & cmask[None, :], other=0.0)
        q_rope = tl.load(q_base + C + offs_r[None, :], mask=hmask[:, None] & rmask[None, :], other=0.0)
        m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_C], dtype=tl.float32)
        for t0 in range(start, end, BLOCK_N):
            t = t0 + tl.arange(0, BLOCK_N)
            tmask = t < end
            block = tl.load(TABLE + seq * stride_tb + t // block_size, mask=tmask, other=0)
            row = block.to(tl.int64) * stride_kb + (t % block_size) * stride_kt
            k_lat = tl.load(KV + row[:, None] + offs_c[None, :], mask=tmask[:, None] & cmask[None, :], other=0.0)
            k_rope = tl.load(KV + row[:, None] + C + offs_r[None, :], mask=tmask[:, None] & rmask[None, :],
                             other=0.0)
            k_lat = k_lat.to(q_lat.dtype)
            k_rope = k_rope.to(q_lat.dtype)
            s_lat = tl.dot(q_lat, tl.trans(k_lat), input_precision=PRECISION)
            s_rope = tl.dot(q_rope, tl.trans(k_rope), input_precision=PRECISION)
            if HAS_SCALE:
                slot = block.to(tl.int64) * block_size + t % block_size
                sc_lat = tl.load(SCALE + slot * 2, mask=tmask, other=0.0)
                sc_rope = tl.load(SCALE + slot * 2 + 1, mask=tmask, other=0.0)
                scores = s_lat * sc_lat[None, :] + s_rope * sc_rope[None, :]
            else:
                scores = s_lat + s_rope
            scores = tl.where(tmask[None, :], scores * sm_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(scores - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            if HAS_SCALE:
                p = p * sc_lat[None, :]
            acc = acc * alpha[:, None] + tl.dot(p.to(k_lat.dtype), k_lat, input_precision=PRECISION)
            m_i = m_new
        o_ptr = OUT + n * stride_on + split * stride_os + heads[:, None] * stride_oh + offs_c[None, :]
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(o_ptr, out, mask=hmask[:, None] & cmask[None, :])
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log(l_i))
        tl.store(LSE + (n * tl.num_programs(1) + split) * H + heads, lse, mask=hmask)


def _next_pow2(x: int, minimum: int = 16) -> int:
    return max(minimum, 1 << (x - 1).bit_length())


def _num_splits(rows: int, head_blocks: int, max_len: int, block_n: int) -> int:
    """Enough programs to fill the GPU (about 4 waves of 132 SMs), at least 2 tiles per split."""
    target = 4 * 132
    splits = max(1, math.ceil(target / max(1, rows * head_blocks)))
    return max(1, min(splits, math.ceil(max_len / (2 * block_n))))


#: launch settings of the kernel (benchmarks/bench_generate.py --phases attention sweeps alternatives)
KERNEL_CONFIG = {"block_h": 32, "block_n": 32, "num_warps": 8, "num_stages": 2}


def decode_attention_kernel(q: Tensor, kv: Tensor, scale: Tensor | None, block_table: Tensor, row_seq: Tensor,
                            row_len: Tensor, d_latent: int, softmax_scale: float, max_len: int,
                            block_h: int | None = None, block_n: int | None = None, num_splits: int | None = None,
                            num_warps: int | None = None, num_stages: int | None = None) -> Tensor:
    """The Triton kernel on raw pages: q [N, H, C + R] (one row per query), kv [blocks, block_size,
    C + R] (model dtype or float8 e4m3, then scale [blocks, block_size, 2] float32), block_table
    [B, max blocks] int32, row_seq / row_len [N] int32 (each row's sequence and causal length),
    max_len >= max(row_len) -> [N, H, C] float32."""
    block_h = block_h or KERNEL_CONFIG["block_h"]
    block_n = block_n or KERNEL_CONFIG["block_n"]
    num_warps = num_warps or KERNEL_CONFIG["num_warps"]
    num_stages = num_stages or KERNEL_CONFIG["num_stages"]
    n_rows, h, width = q.shape
    r = width - d_latent
    block_size = kv.shape[1]
    block_h = min(block_h, _next_pow2(h))
    head_blocks = math.ceil(h / block_h)
    splits = num_splits or _num_splits(n_rows, head_blocks, max_len, block_n)
    split_len = math.ceil(max(1, max_len) / splits / block_n) * block_n
    splits = max(1, math.ceil(max(1, max_len) / split_len))
    partial = torch.empty(n_rows, splits, h, d_latent, device=q.device, dtype=torch.float32)
    lse = torch.empty(n_rows, splits, h, device=q.device, dtype=torch.float32)
    _stage1[(head_blocks, splits, n_rows)](
        q, kv, scale if scale is not None else q, block_table, row_seq, row_len, partial, lse,
        q.stride(0), q.stride(1), kv.stride(0), kv.stride(1), block_table.stride(0),
        partial.stride(0), partial.stride(1), partial.stride(2),
        h, d_latent, r, block_size, split_len, softmax_scale,
        HAS_SCALE=scale is not None, BLOCK_H=block_h, BLOCK_N=block_n,
        BLOCK_C=_next_pow2(d_latent), BLOCK_R=_next_pow2(r), PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps, num_stages=num_stages)
    weights = torch.softmax(lse, dim=1).nan_to_num(0.0)  # [N, splits, H]; empty splits weigh 0
    return (partial * weights[..., None]).sum(dim=1)


def triton_decode_attention(cache: Any, q_latent: Tensor, q_rope: Tensor, softmax_scale: float) -> Tensor:
    """`decode_attention_kernel` for a `PagedLayerCache` and the chunk's queries -> [B, s, H, C]."""
    pool = cache.pool
    b, s, h, c = q_latent.shape
    q = torch.cat((q_latent, q_rope), dim=-1).reshape(b * s, h, -1).contiguous()
    row_seq, row_len = _query_rows(cache, s)
    out = decode_attention_kernel(q, pool.kv[cache.layer], pool.scale[cache.layer] if pool.fp8 else None,
                                  pool.block_table, row_seq, row_len, pool.d_latent, softmax_scale,
                                  max_len=pool.capacity)  # one split plan for the whole generation
    return out.view(b, s, h, c).to(q_latent.dtype)
