"""A paged latent KV cache for batched decoding with a length per sequence.

Layout (all layers in one pool, FlashMLA's paged layout when `block_size` is 64):

* ``kv``: [layers, blocks, block_size, d_latent + rope_dim] -- the normed KV latent and the
  rotated shared key of each cached token, side by side;
* ``block_table``: [batch, max blocks per sequence] int32 -- sequence b's token t lives in block
  ``block_table[b, t // block_size]`` at slot ``t % block_size``;
* ``lengths``: [batch] -- tokens cached so far per sequence.

Each sequence gets only the blocks its own prompt plus new tokens need, so a batch of different
prompt lengths wastes at most one partly filled block per sequence (no padding to the longest).

With ``fp8=True`` the entries are stored as float8 e4m3 with two float32 scales per token (one for
the latent, one for the rotary key; power-of-two scales, see `kernels.fp8.quantize_rows`): 580 +
4 bytes per token instead of 1152 in bf16 at V3 scale.

Attention over the cache (`attend`) runs, in order of preference: FlashMLA (``use_flash_mla``, when
installed on a Hopper GPU), the Triton split-KV decode kernel (CUDA, one query per sequence), and
the PyTorch reference (`attention.latent_attention`), which every fast path is tested against.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lit_deepseek.config import MLAConfig

E4M3 = torch.float8_e4m3fn


def quantize_entries(entry: Tensor, d_latent: int) -> tuple[Tensor, Tensor]:
    """[..., C + R] -> (float8 e4m3 [..., C + R], dequantization scales [..., 2]: latent, rope)."""
    from lit_deepseek.kernels.fp8 import quantize_rows

    q_lat, s_lat = quantize_rows(entry[..., :d_latent])
    q_rope, s_rope = quantize_rows(entry[..., d_latent:])
    return torch.cat((q_lat, q_rope), dim=-1), torch.cat((s_lat, s_rope), dim=-1)


def dequantize_entries(q: Tensor, scale: Tensor, d_latent: int, dtype: torch.dtype) -> Tensor:
    """Inverse of `quantize_entries` (float32 math, then cast to dtype)."""
    width = q.shape[-1]
    factor = torch.cat((scale[..., :1].expand(*scale.shape[:-1], d_latent),
                        scale[..., 1:].expand(*scale.shape[:-1], width - d_latent)), dim=-1)
    return (q.float() * factor).to(dtype)


class PagedLatentCache:
    """The latent cache of every layer for a batch of sequences; `cache[i]` is layer i's view."""

    def __init__(self, mla: MLAConfig, num_layers: int, capacities: Sequence[int], block_size: int = 64,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 fp8: bool = False, use_flash_mla: bool = False) -> None:
        if block_size < 1:
            raise ValueError(f"block_size: must be >= 1, got {block_size}")
        self.mla, self.block_size, self.dtype, self.fp8 = mla, block_size, dtype, fp8
        self.use_flash_mla = use_flash_mla
        self.d_latent, self.width = mla.d_latent, mla.d_latent + mla.qk_rope_head_dim
        self.batch = len(capacities)
        blocks = [max(1, math.ceil(c / block_size)) for c in capacities]
        self.capacity = max(capacities)
        table = torch.zeros(self.batch, max(blocks), dtype=torch.int32)
        first = 0
        for b, n in enumerate(blocks):
            table[b, :n] = torch.arange(first, first + n, dtype=torch.int32)
            first += n
        self.num_blocks = first
        self.block_table = table.to(device)
        self.kv = torch.zeros(num_layers, first, block_size, self.width, dtype=E4M3 if fp8 else dtype, device=device)
        self.scale = torch.ones(num_layers, first, block_size, 2, device=device) if fp8 else None
        self.lengths = torch.zeros(self.batch, dtype=torch.long, device=self.block_table.device)
        #: valid new tokens per sequence in the chunk being written (None = every token of the chunk)
        self.new_counts: Tensor | None = None
        self._max_length = 0
        self.num_layers = num_layers
        #: per-step values shared by all layers (slots, query rows), dropped by `advance`
        self.step_memo: dict[Any, Any] = {}

    # ------------------------------------------------------------------ bookkeeping
    def __len__(self) -> int:
        return self.num_layers

    def __getitem__(self, layer: int) -> PagedLayerCache:
        return PagedLayerCache(self, layer)

    def positions(self, s: int) -> Tensor:
        """[B, s] absolute positions of the next s tokens of each sequence."""
        return self.lengths[:, None] + torch.arange(s, device=self.lengths.device)[None]

    def max_length(self) -> int:
        """Longest cached sequence (kept on the host: no device sync)."""
        return self._max_length

    def advance(self, counts: Tensor | int) -> None:
        """Mark `counts` more tokens (per sequence, or the same for all) as cached."""
        if isinstance(counts, int):
            self.lengths += counts
            self._max_length += counts
        else:
            self.lengths += counts.to(self.lengths)
            self._max_length = int(self.lengths.max())
        if self._max_length > self.capacity:
            raise ValueError(f"PagedLatentCache: {self._max_length} tokens exceed the capacity {self.capacity}")
        self.new_counts = None
        self.step_memo.clear()

    def memo(self, key: Any, compute: Any) -> Any:
        """compute() once per step for all layers."""
        if key not in self.step_memo:
            self.step_memo[key] = compute()
        return self.step_memo[key]

    def memory_bytes(self) -> int:
        total = self.kv.numel() * self.kv.element_size()
        return total + (self.scale.numel() * 4 if self.scale is not None else 0)


