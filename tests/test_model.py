"""The DeepSeek-V3 model: forward, gradients, routing, MTP, initialisation and parity with transformers."""

from __future__ import annotations

import torch
from conftest import tiny_model_config

from lit_deepseek.model import DeepSeekV3


def _tokens(cfg, batch: int = 2, seq: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))


def test_forward_shapes_and_gradients_reach_every_parameter(tiny_config):
    torch.manual_seed(0)
    model = DeepSeekV3(tiny_config)
    ids = _tokens(tiny_config, batch=4, seq=32)
    logits = model(ids)
    assert logits.shape == (4, 32, tiny_config.vocab_size)
    h, mtp_hiddens = model(ids, return_hidden=True)
    assert h.shape == (4, 32, tiny_config.mla.d_model) and len(mtp_hiddens) == tiny_config.mtp_depth
    loss = torch.nn.functional.cross_entropy(model.head(h)[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    for x in mtp_hiddens:
        loss = loss + model.head(x).float().logsumexp(-1).mean()
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []
    assert all(not b.requires_grad for n, b in model.named_buffers() if n.endswith("expert_bias"))
    assert "layers.1.ffn.expert_bias" in model.state_dict()


def test_forward_without_mtp_or_query_latent():
    cfg = tiny_model_config(mtp_depth=0, **{"mla.d_q_latent": 0, "moe.num_expert_groups": 1,
                                            "moe.num_limited_groups": 1})
    torch.manual_seed(0)
    model = DeepSeekV3(cfg)
    h, mtp_hiddens = model(_tokens(cfg), return_hidden=True)
    assert mtp_hiddens == [] and len(model.mtp) == 0
    assert hasattr(model.layers["0"].attn, "q_proj")
