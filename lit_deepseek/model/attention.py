"""Multi-head latent attention (DeepSeek-V3 report, section 2.1.1, eqs. 1-11).

Keys and values are compressed jointly into a `d_latent` vector per token (plus one rotary key
shared by all heads); queries optionally go through their own low-rank bottleneck. Two forms:

* training form: decompress per-head keys/values and run `scaled_dot_product_attention`;
* absorbed form: fold the key up-projection into the query and the value up-projection into the
  output, so attention runs directly against the latent cache (what decoding stores).

Both give the same result; a test checks it.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from lit_deepseek.config import MLAConfig
from lit_deepseek.kernels.eager import project_siblings
from lit_deepseek.kernels.mla_rope import assemble_qk
from lit_deepseek.model.norm import RMSNorm
from lit_deepseek.model.rope import apply_rotary, softmax_scale

#: SDPA backends in priority order for causal training attention on CUDA. cuDNN comes first: the
#: flash backend refuses q/k and v head dims that differ (MLA's 96/64, 192/128), which otherwise
#: leaves the slower memory-efficient kernel. Set PREFER_CUDNN_ATTENTION = False for PyTorch's choice.
CUDA_SDPA_BACKENDS = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                      SDPBackend.MATH]
PREFER_CUDNN_ATTENTION = True
_HAS_SET_PRIORITY = "set_priority" in inspect.signature(sdpa_kernel).parameters

#: epsilon of the two latent norms (fixed in DeepSeek's and Hugging Face's implementations)
LATENT_NORM_EPS = 1e-6


@dataclass
class LatentKVCache:
    """Per-layer decoding cache: the normed KV latent and the rotated shared key of each position."""

    kv_latent: Tensor  # [B, T_max, d_latent]
    k_rope: Tensor  # [B, T_max, qk_rope_head_dim]
    length: int = 0

    @classmethod
    def empty(cls, mla: MLAConfig, batch: int, max_length: int, device: torch.device | str | None = None,
              dtype: torch.dtype = torch.float32) -> LatentKVCache:
        return cls(torch.zeros(batch, max_length, mla.d_latent, device=device, dtype=dtype),
                   torch.zeros(batch, max_length, mla.qk_rope_head_dim, device=device, dtype=dtype))


class MultiHeadLatentAttention(nn.Module):
    """MLA with decoupled RoPE; parameter names follow DeepSeek's checkpoint layout."""

    def __init__(self, mla: MLAConfig) -> None:
        super().__init__()
        self.mla = mla
        d, h = mla.d_model, mla.num_heads
        self.qk_nope_head_dim, self.qk_rope_head_dim = mla.qk_nope_head_dim, mla.qk_rope_head_dim
        self.v_head_dim, self.d_latent = mla.v_head_dim, mla.d_latent
        if mla.d_q_latent > 0:
            self.q_a_proj = nn.Linear(d, mla.d_q_latent, bias=False)
            self.q_a_layernorm = RMSNorm(mla.d_q_latent, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(mla.d_q_latent, h * mla.qk_head_dim, bias=False)
        else:
            self.q_proj = nn.Linear(d, h * mla.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d, mla.d_latent + mla.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(mla.d_latent, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(mla.d_latent, h * (mla.qk_nope_head_dim + mla.v_head_dim), bias=False)
        self.o_proj = nn.Linear(h * mla.v_head_dim, d, bias=False)
        self.softmax_scale = softmax_scale(mla)

    # ------------------------------------------------------------------ pieces
    def _projections(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per-head queries [B, S, H, nope + R] (rotary part not yet rotated), the normed KV latent
        [B, S, d_latent] and the shared rotary key [B, S, R] (not yet rotated). The query and KV
        down-projections share their input: one GEMM in eager CUDA steps (`project_siblings`)."""
        b, s, _ = x.shape
        if self.mla.d_q_latent > 0:
            q_latent, kv = project_siblings(x, self.q_a_proj, self.kv_a_proj_with_mqa)
            q = self.q_b_proj(self.q_a_layernorm(q_latent, for_matmul=True))
        else:
            q, kv = project_siblings(x, self.q_proj, self.kv_a_proj_with_mqa)
        kv_latent, k_rope = kv.split([self.d_latent, self.qk_rope_head_dim], dim=-1)
        # -1: the heads this module holds (all of them, or this rank's share under tensor parallelism)
        q = q.view(b, s, -1, self.qk_nope_head_dim + self.qk_rope_head_dim)
        return q, self.kv_a_layernorm(kv_latent, for_matmul=True), k_rope

    def _rotated(self, q: Tensor, k_rope: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(q_nope, rotated q_rope, rotated shared key [B, S, R]) for the absorbed and cached forms."""
        q_nope, q_rope = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        return q_nope, apply_rotary(q_rope, cos, sin), _rotated_key(k_rope, cos, sin)

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None = None,
                cache: Any = None, absorb: bool = False) -> Tensor:
        """x [B, S, D]; cos/sin [1 or B, S, R/2] for the absolute positions of x; mask [B, 1, S, S_kv]
        bool (True = attend) or None for causal. With a cache, x's latents are appended to it and
        attention covers everything cached so far (absorbed form)."""
        q, kv_latent, k_rope = self._projections(x)
        if cache is None and not absorb:
            return self._decompressed(q, kv_latent, k_rope, cos, sin, mask)
        if cache is not None and not isinstance(cache, LatentKVCache) and cache.is_prefill:
            # a paged cache's prefill (nothing cached before the chunk): the training form over the chunk
            cache.write(kv_latent, _rotated_key(k_rope, cos, sin))
            return self._decompressed(q, kv_latent, k_rope, cos, sin, None)
        q_nope, q_rope, k_rope = self._rotated(q, k_rope, cos, sin)
        if isinstance(cache, LatentKVCache):
            start, end = cache.length, cache.length + x.shape[1]
            cache.kv_latent[:, start:end] = kv_latent.to(cache.kv_latent.dtype)
            cache.k_rope[:, start:end] = k_rope.to(cache.k_rope.dtype)
            cache.length = end
            kv_latent = cache.kv_latent[:, :end].to(x.dtype)
            k_rope = cache.k_rope[:, :end].to(x.dtype)
            if mask is None and x.shape[1] > 1:
                mask = _causal_mask(x.shape[1], end, x.device)
            return self._absorbed(q_nope, q_rope, kv_latent, k_rope, mask)
        if cache is not None:  # a paged cache (lit_deepseek.model.paged_cache), past its prefill
            cache.write(kv_latent, k_rope)
            return self._latent_output(cache.attend(self._absorb_query(q_nope), q_rope, self.softmax_scale))
        if mask is None:
            mask = _causal_mask(x.shape[1], x.shape[1], x.device)
        return self._absorbed(q_nope, q_rope, kv_latent, k_rope, mask)

    def _decompressed(self, q: Tensor, kv_latent: Tensor, k_rope: Tensor, cos: Tensor, sin: Tensor,
                      mask: Tensor | None) -> Tensor:
        """The training form: per-head keys and values decompressed from the latent, queries and keys
        assembled with their rotary parts (`assemble_qk`: one Triton kernel each way in eager CUDA
        steps), then `scaled_dot_product_attention`."""
        b, s, h, _ = q.shape
        kv = self.kv_b_proj(kv_latent).view(b, s, h, self.qk_nope_head_dim + self.v_head_dim)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        q, k = assemble_qk(q, k_nope, k_rope, cos, sin)
        out = _sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, self.softmax_scale)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, h * self.v_head_dim))

    def _absorbed(self, q_nope: Tensor, q_rope: Tensor, kv_latent: Tensor, k_rope: Tensor,
                  mask: Tensor | None) -> Tensor:
        out_latent = latent_attention(self._absorb_query(q_nope), q_rope, kv_latent, k_rope, mask, self.softmax_scale)
        return self._latent_output(out_latent)

    def _up_weights(self) -> tuple[Tensor, Tensor]:
        """(W_UK [H, nope, C], W_UV [H, v, C]) views of kv_b_proj (H: the heads this module holds)."""
        w = self.kv_b_proj.weight.view(-1, self.qk_nope_head_dim + self.v_head_dim, self.d_latent)
        return w[:, : self.qk_nope_head_dim], w[:, self.qk_nope_head_dim:]

    def _absorb_query(self, q_nope: Tensor) -> Tensor:
        """q_nope [B, S, H, nope] -> the query in latent space [B, S, H, C] (W_UK folded in)."""
        return torch.einsum("bshn,hnc->bshc", q_nope, self._up_weights()[0])

    def _latent_output(self, out_latent: Tensor) -> Tensor:
        """Attention output in latent space [B, S, H, C] -> W_UV per head -> o_proj."""
        b, s, h, _ = out_latent.shape
        out = torch.einsum("bshc,hvc->bshv", out_latent.to(self.kv_b_proj.weight.dtype), self._up_weights()[1])
        return self.o_proj(out.reshape(b, s, h * self.v_head_dim))


