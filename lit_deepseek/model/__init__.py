"""The DeepSeek-V3 model (MLA + DeepSeekMoE + MTP) in plain PyTorch."""

from lit_deepseek.model.attention import LatentKVCache, MultiHeadLatentAttention
from lit_deepseek.model.dispatch import LocalDispatcher, TokenDispatcher
from lit_deepseek.model.moe import GroupedExperts, MoE, SwiGLU
from lit_deepseek.model.mtp import MTPModule
from lit_deepseek.model.norm import RMSNorm
from lit_deepseek.model.transformer import Block, DeepSeekV3

__all__ = ["Block", "DeepSeekV3", "GroupedExperts", "LatentKVCache", "LocalDispatcher", "MoE", "MTPModule",
           "MultiHeadLatentAttention", "RMSNorm", "SwiGLU", "TokenDispatcher"]
