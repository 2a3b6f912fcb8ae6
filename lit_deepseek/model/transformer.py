"""The DeepSeek-V3 model: embedding, MLA + (dense | MoE) blocks, final norm, output head, MTP.

Pure single-device PyTorch; parallelism is applied from outside. `layers` is a ModuleDict keyed by
the global layer index so a pipeline stage can delete blocks and keep parameter names; `embed`,
`norm` and `head` may be set to None on stages that do not hold them.
"""

from __future__ import annotations

import zlib

import torch
from torch import Tensor, nn

from lit_deepseek.config import ModelConfig
from lit_deepseek.model.attention import LatentKVCache, MultiHeadLatentAttention, document_mask
from lit_deepseek.model.dispatch import TokenDispatcher
from lit_deepseek.model.moe import MoE, SwiGLU
from lit_deepseek.model.mtp import MTPModule
from lit_deepseek.model.norm import RMSNorm
from lit_deepseek.model.paged_cache import PagedLatentCache
from lit_deepseek.model.rope import RotaryEmbedding


class Block(nn.Module):
    """Pre-norm block: x + MLA(norm(x)), then + FFN(norm(.)) with a dense or MoE FFN."""

    def __init__(self, cfg: ModelConfig, layer_index: int, dispatcher: TokenDispatcher | None = None) -> None:
        super().__init__()
        d = cfg.mla.d_model
        self.layer_index = layer_index
        self.attn_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.attn = MultiHeadLatentAttention(cfg.mla)
        self.ffn_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.ffn: nn.Module = (MoE(cfg, dispatcher) if layer_index >= cfg.first_dense_layers
                               else SwiGLU(d, cfg.dense_intermediate_size))

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None = None,
                cache: LatentKVCache | PagedLatentCache | None = None, absorb: bool = False) -> Tensor:
        # the attention's input and a dense FFN's feed matmuls only; the router reads its input in float32
        x = x + self.attn(self.attn_norm(x, for_matmul=True), cos, sin, mask, cache=cache, absorb=absorb)
        return x + self.ffn(self.ffn_norm(x, for_matmul=isinstance(self.ffn, SwiGLU)))


