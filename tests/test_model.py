"""The DeepSeek-V3 model: forward, gradients, routing, MTP, initialisation and parity with transformers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model_config

from lit_deepseek.config import DeepSeekConfig
from lit_deepseek.model import DeepSeekV3, LatentKVCache, LocalDispatcher
from lit_deepseek.model.moe import MoE, _grouped_mm_fn


def _tokens(cfg, batch: int = 2, seq: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _model(cfg, seed: int = 0) -> DeepSeekV3:
    torch.manual_seed(seed)
    return DeepSeekV3(cfg)


# ------------------------------------------------------------------------------------------ basics


def test_forward_shapes_and_gradients_reach_every_parameter(tiny_config):
    model = _model(tiny_config)
    ids = _tokens(tiny_config, batch=4, seq=32)
    logits = model(ids)
    assert logits.shape == (4, 32, tiny_config.vocab_size)
    h, mtp_hiddens = model(ids, return_hidden=True)
    assert h.shape == (4, 32, tiny_config.mla.d_model) and len(mtp_hiddens) == tiny_config.mtp_depth
    loss = F.cross_entropy(model.head(h)[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    for x in mtp_hiddens:
        loss = loss + model.head(x).float().logsumexp(-1).mean()
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []
    assert all(not b.requires_grad for n, b in model.named_buffers() if n.endswith("expert_bias"))
    assert "layers.1.ffn.expert_bias" in model.state_dict()
    assert "layers.1.ffn.expert_load" not in model.state_dict()


def test_forward_without_mtp_or_query_latent():
    cfg = tiny_model_config(mtp_depth=0, **{"mla.d_q_latent": 0, "moe.num_expert_groups": 1,
                                            "moe.num_limited_groups": 1})
    model = _model(cfg)
    h, mtp_hiddens = model(_tokens(cfg), return_hidden=True)
    assert mtp_hiddens == [] and len(model.mtp) == 0
    assert hasattr(model.layers["0"].attn, "q_proj")


def test_mtp_module_k_sees_token_i_plus_k(tiny_config):
    """MTP hidden at position i depends on token i+1 (depth 1); the main model's h does not."""
    model = _model(tiny_config).eval()
    ids = _tokens(tiny_config, seq=12)
    changed = ids.clone()
    changed[:, 7] = (changed[:, 7] + 1) % tiny_config.vocab_size
    with torch.no_grad():
        h_a, (m_a,) = model(ids, return_hidden=True)
        h_b, (m_b,) = model(changed, return_hidden=True)
    # equal up to rounding: expert matmuls see a different number of rows when one token changes
    torch.testing.assert_close(h_a[:, :7], h_b[:, :7], rtol=0, atol=1e-5)
    torch.testing.assert_close(m_a[:, :6], m_b[:, :6], rtol=0, atol=1e-5)
    assert (m_a[:, 6] - m_b[:, 6]).abs().max() > 1e-2


def test_document_mask_equals_separate_sequences(tiny_config):
    model = _model(tiny_config).eval()
    a, b = _tokens(tiny_config, batch=1, seq=5, seed=1), _tokens(tiny_config, batch=1, seq=7, seed=2)
    packed = torch.cat((a, b), dim=1)
    doc_ids = torch.tensor([[0] * 5 + [1] * 7])
    with torch.no_grad():
        out = model(packed, doc_ids=doc_ids)
        first = model(a)
        causal = model(packed)
    # the first document is at positions 0..4 either way; the second only matches up to RoPE offset
    torch.testing.assert_close(out[:, :5], first, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out[:, 5:], causal[:, 5:], atol=1e-4)
    torch.testing.assert_close(out[:, :5], causal[:, :5], rtol=1e-5, atol=1e-5)