def _rotated_key(k_rope: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """The shared rotary key [B, S, R], rotated."""
    return apply_rotary(k_rope.unsqueeze(2), cos, sin).squeeze(2)


def latent_attention(q_latent: Tensor, q_rope: Tensor, kv_latent: Tensor, k_rope: Tensor, mask: Tensor | None,
                     scale: float) -> Tensor:
    """Attention against the latent cache (the reference for the decode kernels).

    q_latent [B, S, H, C], q_rope [B, S, H, R], kv_latent [B, T, C], k_rope [B, T, R], mask
    broadcastable to [B, H, S, T] (True = attend) -> the probability-weighted latents [B, S, H, C].
    """
    scores = (torch.einsum("bshc,btc->bhst", q_latent, kv_latent)
              + torch.einsum("bshr,btr->bhst", q_rope, k_rope)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.float().softmax(dim=-1).to(q_latent.dtype)
    return torch.einsum("bhst,btc->bshc", probs, kv_latent)


def _sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    """scaled_dot_product_attention, with the cuDNN backend preferred for causal CUDA attention."""
    if PREFER_CUDNN_ATTENTION and _HAS_SET_PRIORITY and mask is None and q.is_cuda:
        with sdpa_kernel(CUDA_SDPA_BACKENDS, set_priority=True):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale)


def _causal_mask(q_len: int, kv_len: int, device: torch.device) -> Tensor:
    """[1, 1, q_len, kv_len] bool: query i (at absolute position kv_len - q_len + i) sees keys <= it."""
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    return (torch.arange(kv_len, device=device)[None, :] <= q_pos)[None, None]


def document_mask(doc_ids: Tensor) -> Tensor:
    """[B, 1, S, S] bool: causal and within the same document id."""
    s = doc_ids.shape[1]
    same = doc_ids[:, :, None] == doc_ids[:, None, :]
    causal = torch.ones(s, s, dtype=torch.bool, device=doc_ids.device).tril()
    return (same & causal)[:, None]