class DeepSeekV3(nn.Module):
    """DeepSeek-V3: main model plus `mtp_depth` multi-token prediction modules."""

    def __init__(self, cfg: ModelConfig, dispatcher: TokenDispatcher | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        target = torch.get_default_device()
        # Build on meta and initialise once, so the result depends only on the RNG state (not on
        # the default initialisers of nn.Linear) and meta-built + init_weights gives the same weights.
        with torch.device("meta"):
            self._build(cfg, dispatcher)
        if target.type != "meta":
            self.to_empty(device=target)
            self.init_weights()

    def _build(self, cfg: ModelConfig, dispatcher: TokenDispatcher | None) -> None:
        d = cfg.mla.d_model
        self.embed: nn.Embedding | None = nn.Embedding(cfg.vocab_size, d)
        self.rope = RotaryEmbedding(cfg.mla)
        self.layers = nn.ModuleDict({str(i): Block(cfg, i, dispatcher) for i in range(cfg.num_layers)})
        self.norm: RMSNorm | None = RMSNorm(d, cfg.rms_norm_eps)
        self.head: nn.Linear | None = nn.Linear(d, cfg.vocab_size, bias=False)
        self.tie_weights()
        self.mtp = nn.ModuleList(MTPModule(cfg, Block(cfg, cfg.num_layers + k, dispatcher)) for k in range(cfg.mtp_depth))

    # ------------------------------------------------------------------ services
    def moe_layers(self) -> list[MoE]:
        """MoE modules of the main blocks (by layer index), then of the MTP blocks."""
        blocks = [self.layers[k] for k in sorted(self.layers.keys(), key=int)] + [m.block for m in self.mtp]
        return [b.ffn for b in blocks if isinstance(b.ffn, MoE)]

    def tie_weights(self) -> None:
        """Share the embedding with the head when configured (again after to_empty, which unties)."""
        if self.cfg.tie_word_embeddings and self.embed is not None and self.head is not None:
            self.head.weight = self.embed.weight

    def set_dispatcher(self, dispatcher: TokenDispatcher) -> None:
        for moe in self.moe_layers():
            moe.dispatcher = dispatcher

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Initialise every parameter and buffer: normal(0, init_std) for matrices and embeddings,
        ones for norms, zeros for the router bias and statistics, fresh RoPE tables.

        Each tensor draws from its own generator seeded by (seed, parameter name) and each routed
        expert by its global id, so the result does not depend on which layers or experts this
        process holds. seed=None draws the base seed from torch's global RNG.
        """
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        self.tie_weights()
        std = self.cfg.init_std
        for module in self.modules():
            if isinstance(module, RMSNorm):
                module.reset_parameters()
            elif isinstance(module, RotaryEmbedding):
                module.reset_parameters()
            elif isinstance(module, MoE):
                module.expert_bias.zero_()
                module.reset_stats()
        for name, param in self.named_parameters():
            if param.dim() < 2:  # norm gains, set above
                continue
            if name.split(".")[-1] in ("w1", "w2", "w3"):
                module = self.get_submodule(name.rsplit(".", 1)[0])
                for local in range(param.shape[0]):
                    gen = _generator(seed, f"{name}[{module.expert_start + local}]", param.device)
                    param[local].normal_(0.0, std, generator=gen)
            else:
                param.normal_(0.0, std, generator=_generator(seed, name, param.device))

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: Tensor, doc_ids: Tensor | None = None, return_hidden: bool = False,
                hidden_states: Tensor | None = None, caches: list[LatentKVCache] | PagedLatentCache | None = None,
                absorb: bool = False) -> Tensor | tuple[Tensor, list[Tensor]]:
        """input_ids [B, S] -> logits [B, S, V] (or, return_hidden, (normed h, MTP hiddens)).

        On a pipeline stage without `embed`, pass the incoming hidden states [B, S, D] either as
        input_ids or as hidden_states (then input_ids still feeds the MTP embeddings). doc_ids
        [B, S] restricts attention to tokens of the same document. caches (one per held layer,
        in layer order) switch to incremental decoding with the latent cache (absorbed form); a
        `PagedLatentCache` does the same with a length per sequence (its owner advances it).
        """
        if hidden_states is not None:
            x = hidden_states
        elif self.embed is None:
            x, input_ids = input_ids, None
        else:
            x = self.embed(input_ids)
        # token ids give the full length even when x holds a sequence shard (sequence parallelism)
        b, s = (input_ids if input_ids is not None else x).shape[:2]
        if caches is not None and not isinstance(caches, (list, tuple)):  # a PagedLatentCache
            positions = caches.positions(s)  # [B, S]: each sequence continues at its own length
            end = caches.max_length() + s
        else:
            start = caches[0].length if caches else 0
            positions, end = torch.arange(start, start + s, device=x.device)[None], start + s
        if end > self.cfg.mla.max_context_length:
            raise ValueError(f"sequence of {end} tokens exceeds model.mla.max_context_length "
                             f"({self.cfg.mla.max_context_length})")
        cos, sin = self.rope(positions)
        mask = document_mask(doc_ids) if doc_ids is not None else None
        if caches is not None and mask is not None:
            raise ValueError("doc_ids is not supported together with a decoding cache")

        for i, key in enumerate(sorted(self.layers.keys(), key=int)):
            cache = caches[i] if caches is not None else None
            x = self.layers[key](x, cos, sin, mask, cache=cache, absorb=absorb)
        h = self.norm(x) if self.norm is not None else x

        mtp_hiddens: list[Tensor] = []
        if len(self.mtp) and return_hidden and caches is None:
            if input_ids is None or self.embed is None:
                raise ValueError("MTP needs token ids and the shared embedding on this stage")
            prev = h
            for k, module in enumerate(self.mtp, start=1):
                ahead = torch.cat((input_ids[:, k:], input_ids[:, :1].expand(b, min(k, s))), dim=1)[:, :s]
                prev = module(prev, self.embed(ahead), cos, sin, mask)
                mtp_hiddens.append(prev)
        if return_hidden:
            return h, mtp_hiddens
        if self.head is None:
            return h
        return self.head(h)


def _generator(seed: int, name: str, device: torch.device) -> torch.Generator:
    """A generator on the tensor's own device (weights are drawn where they live, never staged in
    host memory), seeded by (seed, name). CPU and CUDA streams differ; a layout does not matter."""
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