def test_pipeline_stage_subsets_compose_to_the_full_model(tiny_config):
    full = _model(tiny_config).eval()
    ids = _tokens(tiny_config)
    first, last = _model(tiny_config).eval(), _model(tiny_config).eval()
    del first.layers["2"]
    first.norm, first.head = None, None
    del last.layers["0"], last.layers["1"]
    with torch.no_grad():
        expected_h, expected_mtp = full(ids, return_hidden=True)
        hidden = first(ids, return_hidden=True)[0]
        h, mtp_h = last(ids, hidden_states=hidden, return_hidden=True)
        last.embed = None
        logits = last(hidden)
    torch.testing.assert_close(h, expected_h)
    torch.testing.assert_close(mtp_h[0], expected_mtp[0])
    torch.testing.assert_close(logits, full(ids))


# ------------------------------------------------------------------------------------------ MLA forms


@pytest.mark.parametrize("q_latent", [24, 0])
def test_absorbed_form_equals_training_form(q_latent):
    cfg = tiny_model_config(**{"mla.d_q_latent": q_latent, "mla.rope_factor": 4.0,
                               "mla.rope_original_context_length": 16})
    model = _model(cfg).eval()
    ids = _tokens(cfg, seq=20)
    with torch.no_grad():
        expected = model(ids)
        absorbed = model(ids, absorb=True)
        # incremental decoding: a prompt, then one token at a time against the latent cache
        caches = [LatentKVCache.empty(cfg.mla, 2, 32) for _ in model.layers]
        steps = [model(ids[:, :8], caches=caches)]
        steps += [model(ids[:, t:t + 1], caches=caches) for t in range(8, 20)]
    assert _rel(absorbed, expected) < 1e-5
    assert _rel(torch.cat(steps, dim=1), expected) < 1e-5


# ------------------------------------------------------------------------------------------ MoE


def _moe(cfg, seed: int = 0) -> MoE:
    return _model(cfg, seed).layers["1"].ffn