class PagedLayerCache:
    """One layer's view of a `PagedLatentCache`, the object `MultiHeadLatentAttention` talks to."""

    def __init__(self, pool: PagedLatentCache, layer: int) -> None:
        self.pool, self.layer = pool, layer

    @property
    def is_prefill(self) -> bool:
        """Nothing is cached yet: the chunk attends only to itself (causally)."""
        return self.pool.max_length() == 0

    def _slots(self, s: int) -> tuple[Tensor, Tensor | None]:
        """Flat cache slots of the chunk's tokens to keep, and which tokens those are (None = all)."""
        p = self.pool

        def compute() -> tuple[Tensor, Tensor | None]:
            pos = p.positions(s)
            block = p.block_table.gather(1, (pos // p.block_size).clamp(max=p.block_table.shape[1] - 1).long())
            slots = block.long() * p.block_size + pos % p.block_size
            if p.new_counts is None:
                return slots.reshape(-1), None
            valid = torch.arange(s, device=slots.device)[None] < p.new_counts[:, None]
            return slots[valid], valid

        return p.memo(("slots", s), compute)

    def write(self, kv_latent: Tensor, k_rope: Tensor) -> None:
        """Store the latents [B, s, C] and rotary keys [B, s, R] of the chunk after each sequence's length
        (only the first `new_counts[b]` tokens of row b when the chunk is right-padded)."""
        p = self.pool
        entry = torch.cat((kv_latent, k_rope), dim=-1)
        slots, valid = self._slots(entry.shape[1])
        entry = entry.reshape(-1, p.width) if valid is None else entry[valid]
        if p.fp8:
            q, scale = quantize_entries(entry, p.d_latent)
            p.kv[self.layer].view(-1, p.width)[slots] = q
            p.scale[self.layer].view(-1, 2)[slots] = scale
        else:
            p.kv[self.layer].view(-1, p.width)[slots] = entry.to(p.dtype)

    def gather(self, dtype: torch.dtype) -> Tensor:
        """[B, blocks x block_size, C + R] every sequence's cache in order (dequantized)."""
        p = self.pool
        table = p.block_table.long()
        kv = p.kv[self.layer][table].flatten(1, 2)
        if p.fp8:
            return dequantize_entries(kv, p.scale[self.layer][table].flatten(1, 2), p.d_latent, dtype)
        return kv.to(dtype)

    def attend(self, q_latent: Tensor, q_rope: Tensor, softmax_scale: float) -> Tensor:
        """q_latent [B, s, H, C], q_rope [B, s, H, R] for the s tokens just written -> [B, s, H, C]."""
        from lit_deepseek.kernels.decode_attention import decode_attention

        return decode_attention(self, q_latent, q_rope, softmax_scale)

    def attend_reference(self, q_latent: Tensor, q_rope: Tensor, softmax_scale: float) -> Tensor:
        """The PyTorch path: gather the pages, mask per sequence length, `latent_attention`."""
        from lit_deepseek.model.attention import latent_attention

        p, s = self.pool, q_latent.shape[1]
        kv = self.gather(q_latent.dtype)
        q_pos = p.positions(s)  # written but not yet advanced: the chunk's own positions
        key_pos = torch.arange(kv.shape[1], device=kv.device)
        mask = (key_pos[None, None, :] <= q_pos[:, :, None])[:, None]  # [B, 1, s, T]
        return latent_attention(q_latent, q_rope, kv[..., : p.d_latent], kv[..., p.d_latent:], mask, softmax_scale)

    def kernel_inputs(self) -> dict[str, Any]:
        """What a decode kernel needs: pages, scales, block table and lengths after this chunk."""
        p = self.pool
        return {"kv": p.kv[self.layer], "scale": p.scale[self.layer] if p.fp8 else None,
                "block_table": p.block_table, "block_size": p.block_size, "d_latent": p.d_latent}
