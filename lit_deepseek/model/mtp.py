"""Multi-token prediction modules (DeepSeek-V3 report, section 2.2, eqs. 21-25).

Module k combines the previous depth's representation of token i with the embedding of token
i+k: eh_proj([enorm(emb(t_{i+k})); hnorm(h^{k-1}_i)]) (embedding first, the order of DeepSeek's
released MTP weights), runs one transformer block and its own final norm; the embedding and the
output head are shared with the main model. The block is built by the caller (`DeepSeekV3`), so
this module does not depend on the transformer module.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lit_deepseek.config import ModelConfig
from lit_deepseek.model.norm import RMSNorm


class MTPModule(nn.Module):
    """One MTP depth: two norms, the concatenation projection, a block and a final norm."""

    def __init__(self, cfg: ModelConfig, block: nn.Module) -> None:
        super().__init__()
        d = cfg.mla.d_model
        self.enorm = RMSNorm(d, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(d, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * d, d, bias=False)
        self.block = block
        self.norm = RMSNorm(d, cfg.rms_norm_eps)

    def forward(self, h: Tensor, next_embeds: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None,
                cache: Any = None) -> Tensor:
        """h [B, S, D] previous depth, next_embeds [B, S, D] embeddings of the tokens k ahead ->
        the normed representation [B, S, D] (also the next depth's input). `cache`: the block's
        decoding cache (a layer of a `PagedLatentCache`) when drafting tokens during generation."""
        # the block's residual stream in the main blocks' dtype (the embeddings'): under mixed
        # precision float32 (eh_proj's autocast output is bf16), so the MTP block is numerically
        # the main blocks' kind and reuses their compiled graph instead of compiling its own
        x = self.eh_proj(torch.cat((self.enorm(next_embeds), self.hnorm(h)), dim=-1)).to(next_embeds.dtype)
        return self.norm(self.block(x, cos, sin, mask, cache=cache))