def test_grouped_gemm_matches_reference_on_cpu(tiny_config):
    if _grouped_mm_fn() is None:
        pytest.skip("this torch has no grouped_mm")
    moe = _moe(tiny_config)
    x = torch.randn(64, tiny_config.mla.d_model)
    counts = torch.tensor([10, 0, 5, 20, 3, 0, 16, 10])
    ref = moe.experts(x, counts, use_grouped_mm=False)
    try:
        grouped = moe.experts(x, counts, use_grouped_mm=True)
    except RuntimeError as exc:  # CPU grouped_mm support varies between torch releases
        pytest.skip(f"grouped_mm unsupported on CPU here: {exc}")
    torch.testing.assert_close(grouped, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_grouped_gemm_matches_reference_on_gpu():
    cfg = tiny_model_config(**{"mla.d_model": 128, "moe.expert_intermediate_size": 64})
    moe = _moe(cfg).cuda().to(torch.bfloat16)
    x = torch.randn(256, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    counts = torch.tensor([40, 0, 16, 72, 8, 0, 64, 56], device="cuda")
    ref = moe.experts(x, counts, use_grouped_mm=False)
    grouped = moe.experts(x, counts, use_grouped_mm=True)
    torch.testing.assert_close(grouped, ref, rtol=2e-2, atol=2e-2)
    grouped.float().square().sum().backward()
    assert moe.experts.w1.grad is not None and torch.isfinite(moe.experts.w1.grad).all()


def test_routing_follows_the_report(tiny_config):
    """Selection uses bias-corrected scores limited to the best groups; weights use raw scores."""
    moe = _moe(tiny_config)
    moe.expert_bias.copy_(torch.linspace(-0.5, 0.5, 8))
    x = torch.randn(50, tiny_config.mla.d_model)
    weights, ids, scores = moe.route(x)
    e, groups, per_group = 8, 4, 2
    choice = scores + moe.expert_bias
    group_scores = choice.view(-1, groups, per_group).topk(2, dim=-1).values.sum(-1)
    allowed = group_scores.topk(2, dim=-1).indices
    for t in range(x.shape[0]):
        chosen_groups = set((ids[t] // per_group).tolist())
        assert chosen_groups <= set(allowed[t].tolist())
        masked = choice[t].clone()
        for g in range(groups):
            if g not in allowed[t]:
                masked[g * per_group:(g + 1) * per_group] = -math.inf
        assert set(ids[t].tolist()) == set(masked.topk(2).indices.tolist())
        raw = scores[t, ids[t]]
        torch.testing.assert_close(weights[t], raw / raw.sum() * 2.5)
    assert e == moe.num_experts


def test_update_bias_moves_towards_balance(tiny_config):
    moe = _moe(tiny_config)
    load = torch.tensor([10.0, 0, 6, 4, 5, 5, 5, 5])
    moe.update_bias(load, speed=0.01)
    # mean load 5: experts above it lose 0.01, experts below it gain 0.01, the rest stay
    torch.testing.assert_close(moe.expert_bias, torch.tensor([-0.01, 0.01, -0.01, 0.01, 0, 0, 0, 0]))


def test_balance_loss_gradient_is_injected_without_changing_the_output(tiny_config):
    moe = _moe(tiny_config).train()
    moe.moe.router_aux_loss_weight = 0.5
    moe.aux_loss_grad_scale = 0.25
    x = torch.randn(2, 10, tiny_config.mla.d_model)
    out = moe(x)
    moe.eval()
    torch.testing.assert_close(out, moe(x))
    moe.train()
    (out.sum()).backward()
    injected = moe.gate_weight.grad.clone()
    moe.zero_grad()
    weights, ids, scores = moe.route(x.reshape(-1, x.shape[-1]))
    expected_aux = moe.balance_loss(scores, ids, batch=2)
    torch.testing.assert_close(moe.last_aux_loss, expected_aux.detach())
    moe.moe.router_aux_loss_weight = 0.0
    (moe(x).sum() + 0.25 * expected_aux).backward()
    torch.testing.assert_close(injected, moe.gate_weight.grad)


def test_balance_loss_matches_report_formula(tiny_config):
    moe = _moe(tiny_config)
    scores = torch.rand(2 * 6, 8)
    ids = torch.stack([torch.randperm(8)[:2] for _ in range(12)])
    loss = moe.balance_loss(scores, ids, batch=2)
    expected = 0.0
    for b in range(2):
        s, i = scores[b * 6:(b + 1) * 6], ids[b * 6:(b + 1) * 6]
        f = torch.tensor([(i == e).sum().item() for e in range(8)]) * 8 / (2 * 6)
        p = (s / s.sum(-1, keepdim=True)).mean(0)
        expected += moe.moe.router_aux_loss_weight * (f * p).sum() / 2
    assert loss.item() == pytest.approx(float(expected), rel=1e-5)


def test_capacity_drops_lowest_weight_copies_and_counts_loads(tiny_config):
    moe = _moe(tiny_config).eval()
    x = torch.randn(1, 64, tiny_config.mla.d_model)
    dropless = moe(x)
    load_dropless = moe.expert_load.clone()
    moe.reset_stats()
    moe.moe.capacity_factor = 100.0
    torch.testing.assert_close(moe(x), dropless)
    assert moe.last_drop_rate.item() == 0.0
    moe.reset_stats()
    moe.moe.capacity_factor = 0.5
    dropped_out = moe(x)
    torch.testing.assert_close(moe.expert_load, load_dropless)  # counted before dropping
    capacity = math.ceil(0.5 * 64 * 2 / 8)
    expected_dropped = (load_dropless - capacity).clamp(min=0).sum()
    assert moe.dropped_tokens.item() == expected_dropped.item()
    assert moe.last_drop_rate.item() == pytest.approx(expected_dropped.item() / 128)
    assert moe.routed_tokens.item() == 128
    # a token whose copies were all dropped keeps its residual path: only the shared experts' output
    weights, ids, _ = moe.route(x.view(-1, x.shape[-1]))
    counts = torch.bincount(ids.view(-1), minlength=8)
    order, _ = moe._capacity_order(ids.view(-1), weights.view(-1), counts)
    kept_tokens = set((order // 2).tolist())
    lost = [t for t in range(64) if t not in kept_tokens]
    assert lost, "capacity 0.5 should drop every copy of some token"
    torch.testing.assert_close(dropped_out[0, lost], moe.shared_experts(x[0, lost]))


def test_capacity_keeps_the_highest_weights(tiny_config):
    moe = _moe(tiny_config)
    moe.moe.capacity_factor = 0.25
    flat_ids = torch.tensor([0, 0, 0, 0, 1, 1, 2, 3])
    flat_weights = torch.tensor([0.1, 0.9, 0.5, 0.7, 0.2, 0.3, 0.4, 0.6])
    counts = torch.bincount(flat_ids, minlength=8)
    order, kept = moe._capacity_order(flat_ids, flat_weights, counts)  # capacity ceil(0.25 * 8 / 8) = 1
    assert kept.tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    assert order.tolist() == [1, 5, 6, 7]


def test_expert_load_not_double_counted_under_activation_checkpointing(tiny_config):
    moe = _moe(tiny_config).train()
    x = torch.randn(1, 16, tiny_config.mla.d_model, requires_grad=True)
    torch.utils.checkpoint.checkpoint(moe, x, use_reentrant=False).sum().backward()
    assert moe.expert_load.sum().item() == 16 * 2


def test_dispatcher_swap_and_expert_sharding(tiny_config):
    model = _model(tiny_config)

    class HalfDispatcher(LocalDispatcher):
        """Pretends to be rank 1 of 2 but routes nothing remote (checks the interface contract)."""

        ep_size, ep_rank = 2, 1

    model.set_dispatcher(HalfDispatcher())
    moe = model.moe_layers()[0]
    w1 = moe.experts.w1.detach().clone()
    with pytest.raises(RuntimeError, match="shard_experts"):
        model(_tokens(tiny_config))
    moe.shard_experts(4, 8)
    assert moe.experts.w1.shape[0] == 4 and torch.equal(moe.experts.w1, w1[4:])
    assert moe.experts.expert_start == 4 and moe.dispatcher is model.moe_layers()[1].dispatcher


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_bf16_training_step_has_no_host_sync_in_the_dropless_path():
    cfg = tiny_model_config(**{"mla.d_model": 128, "moe.expert_intermediate_size": 64, "mla.num_heads": 4,
                               "mla.qk_nope_head_dim": 128, "mla.qk_rope_head_dim": 64, "mla.v_head_dim": 128})
    model = _model(cfg).cuda().to(torch.bfloat16).train()
    ids = _tokens(cfg, batch=2, seq=64).cuda()
    model(ids)  # warm-up (lazy initialisation may synchronise)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        h, mtp_hiddens = model(ids, return_hidden=True)
        (model.head(h).float().logsumexp(-1).mean() + mtp_hiddens[0].float().square().mean()).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(p.grad is not None for p in model.parameters())
    assert model.moe_layers()[0].expert_load.sum().item() == 2 * (2 * 64 * 2)  # warm-up + step


# ------------------------------------------------------------------------------------------ init


def test_meta_init_equals_normal_init_and_is_seeded(tiny_config):
    torch.manual_seed(123)
    normal = DeepSeekV3(tiny_config)
    with torch.device("meta"):
        meta = DeepSeekV3(tiny_config)
    meta.to_empty(device="cpu")
    torch.manual_seed(123)
    meta.init_weights()
    a, b = normal.state_dict(), meta.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for n, buf in meta.named_buffers():  # non-persistent buffers too (RoPE tables, statistics)
        assert torch.equal(buf, dict(normal.named_buffers())[n]), n
    assert all((m.expert_bias == 0).all() for m in meta.moe_layers())
    w = meta.layers["1"].attn.kv_b_proj.weight
    assert abs(w.std().item() - tiny_config.init_std) < 0.2 * tiny_config.init_std
    meta.init_weights(seed=5)
    again = DeepSeekV3(tiny_config)
    again.init_weights(seed=5)
    assert all(torch.equal(x, y) for x, y in zip(meta.state_dict().values(), again.state_dict().values(), strict=True))
    assert not torch.equal(meta.embed.weight, normal.embed.weight)


def test_sharded_experts_initialise_like_the_full_layer(tiny_config):
    full = DeepSeekV3(tiny_config)
    full.init_weights(seed=3)
    part = DeepSeekV3(tiny_config)
    part.moe_layers()[0].shard_experts(2, 6)
    part.init_weights(seed=3)
    assert torch.equal(part.moe_layers()[0].experts.w2, full.moe_layers()[0].experts.w2[2:6])


@pytest.mark.parametrize("overrides", [
    {},
    {"mla.d_q_latent": 0, "first_dense_layers": 0, "mtp_depth": 2},
    {"tie_word_embeddings": True, "moe.num_shared_experts": 2, "first_dense_layers": 3, "mtp_depth": 0},
])
def test_parameter_count_matches_config(overrides):
    cfg = tiny_model_config(**overrides)
    model = DeepSeekV3(cfg)
    run = DeepSeekConfig(model=cfg)
    main = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("mtp."))
    mtp = sum(p.numel() for n, p in model.named_parameters() if n.startswith("mtp."))
    main_bias = sum(b.ffn.expert_bias.numel() for b in model.layers.values() if isinstance(b.ffn, MoE))
    mtp_bias = sum(m.block.ffn.expert_bias.numel() for m in model.mtp if isinstance(m.block.ffn, MoE))
    assert main + main_bias == run.total_params()
    assert mtp + mtp_bias == run.mtp_params()


# ------------------------------------------------------------------------------------------ parity


PARITY_CASES = {
    "q-latent, groups, dense-first, sigmoid": ({}, "deepseek_v3"),
    "no q-latent": ({"mla.d_q_latent": 0}, "deepseek_v3"),
    "no groups, no dense layer": ({"moe.num_expert_groups": 1, "moe.num_limited_groups": 1,
                                   "first_dense_layers": 0}, "deepseek_v3"),
    "YaRN": ({"mla.rope_factor": 4.0, "mla.rope_original_context_length": 16, "mla.rope_mscale": 1.0,
              "mla.rope_mscale_all_dim": 0.707}, "deepseek_v3"),
    "softmax, groups (vs DeepseekV2)": ({"moe.score_function": "softmax", "moe.norm_topk_prob": False,
                                         "moe.use_aux_loss_free": False}, "deepseek_v2"),
    "softmax, no groups, YaRN (vs DeepseekV2)": ({"moe.score_function": "softmax", "moe.norm_topk_prob": False,
                                                  "moe.use_aux_loss_free": False, "moe.num_expert_groups": 1,
                                                  "moe.num_limited_groups": 1, "mla.rope_factor": 2.0,
                                                  "mla.rope_original_context_length": 32}, "deepseek_v2"),
}


@pytest.mark.parametrize("case", list(PARITY_CASES))
def test_logits_match_transformers(case, tmp_path):
    transformers = pytest.importorskip("transformers")
    from lit_deepseek.checkpoint.hf import save_hf_model

    overrides, model_type = PARITY_CASES[case]
    cfg = tiny_model_config(init_std=0.1, **overrides)  # larger weights: decisive routing, visible errors
    model = _model(cfg).eval()
    if cfg.moe.use_aux_loss_free:
        for moe in model.moe_layers():
            moe.expert_bias.uniform_(-0.1, 0.1)
    save_hf_model(model, tmp_path, max_shard_size="200KB", model_type=model_type)
    cls = transformers.DeepseekV3ForCausalLM if model_type == "deepseek_v3" else transformers.DeepseekV2ForCausalLM
    hf = cls.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation="eager").eval()
    ids = _tokens(cfg, seq=24)
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    diff = _rel(ours, theirs)
    print(f"\nparity [{case}] vs {cls.__name__}: max|diff|/max|logits| = {diff:.3e}")
    assert diff < 1e-5
