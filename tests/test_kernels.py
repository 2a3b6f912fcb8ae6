"""Fast paths against their plain reference paths, on fresh random inputs.

CPU tests cover the fused head + cross-entropy, the gather-based MoE token permutation and the
regional compilation (traced without graph breaks); GPU tests (marked `gpu`) cover cuDNN attention,
the grouped expert GEMM and a whole training step of the fast path against the reference path.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from lit_deepseek.kernels.compile import compile_blocks
from lit_deepseek.model import DeepSeekV3
from lit_deepseek.model.moe import MoE
from lit_deepseek.training import loss as loss_mod
from lit_deepseek.training.loss import IGNORE_INDEX, chunked_cross_entropy, model_loss
from tests.conftest import tiny_model_config

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_cross_entropy_matches_checkpointed_reference(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    h = torch.randn(45, 24, generator=gen).to(dtype).requires_grad_()
    w = torch.randn(70, 24, generator=gen).to(dtype).requires_grad_()
    labels = torch.randint(0, 70, (45,), generator=gen)
    labels[torch.randperm(45, generator=gen)[:7]] = IGNORE_INDEX
    results = []
    for fused in (False, True):
        h.grad = w.grad = None
        loss = chunked_cross_entropy(h, w, labels, chunk_size=16, fused=fused)
        (2.5 * loss).backward()
        results.append((loss.detach(), h.grad.clone(), w.grad.clone()))
    (l0, gh0, gw0), (l1, gh1, gw1) = results
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert abs(l0.item() - l1.item()) <= tol * abs(l0.item())
    assert rel(gh1, gh0) < tol and rel(gw1, gw0) < tol


def test_fused_cross_entropy_all_ignored_and_no_grad() -> None:
    h = torch.randn(8, 4, requires_grad=True)
    w = torch.randn(5, 4, requires_grad=True)
    labels = torch.full((8,), IGNORE_INDEX)
    loss = chunked_cross_entropy(h, w, labels, fused=True)
    loss.backward()
    assert loss.item() == 0 and h.grad.abs().sum() == 0 and w.grad.abs().sum() == 0
    with torch.no_grad():
        y = torch.randint(0, 5, (8,))
        assert torch.allclose(chunked_cross_entropy(h, w, y, fused=True), F.cross_entropy(h @ w.t(), y))


def _moe_pair(**overrides: object) -> tuple[MoE, MoE]:
    cfg = tiny_model_config(**overrides)
    torch.manual_seed(int(torch.randint(0, 2**31, (1,))))
    model = DeepSeekV3(cfg)
    fast = model.layers["1"].ffn
    ref = copy.deepcopy(fast)
    ref.fast_permute = False
    return fast, ref


@pytest.mark.parametrize("groups", [1, 4])
def test_moe_gather_permutation_matches_index_add(groups: int) -> None:
    fast, ref = _moe_pair(**{"moe.num_expert_groups": groups, "moe.num_limited_groups": min(groups, 2)})
    with torch.no_grad():
        fast.expert_bias.uniform_(-0.1, 0.1)
        ref.expert_bias.copy_(fast.expert_bias)
    x = torch.randn(3, 11, 32)
    outs = []
    for m in (fast, ref):
        xi = x.clone().requires_grad_()
        y = m(xi)
        g = torch.randn_like(y, generator=torch.Generator().manual_seed(5))
        y.backward(g)
        outs.append((y.detach(), xi.grad, [p.grad.clone() for p in m.parameters()]))
    (y0, gx0, gp0), (y1, gx1, gp1) = outs
    assert rel(y0, y1) < 1e-6 and rel(gx0, gx1) < 1e-6
    for a, b in zip(gp0, gp1, strict=False):
        assert rel(a, b) < 1e-5
    assert torch.equal(fast.expert_load, ref.expert_load)


def test_moe_capacity_factor_keeps_reference_path() -> None:
    fast, ref = _moe_pair(**{"moe.capacity_factor": 0.5})
    x = torch.randn(2, 9, 32)
    assert torch.allclose(fast(x), ref(x), atol=1e-6)


def test_compile_blocks_traces_without_graph_breaks_and_keeps_names() -> None:
    cfg = tiny_model_config(**{"moe.num_expert_groups": 1, "moe.num_limited_groups": 1})
    torch.manual_seed(0)
    model = DeepSeekV3(cfg).to(torch.bfloat16)
    for moe in model.moe_layers():
        moe.use_grouped_mm = True  # the CUDA path; bf16 grouped_mm also runs on CPU
    names = list(model.state_dict())
    ref = copy.deepcopy(model)
    assert compile_blocks(model, backend="aot_eager", fullgraph=True) == cfg.num_layers + cfg.mtp_depth
    assert list(model.state_dict()) == names
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    losses = []
    for m in (model, ref):
        h, mtp = m(ids, return_hidden=True)
        parts = model_loss(m.head.weight, h, mtp, ids, 0.3)
        parts.total.backward()
        losses.append((parts.total.detach(), [p.grad for p in m.parameters()]))
    assert torch.allclose(losses[0][0], losses[1][0], rtol=1e-2)
    for a, b in zip(losses[0][1], losses[1][1], strict=False):
        assert rel(a, b) < 5e-2
    # statistics counted once per forward, as in eager mode
    assert torch.equal(model.moe_layers()[0].expert_load, ref.moe_layers()[0].expert_load)


# ------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dims", [(96, 64), (192, 128)])
def test_cudnn_attention_matches_math_reference(dims: tuple[int, int]) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from lit_deepseek.model.attention import _sdpa

    dqk, dv = dims
    q, k = (torch.randn(2, 4, 256, dqk, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    v = torch.randn(2, 4, 256, dv, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(2, 4, 256, dv, device="cuda", dtype=torch.bfloat16)
    out = _sdpa(q, k, v, None, dqk ** -0.5)
    grads = torch.autograd.grad(out, (q, k, v), g)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    with sdpa_kernel([SDPBackend.MATH]):
        ref = F.scaled_dot_product_attention(q64, k64, v64, is_causal=True, scale=dqk ** -0.5)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), g.double())
    assert rel(out, ref) < 1e-2
    for a, b in zip(grads, ref_grads, strict=False):
        assert rel(a, b) < 2e-2


@pytest.mark.gpu
@cuda
def test_grouped_experts_match_loop_reference_on_gpu() -> None:
    from lit_deepseek.model.moe import GroupedExperts

    ex = GroupedExperts(4, 64, 96).cuda()
    with torch.no_grad():
        for p in ex.parameters():
            p.normal_(0, 0.05)
    ex = ex.to(torch.bfloat16)
    counts = torch.tensor([37, 0, 91, 12], device="cuda")
    x = torch.randn(int(counts.sum()), 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(x.shape[0], 64, device="cuda", dtype=torch.bfloat16)
    fast = ex(x, counts, use_grouped_mm=True)
    gf = torch.autograd.grad(fast, [x, *ex.parameters()], g)
    ref = ex(x, counts, use_grouped_mm=False)
    gr = torch.autograd.grad(ref, [x, *ex.parameters()], g)
    assert rel(fast, ref) < 1e-2
    for a, b in zip(gf, gr, strict=False):
        assert rel(a, b) < 1e-2


@pytest.mark.gpu
@cuda
def test_fast_training_step_matches_reference_path_on_gpu() -> None:
    from lit_deepseek.model import attention

    cfg = tiny_model_config(**{"moe.num_expert_groups": 1, "moe.num_limited_groups": 1,
                               "mla.qk_nope_head_dim": 64, "mla.qk_rope_head_dim": 32, "mla.v_head_dim": 64,
                               "mla.max_context_length": 256})
    torch.manual_seed(0)
    ref = DeepSeekV3(cfg).cuda().to(torch.bfloat16)
    fast = copy.deepcopy(ref)
    for moe in ref.moe_layers():
        moe.use_grouped_mm, moe.fast_permute = False, False
    compile_blocks(fast)
    ids = torch.randint(0, cfg.vocab_size, (2, 256), device="cuda")
    results = []
    for model, fast_path in ((fast, True), (ref, False)):
        attention.PREFER_CUDNN_ATTENTION = fast_path
        loss_mod.FUSED_CROSS_ENTROPY = fast_path
        try:
            h, mtp = model(ids, return_hidden=True)
            parts = model_loss(model.head.weight, h, mtp, ids, 0.3)
            parts.total.backward()
        finally:
            attention.PREFER_CUDNN_ATTENTION = True
            loss_mod.FUSED_CROSS_ENTROPY = True
        results.append((parts.total.float().item(), torch.cat([p.grad.float().flatten() for p in model.parameters()])))
    (l_fast, g_fast), (l_ref, g_ref) = results
    assert abs(l_fast - l_ref) < 1e-2 * l_ref
    assert rel(g_fast, g_ref) < 5e-2


def test_compiled_blocks_share_two_graphs_under_mixed_precision() -> None:
    """Under bf16 autocast with float32 weights (the default precision) the compiled model holds
    one graph per block kind (dense, MoE): the MTP block's residual stream is float32 like the
    main blocks', so it reuses their graph instead of compiling a bf16 one (startup time)."""
    from torch._dynamo.utils import counters

    cfg = tiny_model_config(**{"moe.num_expert_groups": 1, "moe.num_limited_groups": 1, "mtp_depth": 1})
    assert cfg.first_dense_layers >= 1 and cfg.num_layers > cfg.first_dense_layers
    torch.manual_seed(0)
    model = DeepSeekV3(cfg)
    for moe in model.moe_layers():
        moe.use_grouped_mm = True
    torch._dynamo.reset()
    counters.clear()
    compile_blocks(model, backend="aot_eager")
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    for _ in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h, mtp = model(ids, return_hidden=True)
            loss = model_loss(model.head.weight, h, mtp, ids, 0.3).total
        loss.backward()
    assert counters["stats"]["unique_graphs"] == 2 and not counters["graph_break"], dict(counters["stats"])
    torch._dynamo.reset()
