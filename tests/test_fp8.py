"""FP8 training: error bounds against float64 references, both recipes, conversion, exclusions,
gradient accumulation, tensor parallelism, compile, the Triton kernels and a CLI run on CPU.

Error bounds (relative Frobenius norm against the unquantized float64 product): e4m3 with
power-of-two scales keeps 3 mantissa bits, a relative rounding error of at most 2^-4 per element and
about 0.04 RMS for two quantized operands; we require < 0.08 for outputs and both gradients. The
FP8 kernels must agree with the float32 emulation of the same quantization to bf16 rounding (< 1e-2).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from lit_deepseek.config import ConfigError
from lit_deepseek.kernels import fp8
from lit_deepseek.kernels.fp8 import (
    Float8Linear,
    blockwise_grouped_mm_t,
    convert_to_fp8,
    cublas_block_scales,
    dequantize_1x128,
    dequantize_128x128,
    float8_experts_class,
    fp8_blockwise_grouped_linear,
    fp8_excluded,
    fp8_gate_up,
    fp8_grouped_gate_up,
    fp8_grouped_linear,
    quantize_1x128,
    quantize_128x128,
    quantize_rows,
    set_fp8_enabled,
)
from lit_deepseek.model import DeepSeekV3
from lit_deepseek.model.moe import GroupedExperts, SwiGLU
from lit_deepseek.training.loss import model_loss
from tests.conftest import tiny_model_config

FP8_BOUND = 0.08
KERNEL_VS_EMULATION = 1e-2

has_fp8 = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)
has_block_fp8 = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)
fp8_gpu = pytest.mark.skipif(not has_fp8, reason="needs a CUDA GPU with compute capability >= 8.9")
block_fp8_gpu = pytest.mark.skipif(not has_block_fp8, reason="needs a CUDA GPU with compute capability >= 9.0")
try:
    import triton  # noqa: F401
    has_triton = True
except ImportError:
    has_triton = False
ROOT = Path(__file__).resolve().parents[1]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _linear_case(device: str, emulate: bool, m: int = 96, k: int = 64, n: int = 80, recipe: str = "rowwise"):
    x = (torch.randn(m, k, device=device) * torch.rand(m, 1, device=device) * 10).requires_grad_()
    lin = nn.Linear(k, n, bias=False, device=device)
    w_ref = lin.weight.detach().double().requires_grad_()
    lin.__class__ = Float8Linear
    lin.fp8_emulate, lin.fp8_recipe = emulate, recipe
    y = lin(x)
    g = torch.randn(m, n, device=device)
    y.float().backward(g)
    x64 = x.detach().double().requires_grad_()
    y_ref = x64 @ w_ref.t()
    y_ref.backward(g.double())
    return (y, x.grad, lin.weight.grad), (y_ref, x64.grad, w_ref.grad)


def test_quantize_rows_power_of_two_scales_and_range() -> None:
    x = torch.randn(7, 33) * torch.logspace(-3, 3, 7)[:, None]
    q, s = quantize_rows(x)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (7, 1)
    assert torch.equal(torch.log2(s), torch.log2(s).round())
    deq = q.float() * s
    assert (deq.abs().amax(dim=1) <= 448 * s.squeeze(1)).all()
    assert rel(deq, x) < 0.05


@pytest.mark.parametrize("recipe,k,n", [("rowwise", 64, 80), ("blockwise", 200, 72), ("blockwise", 640, 136)])
def test_emulated_fp8_linear_within_bounds_of_float64(recipe: str, k: int, n: int) -> None:
    out, ref = _linear_case("cpu", emulate=True, k=k, n=n, recipe=recipe)
    for a, b in zip(out, ref, strict=False):
        assert rel(a, b) < FP8_BOUND


@pytest.mark.parametrize("recipe,k,n,middle", [("rowwise", 32, 48, 40), ("blockwise", 200, 72, 140)])
def test_emulated_fp8_grouped_within_bounds_of_float64(recipe: str, k: int, n: int, middle: int) -> None:
    """FP8 routed-expert products (float32 emulation) and their gradients stay within the FP8 bound
    of a float64 per-expert loop; blockwise shapes are not multiples of 128 (padded tiles)."""
    counts = torch.tensor([13, 0, middle, 27])
    offsets = torch.cumsum(counts, 0, dtype=torch.int32)
    x = torch.randn(int(counts.sum()), k, requires_grad=True)
    w = (torch.randn(4, n, k) * 0.1).requires_grad_()
    y = fp8_grouped_linear(x, w, offsets, emulate=True, recipe=recipe)
    g = torch.randn_like(y, dtype=torch.float32)
    y.float().backward(g)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    bounds = [0, *offsets.tolist()]
    ref = torch.cat([x64[a:b] @ w64[e].t() for e, (a, b) in enumerate(zip(bounds, bounds[1:], strict=False))])
    ref.backward(g.double())
    assert rel(y, ref) < FP8_BOUND and rel(x.grad, x64.grad) < FP8_BOUND and rel(w.grad, w64.grad) < FP8_BOUND
    assert w.grad[1].abs().sum() == 0  # an expert without tokens gets no gradient


@pytest.mark.parametrize("recipe", ["blockwise", "rowwise"])
def test_convert_keeps_names_skips_head_router_embedding_and_trains(recipe: str) -> None:
    cfg = tiny_model_config(**{"mla.d_model": 32, "moe.expert_intermediate_size": 16, "dense_intermediate_size": 48,
                               "mla.d_q_latent": 32, "mla.d_latent": 16, "mla.qk_nope_head_dim": 8,
                               "mla.qk_rope_head_dim": 8, "mla.v_head_dim": 8})
    torch.manual_seed(0)
    model = DeepSeekV3(cfg)
    ref = copy.deepcopy(model)
    names = list(model.state_dict())
    counts = convert_to_fp8(model, recipe=recipe, emulate=True)
    assert list(model.state_dict()) == names
    assert type(model.head) is nn.Linear and type(model.embed) is nn.Embedding
    assert isinstance(model.layers["0"].attn.q_a_proj, Float8Linear)
    assert isinstance(model.mtp[0].eh_proj, Float8Linear)
    moe = model.moe_layers()[0]
    assert type(moe.experts) is float8_experts_class() and isinstance(moe.experts, GroupedExperts)
    assert counts["experts"] == len(model.moe_layers()) and counts["linear"] > 0
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    losses = []
    for m in (model, ref):
        h, mtp = m(ids, return_hidden=True)
        losses.append(model_loss(m.head.weight, h, mtp, ids, 0.3).total)
    assert abs(losses[0].item() - losses[1].item()) < 0.02 * losses[1].item()
    losses[0].backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad and p.dim() > 1)
    set_fp8_enabled(model, False)
    h, mtp = model(ids, return_hidden=True)
    assert torch.allclose(model_loss(model.head.weight, h, mtp, ids, 0.3).total, losses[1], rtol=1e-5)


def test_blockwise_quantization_round_trip_tiles_and_padding() -> None:
    x = torch.randn(5, 200) * torch.logspace(-4, 4, 5)[:, None]
    x[:, 130] = 1e3  # an outlier only coarsens its own 1x128 tile
    q, s = quantize_1x128(x)
    assert q.dtype == torch.float8_e4m3fn and q.shape == (5, 256) and s.shape == (5, 2)
    assert torch.equal(torch.log2(s), torch.log2(s).round())
    deq = dequantize_1x128(q, s)
    assert torch.equal(deq[:, 200:], torch.zeros(5, 56))
    assert rel(deq[:, :128], x[:, :128]) < 0.05 and rel(deq[:, :200], x) < 0.05
    assert ((deq[:, :128] - x[:, :128]).abs() <= x[:, :128].abs() * 2**-4 + 1e-30).all()  # normal range: 3 bits
    w = torch.randn(3, 200, 136)
    w[0, 0, 0] = 1e4
    wq, ws = quantize_128x128(w)
    assert wq.shape == (3, 256, 256) and ws.shape == (3, 2, 2)
    wd = dequantize_128x128(wq, ws)[:, :200, :136]
    assert rel(wd[1:], w[1:]) < 0.05 and rel(wd[0, 128:], w[0, 128:]) < 0.05  # other blocks keep full precision


def test_cublas_scale_layouts_follow_torch_rules() -> None:
    """The scale layouts handed to cuBLAS block scaling pass torch's own shape rules (its meta
    kernels run them on CPU), for K whose tile count is and is not a multiple of 4."""
    F = torch.nn.functional
    for m, n, k in ((96, 320, 200), (64, 256, 640), (32, 128, 1024)):
        aq, sa = quantize_1x128(torch.randn(m, k))
        bq, sb = quantize_128x128(torch.randn(n, k))
        kt, nt = sa.shape[1], sb.shape[0]
        l4 = -(-kt // 4) * 4
        scale_a, scale_b = cublas_block_scales(sa, sb, True)
        assert scale_a.shape == (m, kt) and scale_a.stride() == (1, m)  # outer-dim-major
        assert scale_b.shape == (l4, nt) and scale_b.stride() == (1, l4)
        assert torch.equal(scale_a, sa) and torch.equal(scale_b[:kt].t(), sb) and not scale_b[kt:].any()
        meta = [t.to("meta") for t in (aq, bq, scale_a, scale_b)]
        out = F.scaled_mm(meta[0], meta[1].t(), meta[2], F.ScalingType.BlockWise1x128, meta[3],
                          F.ScalingType.BlockWise128x128, output_dtype=torch.bfloat16)
        assert out.shape == (m, bq.shape[0])
        gq, sg = quantize_1x128(torch.randn(k, 256))  # 1x128 x 1x128 (weight gradient)
        scale_a, scale_b = cublas_block_scales(sg, sg, False)
        assert scale_b.shape == (k, 2) and scale_b.stride() == (1, k) and torch.equal(scale_b, sg)
        if kt % 4 == 0:  # the torch._scaled_mm fallback (K padded to 512) infers the recipe from shapes
            meta = [t.to("meta") for t in cublas_block_scales(sa, sb, True)]
            out = torch._scaled_mm(aq.to("meta"), bq.to("meta").t(), scale_a=meta[0], scale_b=meta[1],
                                   out_dtype=torch.bfloat16)
            assert out.shape == (m, bq.shape[0])


def test_blockwise_gradient_accumulation_equals_one_batch() -> None:
    """Two micro-batches of 128 tokens accumulate to the gradient of the 256-token batch: the 1x128
    token tiles of the weight gradient coincide, so only float32 summation order differs."""
    torch.manual_seed(3)
    lin = nn.Linear(200, 72, bias=False)
    lin.__class__ = Float8Linear
    x, g = torch.randn(256, 200), torch.randn(256, 72)
    lin(x).backward(g)
    full = lin.weight.grad.clone()
    lin.weight.grad = None
    for sl in (slice(0, 128), slice(128, 256)):
        lin(x[sl]).backward(g[sl])
    assert torch.allclose(lin.weight.grad, full, rtol=1e-5, atol=1e-5)


def test_fp8_exclude_patterns() -> None:
    exclude = ["embed", "head", "gate", "attn.o_proj", "mtp.*"]
    assert fp8_excluded("head", exclude) and fp8_excluded("layers.1.ffn.gate", exclude)
    assert not fp8_excluded("layers.1.ffn.gate_proj", exclude) and not fp8_excluded("layers.0.attn.q_a_proj", exclude)
    assert fp8_excluded("layers.3.attn.o_proj", exclude) and fp8_excluded("mtp.0.eh_proj", exclude)
    cfg = tiny_model_config()
    model = DeepSeekV3(cfg)
    counts = convert_to_fp8(model, recipe="blockwise", exclude=["embed", "head", "gate", "layers.1.*", "*.kv_b_proj"], emulate=True)
    assert type(model.layers["1"].attn.q_a_proj) is nn.Linear and type(model.layers["0"].attn.kv_b_proj) is nn.Linear
    assert type(model.layers["1"].ffn.experts) is GroupedExperts and isinstance(model.layers["0"].attn.q_a_proj, Float8Linear)
    assert counts["experts"] == len(model.moe_layers()) - 1


def test_compiled_blockwise_layers_match_eager() -> None:
    """torch.compile traces the FP8 autograd functions (aot_eager on CPU; inductor in the GPU test)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(200, 136, bias=False), nn.SiLU(), nn.Linear(136, 72, bias=False))
    convert_to_fp8(model, recipe="blockwise", exclude=[], emulate=True)
    compiled = copy.deepcopy(model)
    compiled.compile(backend="aot_eager")
    x = torch.randn(2, 64, 200)
    grads = []
    for m in (model, compiled):
        m(x).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    assert rel(grads[1], grads[0]) < 1e-5


def _tp_fp8_worker(rank: int, world_size: int, cfg, batch) -> tuple:
    from test_parallel_tp import MICRO, loss_fn, make_model
    from torch.distributed.device_mesh import init_device_mesh

    from lit_deepseek.parallel.tensor import apply_tensor_parallel, loss_parallel_context, vocab_parallel_loss
    from lit_deepseek.training.step import LocalPlan

    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("tp",))
    model = make_model(cfg)
    apply_tensor_parallel(model, mesh["tp"], sequence_parallel=True, loss_parallel=True)
    convert_to_fp8(model, recipe="blockwise", emulate=None)  # after TP, in the order of `parallelize`
    sharded = type(model.layers["0"].attn.q_b_proj.weight).__name__
    with loss_parallel_context(model):
        loss = LocalPlan().forward_backward(model, batch, MICRO, vocab_parallel_loss(loss_fn)).total.item()
    grads = {k: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad)
             for k, p in model.named_parameters() if p.grad is not None}
    return loss, grads, sharded


def test_tp2_fp8_gradients_match_one_process() -> None:
    """TP2 (DTensor weights, gloo) with blockwise FP8 against one process with the same recipe:
    sharding moves tile boundaries, so the two agree to FP8 rounding, not bit for bit."""
    from dist_utils import run_distributed
    from test_parallel_tp import MICRO, loss_fn, make_batches, make_model

    from lit_deepseek.training.step import LocalPlan

    cfg = tiny_model_config()
    batch = make_batches(cfg, steps=1)[0]
    model = make_model(cfg)
    convert_to_fp8(model, recipe="blockwise", emulate=True)
    ref_loss = LocalPlan().forward_backward(model, batch, MICRO, loss_fn).total.item()
    loss, grads, sharded = run_distributed(_tp_fp8_worker, 2, cfg, batch, timeout_s=90)[0]
    assert sharded == "DTensor"
    assert abs(loss - ref_loss) < 0.005 * ref_loss, (loss, ref_loss)
    ref = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == ref.keys()
    worst = max(((grads[k] - ref[k]).norm() / ref[k].norm().clamp_min(1e-12)).item() for k in ref)
    assert worst < FP8_BOUND, sorted(((grads[k] - ref[k]).norm() / ref[k].norm()).item() for k in ref)[-5:]


def test_fp8_under_expert_parallel_and_zero3() -> None:
    """FP8 (blockwise, emulated) under EP2 x DP2 with ZeRO-3 (FSDP2 wraps the FP8 layers) against one
    process with the same recipe. Forward tiles follow tokens and weights, so the first loss agrees
    to float32 rounding; expert weight-gradient tiles follow the tokens each expert receives, which
    EP regroups, so gradients agree to FP8 rounding. The expert intermediate size is 128, so the
    experts run the fused gate/up product, on FSDP2's unsharded weights."""
    import warnings

    from dist_utils import compare, distributed_run, reference_run, run_distributed, tiny_run_config

    def config(fp8: bool, parallel: dict | None = None) -> object:
        cfg = tiny_run_config(parallel=parallel, steps_batch=8, model={"moe.expert_intermediate_size": 128})
        cfg.training.use_fp8, cfg.training.fp8_recipe = fp8, "blockwise"
        return cfg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = reference_run(config(True), 2)
    layout = {"expert_parallel_size": 2, "data_parallel_size": 2, "zero_stage": 3}
    results = run_distributed(distributed_run, 4, config(True, layout), 2, timeout_s=180)
    first = [r[0][0][0] for r in results]
    assert max(abs(f - reference[0][0][0]) for f in first) < 1e-4 * reference[0][0][0], (first, reference[0][0])
    loss_diff, norm_diff, _ = compare(reference, results)
    assert loss_diff < 0.01 and norm_diff < 0.05, (loss_diff, norm_diff)


@pytest.mark.parametrize("layout", [{"expert_parallel_size": 2, "zero_stage": 1},
                                    {"expert_parallel_size": 2, "zero_stage": 3}], ids=["ep2-zero1", "ep2-zero3"])
def test_fp8_weight_reuse_under_expert_parallel(layout: dict) -> None:
    """EP2 on two gloo ranks, two micro-batches per rank and step (blockwise, emulated): with ZeRO 1
    the later micro-batches take the kept weight blocks and losses, gradient norms and weights are
    bit for bit those of LIT_DEEPSEEK_FP8_WEIGHT_CACHE=0; with ZeRO 3 (FSDP2) nothing is kept."""
    import warnings

    from dist_utils import fp8_reuse_run, run_distributed, tiny_run_config

    cfg = tiny_run_config(parallel=layout, steps_batch=8, micro_batch_size=2,
                          model={"moe.expert_intermediate_size": 128})
    cfg.training.use_fp8, cfg.training.fp8_recipe = True, "blockwise"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        on, off = (run_distributed(fp8_reuse_run, 2, cfg, 2, reuse, timeout_s=180) for reuse in (True, False))
    for (hist_on, w_on, _, info_on), (hist_off, w_off, _, info_off) in zip(on, off, strict=True):
        assert hist_on == hist_off
        assert w_on.keys() == w_off.keys() and all(torch.equal(w_on[k], w_off[k]) for k in w_on)
        assert info_off["entries"] == info_off["reused"] == 0
        if layout["zero_stage"] < 2:
            assert info_on["entries"] > 0 and info_on["reused"] > 0, info_on
        else:
            assert info_on["entries"] == info_on["reused"] == 0, info_on


@pytest.mark.skipif(not has_triton, reason="triton is not installed")
def test_triton_grouped_kernels_match_emulation_interpreted() -> None:
    """The Triton kernels run on CPU tensors under TRITON_INTERPRET=1 (a fresh process: the
    variable is read when triton compiles) and must match the float32 emulation."""
    code = """
import torch
from lit_deepseek.kernels import fp8
from lit_deepseek.kernels.fp8_triton import grouped_mm_t, grouped_wgrad
torch.manual_seed(0)
counts = torch.tensor([70, 0, 130, 27]); off = torch.cumsum(counts, 0, dtype=torch.int32); m = int(counts.sum())
x = torch.randn(m + 5, 200); w = torch.randn(4, 72, 200) * 0.1; g = torch.randn(m, 72)
xq, sx = fp8.quantize_1x128(x); wq, sw = fp8.quantize_128x128(w)
out, ref = grouped_mm_t(xq, sx, wq, sw, off), fp8.blockwise_grouped_mm_t(xq, sx, wq, sw, off, True)
out128 = grouped_mm_t(xq, sx, wq, sw, off, block_m=128)
e1 = max(((o.float() - ref).norm() / ref.norm()).item() for o in (out, out128))
assert out[m:].abs().sum() == 0 and out128[m:].abs().sum() == 0
gq, sg = fp8.quantize_1x128(fp8._pad_to(g, -1).t()); xq2, sx2 = fp8.quantize_1x128(fp8._pad_to(x[:m], -1).t())
o2, r2 = grouped_wgrad(gq, sg, xq2, sx2, off), fp8.blockwise_grouped_wgrad(*fp8.quantize_1x128_t(g), x[:m], off, True)
e2 = ((o2 - r2).norm() / r2.norm()).item()
assert o2[1].abs().sum() == 0
# another launch configuration (the probe's tile sweep) computes the same products
assert torch.allclose(grouped_wgrad(gq, sg, xq2, sx2, off, 128, 4, 2), o2, rtol=1e-6, atol=1e-6)
assert torch.allclose(grouped_mm_t(xq, sx, wq, sw, off, 64, 8, 4).float(), out.float(), rtol=1e-2, atol=1e-6)
# 256 output columns per program (two weight blocks, a scale per column) against the emulation
wq2, sw2 = fp8.quantize_128x128(torch.randn(4, 400, 200) * 0.1 * torch.linspace(0.1, 10, 400)[:, None])
wide, ref2 = grouped_mm_t(xq, sx, wq2, sw2, off, 64, 4, 3, 256), fp8.blockwise_grouped_mm_t(xq, sx, wq2, sw2, off, True)
assert wide.shape == ref2.shape == (m + 5, 512) and ((wide.float() - ref2).norm() / ref2.norm()).item() < 1e-2
assert torch.allclose(wide.float(), grouped_mm_t(xq, sx, wq2, sw2, off, 64, 4, 3, 128).float(), rtol=1e-2, atol=1e-6)
# the Triton quantizers give the same bits with column-major scales: the kernels take any scale strides
from lit_deepseek.kernels import fp8_triton
tq, ts = fp8_triton.quantize_1x128(x)
assert ts.stride(0) == 1 and torch.equal(grouped_mm_t(tq, ts, wq, sw, off), out)
(tg, tsg), (tx, tsx) = fp8_triton.quantize_1x128_t(g), fp8_triton.quantize_1x128_t(x[:m])
assert torch.equal(grouped_wgrad(tg, tsg, tx, tsx, off), o2)
print(e1, e2)
"""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    e1, e2 = map(float, proc.stdout.split())
    assert e1 < KERNEL_VS_EMULATION and e2 < 1e-5


def _gate_up_fused_and_separate(device: str, emulate: bool, grouped: bool = True) -> dict[str, list[torch.Tensor]]:
    """SwiGLU's gate and up products (outputs, input gradient, both weight gradients) computed as one
    blockwise FP8 product ("fused": `fp8_grouped_gate_up` for routed experts, `fp8_gate_up` for a
    dense layer) and as two blockwise products ("separate"), plus the float64 product of the
    unquantized operands ("exact"). Uneven groups with an empty one, K not a multiple of 128, M not
    a multiple of 128."""
    torch.manual_seed(0)
    counts = torch.tensor([70, 0, 130, 27], device=device)
    offsets = torch.cumsum(counts, 0, dtype=torch.int32)
    m, k, n = int(counts.sum()), 200, 256
    x = (torch.randn(m, k, device=device) * 3).bfloat16()
    w1, w3 = (torch.randn(*((4,) if grouped else ()), n, k, device=device) * 0.05 for _ in range(2))
    g1, g3 = (torch.randn(m, n, device=device).bfloat16() for _ in range(2))
    bounds = [0, *offsets.tolist()]
    pairs = list(zip(bounds, bounds[1:], strict=False))
    out = {}
    for name in ("fused", "separate", "exact"):
        xi, a, b = (t.clone().double() if name == "exact" else t.clone() for t in (x, w1, w3))
        xi, a, b = xi.requires_grad_(), a.requires_grad_(), b.requires_grad_()
        if name == "fused":
            gate, up = fp8_grouped_gate_up(xi, a, b, offsets, emulate) if grouped else fp8_gate_up(xi, a, b, emulate)
        elif name == "separate" and grouped:
            gate, up = (fp8_grouped_linear(xi, w, offsets, emulate, recipe="blockwise") for w in (a, b))
        elif name == "separate":
            gate, up = (fp8.fp8_linear(xi, w, "blockwise", emulate) for w in (a, b))
        elif grouped:
            gate, up = (torch.cat([xi[s:e] @ w[i].t() for i, (s, e) in enumerate(pairs)]) for w in (a, b))
        else:
            gate, up = xi @ a.t(), xi @ b.t()
        torch.autograd.backward([gate, up], [g1.to(gate.dtype), g3.to(up.dtype)])
        out[name] = [t.detach().float() for t in (gate, up, xi.grad, a.grad, b.grad)]
    return out


def _check_gate_up(out: dict[str, list[torch.Tensor]], same: float) -> None:
    """Gate, up and both weight gradients are those of the separate products (each weight quantized on
    its own, the same tiles of x and of the output gradient); the input gradient differs by one bf16
    rounding (one product over both weights, where the separate path rounds two and adds them), and
    both stay within the FP8 bound of the exact product."""
    fused, separate, exact = out["fused"], out["separate"], out["exact"]
    for i in (0, 1, 3, 4):
        assert rel(fused[i], separate[i]) <= same, (i, rel(fused[i], separate[i]))
    assert rel(fused[2], separate[2]) < 1e-2
    for a, r in zip(fused, exact, strict=True):
        assert rel(a, r) < FP8_BOUND


@pytest.mark.parametrize("grouped", [True, False])
def test_fused_gate_up_equals_two_blockwise_products(grouped: bool) -> None:
    _check_gate_up(_gate_up_fused_and_separate("cpu", emulate=True, grouped=grouped), same=0.0)


def _loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    h, mtp = model(ids, return_hidden=True)
    return model_loss(model.head.weight, h, mtp, ids, 0.3).total


def test_converted_model_runs_gate_and_up_as_one_product(monkeypatch: pytest.MonkeyPatch) -> None:
    """After `convert_to_fp8(recipe="blockwise")` every SwiGLU (the dense layer's FFN, the shared
    experts, MTP's) and every routed-experts module runs its gate and up projections as one FP8
    product: the loss is that of the same model with them run as separate products, the gradients
    agree to one bf16 rounding. A projection excluded from FP8 turns the fusion off for its layer."""
    calls = {"dense": 0, "grouped": 0}
    for key, op in (("dense", "_fp8_gate_up_op"), ("grouped", "_fp8_grouped_gate_up_op")):
        real = getattr(fp8, op)
        monkeypatch.setattr(fp8, op, lambda *a, _r=real, _k=key: calls.__setitem__(_k, calls[_k] + 1) or _r(*a))
    torch.manual_seed(0)
    cfg = tiny_model_config(**{"dense_intermediate_size": 128, "moe.expert_intermediate_size": 128})
    base = DeepSeekV3(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    swiglus = sum(isinstance(m, SwiGLU) for m in base.modules())
    separate = {"fp8_gate_up": lambda x, w1, w3, e, dt: (fp8.fp8_linear(x, w1, "blockwise", e, dt),
                                                         fp8.fp8_linear(x, w3, "blockwise", e, dt)),
                "fp8_grouped_gate_up": lambda x, w1, w3, o, e, bw: (fp8_grouped_linear(x, w1, o, e, "blockwise", bw),
                                                                    fp8_grouped_linear(x, w3, o, e, "blockwise", bw))}
    results = []
    for fused in (True, False):
        model = copy.deepcopy(base)
        convert_to_fp8(model, recipe="blockwise", emulate=True)
        with monkeypatch.context() as patch:
            if not fused:  # the same FP8 projections, one product each
                for name, fn in separate.items():
                    patch.setattr(fp8, name, fn)
            calls.update(dense=0, grouped=0)
            loss = _loss(model, ids)
            loss.backward()
        expected = {"dense": swiglus, "grouped": cfg.num_layers - cfg.first_dense_layers + cfg.mtp_depth}
        assert calls == (expected if fused else {"dense": 0, "grouped": 0}), calls
        results.append((loss.detach(), [p.grad for p in model.parameters()]))
    (loss_f, grads_f), (loss_s, grads_s) = results
    assert torch.equal(loss_f, loss_s)
    assert max(rel(a, b) for a, b in zip(grads_f, grads_s, strict=True) if b is not None and b.abs().sum() > 0) < 2e-2
    model = copy.deepcopy(base)
    convert_to_fp8(model, recipe="blockwise", emulate=True, exclude=[*fp8.DEFAULT_EXCLUDE, "up_proj"])
    calls.update(dense=0, grouped=0)
    _loss(model, ids).backward()
    assert calls["dense"] == 0 and calls["grouped"] > 0


@pytest.mark.skipif(not has_triton, reason="triton is not installed")
def test_fused_gate_up_triton_kernels_interpreted() -> None:
    """The fused gate/up product through the Triton grouped kernels (TRITON_INTERPRET=1, CPU tensors,
    a fresh process): equal to the two separate kernel products and close to its float32 emulation."""
    code = """
from tests.test_fp8 import _check_gate_up, _gate_up_fused_and_separate, rel
kernel, emulated = _gate_up_fused_and_separate("cpu", False), _gate_up_fused_and_separate("cpu", True)
_check_gate_up(kernel, same=0.0)
print(max(rel(a, b) for a, b in zip(kernel["fused"], emulated["fused"], strict=True)))
"""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert float(proc.stdout.split()[-1]) < KERNEL_VS_EMULATION


@pytest.mark.gpu
@block_fp8_gpu
@pytest.mark.parametrize("grouped", [True, False])
def test_fused_gate_up_kernels_match_separate_products_on_gpu(grouped: bool) -> None:
    _check_gate_up(_gate_up_fused_and_separate("cuda", emulate=False, grouped=grouped), same=1e-6)


def _expert_wgrad_case(device: str, emulate: bool, fused: bool) -> tuple[dict, list]:
    """Routed-expert gate and up products under the blockwise recipe with each `fp8_expert_wgrad`:
    {mode: (y, dx, dw1, dw3)} and the float64 reference (y, dx, dw1, dw3). Group sizes are not
    multiples of 128 and one expert gets no token."""
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    counts = torch.tensor([300, 0, 517, 17, 190], device=device)
    offsets = torch.cumsum(counts, 0, dtype=torch.int32)
    k, n = 256, 256
    x = torch.randn(int(counts.sum()), k, device=device, dtype=dtype)
    w1, w3 = ((torch.randn(5, n, k, device=device) * 0.05).to(dtype) for _ in range(2))
    g = torch.randn(x.shape[0], 2 * n, device=device).to(dtype)
    out = {}
    for mode in ("fp8", "bf16"):
        xi, a, b = (t.clone().requires_grad_() for t in (x, w1, w3))
        if fused:
            gate, up = fp8_grouped_gate_up(xi, a, b, offsets, emulate, mode == "bf16")
        else:
            gate, up = (fp8_grouped_linear(xi, w, offsets, emulate, "blockwise", mode == "bf16") for w in (a, b))
        y = torch.cat((gate, up), -1)
        y.backward(g.to(y.dtype))
        out[mode] = (y.float(), xi.grad.float(), a.grad.float(), b.grad.float())
    x64, a64, b64 = (t.double().requires_grad_() for t in (x, w1, w3))
    bounds = [0, *offsets.tolist()]
    ref = torch.cat([torch.cat((x64[s:t] @ a64[e].t(), x64[s:t] @ b64[e].t()), -1)
                     for e, (s, t) in enumerate(zip(bounds, bounds[1:], strict=False))])
    ref.backward(g.double())
    return out, [ref, x64.grad, a64.grad, b64.grad]


def _check_expert_wgrad(out: dict, ref: list, fp8_wgrad: bool = True) -> None:
    """fp8_expert_wgrad bf16 changes the weight gradients only: the forward and the input gradient
    are those of the FP8 weight gradient, and the weight gradients are the unquantized product
    (bf16 rounding); fp8_wgrad: also check the FP8 weight gradients, within the FP8 bound of float64
    and further from it than the bf16 ones."""
    fp8_mode, bf16_mode = out["fp8"], out["bf16"]
    assert rel(bf16_mode[0], fp8_mode[0]) == 0.0
    assert rel(bf16_mode[1], fp8_mode[1]) <= 1e-6
    for i in (2, 3):
        assert rel(bf16_mode[i], ref[i]) < 1e-2, rel(bf16_mode[i], ref[i])
        assert bf16_mode[i][1].abs().sum() == 0  # the expert without tokens
        if fp8_wgrad:
            assert rel(fp8_mode[i], ref[i]) < FP8_BOUND
            assert rel(bf16_mode[i], ref[i]) < 0.5 * rel(fp8_mode[i], ref[i])


@pytest.mark.parametrize("fused", [True, False])
def test_blockwise_experts_with_bf16_weight_gradient(fused: bool) -> None:
    _check_expert_wgrad(*_expert_wgrad_case("cpu", emulate=True, fused=fused))


@pytest.mark.gpu
@block_fp8_gpu
@pytest.mark.parametrize("fused", [True, False])
def test_blockwise_experts_with_bf16_weight_gradient_on_gpu(fused: bool) -> None:
    """The kernels (Triton FP8 products, torch's bf16 grouped GEMM) against the same checks and
    against the float32 emulation of the same setting (the default, fp8_expert_wgrad bf16)."""
    kernel, ref = _expert_wgrad_case("cuda", emulate=False, fused=fused)
    _check_expert_wgrad(kernel, ref, fp8_wgrad=False)
    emulated, _ = _expert_wgrad_case("cuda", emulate=True, fused=fused)
    for a, b in zip(kernel["bf16"], emulated["bf16"], strict=True):
        assert rel(a, b) < KERNEL_VS_EMULATION


@pytest.mark.gpu
@block_fp8_gpu
@pytest.mark.parametrize("fused", [True, False])
def test_blockwise_experts_fp8_weight_gradient_on_gpu(fused: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """fp8_expert_wgrad fp8 on the GPU: the weight gradients within the FP8 bound of float64 and
    within KERNEL_VS_EMULATION of the emulation (same Triton quantizers, products in float32), and
    the emulation equal to that with the torch quantizers. (Before `fp8_triton.quantize_1x128_t`
    read x.T contiguous, its bf16 tiles were wrong on an H100: dw1 1.71 away from float64.)"""
    kernel, ref = _expert_wgrad_case("cuda", emulate=False, fused=fused)
    emulated, _ = _expert_wgrad_case("cuda", emulate=True, fused=fused)
    monkeypatch.setenv("LIT_DEEPSEEK_FP8_QUANT", "torch")
    torch_quant, _ = _expert_wgrad_case("cuda", emulate=True, fused=fused)
    torch_kernel, _ = _expert_wgrad_case("cuda", emulate=False, fused=fused)
    report = {i: {"kernel-vs-f64": rel(kernel["fp8"][i], ref[i]), "kernel-vs-emulation": rel(kernel["fp8"][i], emulated["fp8"][i]),
                  "emulation-vs-f64": rel(emulated["fp8"][i], ref[i]),
                  "emulation-triton-vs-torch-quant": rel(emulated["fp8"][i], torch_quant["fp8"][i]),
                  "kernel-with-torch-quant-vs-f64": rel(torch_kernel["fp8"][i], ref[i])} for i in (2, 3)}
    for i in (2, 3):
        assert report[i]["kernel-vs-f64"] < FP8_BOUND and report[i]["kernel-vs-emulation"] < KERNEL_VS_EMULATION, report
        assert report[i]["emulation-triton-vs-torch-quant"] < 1e-6, report


@pytest.mark.gpu
@block_fp8_gpu
@pytest.mark.parametrize("fused", [True, False])
def test_blockwise_dense_weight_gradient_at_the_expert_fault_shape_on_gpu(fused: bool) -> None:
    """The dense layers' FP8 weight gradient (same Triton quantizers as the experts' FP8 one) at the
    shape where that one failed on the GPU: 1024 tokens, K 256, N 256, bf16 operands; within the FP8
    bound of float64 and close to its float32 emulation."""
    torch.manual_seed(0)
    x = torch.randn(1024, 256, device="cuda", dtype=torch.bfloat16)
    w1, w3 = ((torch.randn(256, 256, device="cuda") * 0.05).bfloat16() for _ in range(2))
    g = torch.randn(1024, 512, device="cuda", dtype=torch.bfloat16)
    grads = {}
    for emulate in (False, True):
        xi, a, b = (t.clone().requires_grad_() for t in (x, w1, w3))
        if fused:
            gate, up = fp8_gate_up(xi, a, b, emulate)
        else:
            gate, up = (fp8.fp8_linear(xi, w, "blockwise", emulate) for w in (a, b))
        torch.cat((gate, up), -1).backward(g)
        grads[emulate] = [t.grad.float() for t in (xi, a, b)]
    x64, a64, b64 = (t.double().requires_grad_() for t in (x, w1, w3))
    torch.cat((x64 @ a64.t(), x64 @ b64.t()), -1).backward(g.double())
    for kernel, emulated, exact in zip(grads[False], grads[True], (x64.grad, a64.grad, b64.grad), strict=True):
        assert rel(kernel, exact) < FP8_BOUND, (rel(kernel, exact), rel(emulated, exact))
        assert rel(kernel, emulated) < KERNEL_VS_EMULATION


def test_expert_wgrad_setting_reaches_the_experts() -> None:
    """training.fp8_expert_wgrad goes through `parallelize` to every routed-experts module."""
    import warnings

    from lit_deepseek.config import DeepSeekConfig
    from lit_deepseek.parallel.parallelize import parallelize

    cfg = tiny_model_config()
    for mode in ("fp8", "bf16"):
        run = DeepSeekConfig(model=cfg)
        run.training.use_fp8, run.training.fp8_expert_wgrad = True, mode
        model = DeepSeekV3(cfg)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # no GPU: the emulation's one warning
            parallelize(model, None, run)
        experts = [m for m in model.modules() if isinstance(m, fp8.Float8GroupedExperts)]
        assert experts and all(m.fp8_wgrad == mode for m in experts)


def test_fp8_experts_run_gate_and_up_as_one_product(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blockwise FP8 experts with an intermediate size that is a multiple of 128 take the fused gate/up
    product; other sizes and the row-wise recipe run two products."""
    calls = []
    real = fp8._fp8_grouped_gate_up_op
    monkeypatch.setattr(fp8, "_fp8_grouped_gate_up_op", lambda *a: calls.append(a[1].shape) or real(*a))
    counts = torch.tensor([5, 3])
    for n, recipe, fused in ((128, "blockwise", True), (96, "blockwise", False), (128, "rowwise", False)):
        calls.clear()
        layer = GroupedExperts(2, 64, n)
        nn.init.normal_(layer.w1, std=0.02), nn.init.normal_(layer.w2, std=0.02), nn.init.normal_(layer.w3, std=0.02)
        convert_to_fp8(nn.Sequential(layer), recipe=recipe, emulate=True)
        layer(torch.randn(8, 64), counts).sum().backward()
        assert bool(calls) == fused, (n, recipe)
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())


def test_cli_fp8_run_on_cpu_learns(tmp_path: Path) -> None:
    """`lit-deepseek fit --training.use_fp8 true` on CPU (float32 emulation of the blockwise recipe):
    the run finishes, its loss falls, and its two micro-batches per step reuse the weight blocks."""
    import mlflow

    from tests.test_cli import DEMO, run_cli

    run_dir = tmp_path / "run"
    proc = run_cli("fit", "--config", str(DEMO), "--training.use_fp8", "true", "--training.fp8_recipe", "blockwise",
                   "--training.max_steps", "8",
                   "--training.lr_warmup_steps", "2", "--training.global_batch_size", "4", "--training.seq_length", "64",
                   "--training.micro_batch_size", "2", "--training.val_every_n_steps", "100",
                   "--checkpoint.every_n_steps", "100", "--logging.log_every_n_steps", "1",
                   "--logging.run_dir", str(run_dir), "--logging.progress_bar", "false", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "float32 emulation" in proc.stderr
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("cpu-demo").experiment_id])[0]
    assert run.data.params["training.fp8_recipe"] == "blockwise"
    loss = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.step)]
    assert len(loss) == 8
    assert sum(loss[-2:]) / 2 < 0.8 * sum(loss[:2]) / 2, loss
    # two micro-batches per step: the second took the first one's weight blocks (LocalPlan's reuse)
    hits = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "fp8/weight_reuse_hits"),
                                    key=lambda m: m.step)]
    assert len(hits) == 8 and hits[0] > 0 and hits == sorted(hits) and hits[-1] > hits[0], hits
    assert run.data.metrics["fp8/kept_weight_gib"] > 0


@pytest.mark.parametrize("args,needle", [
    (["--training.fp8_recipe", "tilewise"], "training.fp8_recipe"),
    (["--training.fp8_exclude", "[head, ' ']"], "training.fp8_exclude"),
    (["--training.fp8_expert_wgrad", "fp16"], "training.fp8_expert_wgrad"),
])
def test_bad_fp8_settings_are_one_line(tmp_path: Path, args: list, needle: str) -> None:
    from tests.test_cli import DEMO, assert_one_line_error, run_cli

    assert_one_line_error(run_cli("fit", "--config", str(DEMO), "--training.use_fp8", "true", *args, cwd=tmp_path,
                                  timeout=120), needle)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised where no GPU is present")
def test_fp8_kernels_without_a_gpu_are_a_clear_error() -> None:
    with pytest.raises(ConfigError, match=r"^training\.use_fp8: FP8 training needs"):
        convert_to_fp8(nn.Sequential(nn.Linear(16, 16)), emulate=False)
    with pytest.raises(ConfigError, match=r"^training\.fp8_recipe: must be one of blockwise, rowwise"):
        convert_to_fp8(nn.Sequential(nn.Linear(16, 16)), recipe="tilewise", emulate=True)


# ------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@fp8_gpu
def test_fp8_linear_kernel_matches_emulation_and_bounds() -> None:
    torch.manual_seed(int(torch.randint(0, 2**31, (1,))))
    state = torch.cuda.get_rng_state()
    out, ref = _linear_case("cuda", emulate=False, m=4096, k=1024, n=512)
    torch.cuda.set_rng_state(state)
    emu, _ = _linear_case("cuda", emulate=True, m=4096, k=1024, n=512)
    for a, b, e in zip(out, ref, emu, strict=False):
        assert rel(a, b) < FP8_BOUND
        assert rel(a, e) < KERNEL_VS_EMULATION


@pytest.mark.gpu
@fp8_gpu
def test_fp8_grouped_kernel_matches_emulation_and_bounds() -> None:
    counts = torch.tensor([300, 0, 1000, 17, 731], device="cuda")
    offsets = torch.cumsum(counts, 0, dtype=torch.int32)
    x = torch.randn(int(counts.sum()), 256, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(5, 384, 256, device="cuda", dtype=torch.bfloat16) * 0.05
    g = torch.randn(x.shape[0], 384, device="cuda", dtype=torch.bfloat16)
    results = {}
    for emulate in (False, True):
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = fp8_grouped_linear(xi, wi, offsets, emulate)
        y.backward(g.to(y.dtype))
        results[emulate] = (y.float(), xi.grad.float(), wi.grad.float())
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    bounds = [0, *offsets.tolist()]
    ref = torch.cat([x64[a:b] @ w64[e].t() for e, (a, b) in enumerate(zip(bounds, bounds[1:], strict=False))])
    ref.backward(g.double())
    for a, e, r in zip(results[False], results[True], (ref, x64.grad, w64.grad), strict=False):
        assert rel(a, r) < FP8_BOUND
        assert rel(a, e) < KERNEL_VS_EMULATION


@pytest.mark.gpu
@fp8_gpu
def test_fp8_model_step_close_to_bf16_on_gpu() -> None:
    cfg = tiny_model_config(**{"mla.d_model": 128, "moe.expert_intermediate_size": 128, "dense_intermediate_size": 256,
                               "mla.d_q_latent": 64, "mla.d_latent": 64, "mla.qk_nope_head_dim": 32,
                               "mla.qk_rope_head_dim": 16, "mla.v_head_dim": 32, "moe.num_expert_groups": 1,
                               "moe.num_limited_groups": 1, "mla.max_context_length": 256})
    torch.manual_seed(0)
    model = DeepSeekV3(cfg).cuda().to(torch.bfloat16)
    ref = copy.deepcopy(model)
    convert_to_fp8(model)
    ids = torch.randint(0, cfg.vocab_size, (2, 256), device="cuda")
    losses, grads = [], []
    for m in (model, ref):
        h, mtp = m(ids, return_hidden=True)
        loss = model_loss(m.head.weight, h, mtp, ids, 0.3).total
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.float().flatten() for p in m.parameters()]))
    assert abs(losses[0] - losses[1]) < 0.01 * losses[1]
    assert rel(grads[0], grads[1]) < 0.15


@pytest.mark.gpu
@block_fp8_gpu
@pytest.mark.parametrize("m,k,n", [(4096, 1024, 512), (4096, 640, 576), (1000, 200, 72), (512, 1408, 2048)])
def test_blockwise_linear_kernel_matches_emulation_and_bounds(m: int, k: int, n: int) -> None:
    """cuBLAS block-scaled `_scaled_mm` (forward, input and weight gradient) against the float32
    emulation of the same tiles, including K that is not a multiple of 128 or 512 (padded)."""
    torch.manual_seed(int(torch.randint(0, 2**31, (1,))))
    state = torch.cuda.get_rng_state()
    out, ref = _linear_case("cuda", emulate=False, m=m, k=k, n=n, recipe="blockwise")
    torch.cuda.set_rng_state(state)
    emu, _ = _linear_case("cuda", emulate=True, m=m, k=k, n=n, recipe="blockwise")
    for a, b, e in zip(out, ref, emu, strict=True):
        assert rel(a, b) < FP8_BOUND
        assert rel(a, e) < KERNEL_VS_EMULATION


@pytest.mark.gpu
@block_fp8_gpu
@pytest.mark.parametrize("backend", ["triton", "loop"])
@pytest.mark.parametrize("k,n", [(256, 384), (640, 1408), (200, 72)])
def test_blockwise_grouped_kernels_match_emulation_and_bounds(backend: str, k: int, n: int,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    if backend == "triton" and not has_triton:
        pytest.skip("triton is not installed")
    monkeypatch.setenv("LIT_DEEPSEEK_FP8_GROUPED", backend)
    counts = torch.tensor([300, 0, 1000, 17, 731], device="cuda")
    offsets = torch.cumsum(counts, 0, dtype=torch.int32)
    x = torch.randn(int(counts.sum()), k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(5, n, k, device="cuda") * 0.05
    g = torch.randn(x.shape[0], n, device="cuda", dtype=torch.bfloat16)
    results = {}
    for emulate in (False, True):
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = fp8_blockwise_grouped_linear(xi, wi, offsets, emulate)
        y.backward(g.to(y.dtype))
        results[emulate] = (y.float(), xi.grad.float(), wi.grad.float())
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    bounds = [0, *offsets.tolist()]
    ref = torch.cat([x64[a:b] @ w64[e].t() for e, (a, b) in enumerate(zip(bounds, bounds[1:], strict=False))])
    ref.backward(g.double())
    for a, e, r in zip(results[False], results[True], (ref, x64.grad, w64.grad), strict=True):
        assert rel(a, r) < FP8_BOUND
        assert rel(a, e) < KERNEL_VS_EMULATION
    assert results[False][2][1].abs().sum() == 0


@pytest.mark.gpu
@block_fp8_gpu
@pytest.mark.parametrize("recipe,compiled", [("blockwise", False), ("blockwise", True), ("rowwise", False)])
def test_fp8_model_step_close_to_bf16_mixed_on_gpu(recipe: str, compiled: bool) -> None:
    """A bf16-mixed step (float32 master weights under autocast, as `lit-deepseek fit` runs) with FP8
    against the same step without it: loss within 1%, gradients within FP8 rounding."""
    from lit_deepseek.kernels.compile import compile_blocks

    cfg = tiny_model_config(**{"mla.d_model": 256, "moe.expert_intermediate_size": 256, "dense_intermediate_size": 512,
                               "mla.d_q_latent": 128, "mla.d_latent": 128, "mla.qk_nope_head_dim": 32,
                               "mla.qk_rope_head_dim": 16, "mla.v_head_dim": 32, "moe.num_expert_groups": 1,
                               "moe.num_limited_groups": 1, "mla.max_context_length": 512})
    torch.manual_seed(0)
    model = DeepSeekV3(cfg).cuda()
    ref = copy.deepcopy(model)
    convert_to_fp8(model, recipe=recipe)
    if compiled:
        compile_blocks(model)
    ids = torch.randint(0, cfg.vocab_size, (4, 512), device="cuda")
    losses, grads = [], []
    for m in (model, ref):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            h, mtp = m(ids, return_hidden=True)
            loss = model_loss(m.head.weight, h, mtp, ids, 0.3).total
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.float().flatten() for p in m.parameters() if p.grad is not None]))
    assert abs(losses[0] - losses[1]) < 0.01 * losses[1]
    assert rel(grads[0], grads[1]) < 0.15


@pytest.mark.gpu
@block_fp8_gpu
@pytest.mark.skipif(not has_triton, reason="triton is not installed")
@pytest.mark.parametrize("block_m,block_n,n", [(64, 128, 576), (128, 128, 576), (64, 256, 700), (128, 256, 700)])
def test_triton_grouped_kernel_tile_sizes_match_emulation(block_m: int, block_n: int, n: int) -> None:
    from lit_deepseek.kernels.fp8_triton import grouped_mm_t

    counts = torch.tensor([129, 0, 700, 1, 300], device="cuda")
    offsets = torch.cumsum(counts, 0, dtype=torch.int32)
    xq, sx = quantize_1x128(torch.randn(int(counts.sum()), 640, device="cuda"))
    # column blocks of different magnitudes: a 256-column program must apply each block's own scale
    wq, sw = quantize_128x128(torch.randn(5, n, 640, device="cuda") * torch.linspace(0.1, 10, n, device="cuda")[:, None])
    out = grouped_mm_t(xq, sx, wq, sw, offsets, block_m=block_m, block_n=block_n)
    ref = blockwise_grouped_mm_t(xq, sx, wq, sw, offsets, emulate=True)
    assert rel(out, ref) < KERNEL_VS_EMULATION


def _compiled_vs_eager(recipe: str, device: str, experts: bool, backend: str = "inductor") -> list[float]:
    """Relative differences (output, input gradient, weight gradient) between a torch.compile'd
    FP8 layer (a Float8Linear, or FP8 routed experts) and the same layer run eagerly."""
    torch.manual_seed(0)
    tokens, k, n = (4096, 1024, 512) if device == "cuda" else (384, 256, 128)
    if experts:
        layer = GroupedExperts(4, k, n).to(device)
        nn.init.normal_(layer.w1, std=0.02), nn.init.normal_(layer.w2, std=0.02), nn.init.normal_(layer.w3, std=0.02)
    else:
        layer = nn.Linear(k, n, bias=False).to(device)
    convert_to_fp8(nn.Sequential(layer), recipe=recipe, emulate=device != "cuda")
    x = torch.randn(tokens, k, device=device) * 3
    counts = torch.tensor([tokens // 2, 0, tokens // 4, tokens // 4], device=device)
    outs = []
    for compiled in (False, True):
        torch._dynamo.reset()
        mod = copy.deepcopy(layer)
        fn = torch.compile(mod, backend=backend) if compiled else mod
        xi = x.clone().requires_grad_()
        with torch.autocast(device, dtype=torch.bfloat16):
            y = fn(xi, counts) if experts else fn(xi)
        y.float().pow(2).mean().backward()
        outs.append([y.detach(), xi.grad] + [p.grad for p in mod.parameters()])
    return [rel(a, b) for a, b in zip(*outs, strict=True)]


def _compiled_vs_eager_grouped_product(recipe: str, device: str) -> list[float]:
    """Relative differences (output, input gradient, weight gradient) between torch.compile (inductor)
    of one FP8 grouped product and the eager product: nothing upstream of the custom op for the
    compiler to fuse, so they must agree exactly."""
    torch.manual_seed(0)
    tokens, k, n = (4096, 1024, 512) if device == "cuda" else (384, 256, 128)
    counts = torch.tensor([tokens // 2, 0, tokens // 4, tokens // 4], device=device)
    offsets = torch.cumsum(counts, 0, dtype=torch.int32)
    x = (torch.randn(tokens, k, device=device) * 3).bfloat16()
    w = torch.randn(4, n, k, device=device) * 0.02

    def product(xi: torch.Tensor, wi: torch.Tensor) -> torch.Tensor:
        return fp8_grouped_linear(xi, wi, offsets, emulate=device != "cuda", recipe=recipe)

    outs = []
    for fn in (product, torch.compile(product)):
        torch._dynamo.reset()
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = fn(xi, wi)
        y.float().pow(2).mean().backward()
        outs.append([y.detach(), xi.grad, wi.grad])
    return [rel(a, b) for a, b in zip(*outs, strict=True)]


@pytest.mark.parametrize("recipe", ["blockwise", "rowwise"])
def test_compiled_fp8_grouped_product_equals_eager_on_cpu(recipe: str) -> None:
    assert max(_compiled_vs_eager_grouped_product(recipe, "cpu")) < 1e-6


@pytest.mark.gpu
@block_fp8_gpu
@pytest.mark.parametrize("recipe", ["blockwise", "rowwise"])
def test_compiled_fp8_grouped_product_equals_eager(recipe: str) -> None:
    """The exact check behind the experts' looser bound in test_compiled_fp8_layers_equal_eager."""
    assert max(_compiled_vs_eager_grouped_product(recipe, "cuda")) < 1e-6


@pytest.mark.gpu
@block_fp8_gpu
@pytest.mark.parametrize("experts", [False, True])
@pytest.mark.parametrize("recipe", ["blockwise", "rowwise"])
def test_compiled_fp8_layers_equal_eager(recipe: str, experts: bool) -> None:
    """torch.compile of an FP8 layer gives the eager layer's output and gradients (an earlier
    autograd.Function form compiled, on CUDA, to a backward fed an all-zero gradient: relative
    error 1). The dense layer matches exactly. The experts match to ~2e-2 with either recipe and
    either quantizer (H200): inductor fuses silu(x w1) * (x w3) into one bf16 rounding where eager
    rounds twice, which moves some e4m3 roundings of the w2 product's input (CPU inductor with the
    float32 emulation shows the same 1-2e-2); the grouped product alone matches exactly
    (test_compiled_fp8_grouped_product_equals_eager)."""
    diffs = _compiled_vs_eager(recipe, "cuda", experts)
    assert max(diffs) < (5e-2 if experts else 1e-3), diffs


@pytest.mark.parametrize("experts", [False, True])
@pytest.mark.parametrize("recipe", ["blockwise", "rowwise"])
def test_compiled_fp8_layers_equal_eager_on_cpu(recipe: str, experts: bool) -> None:
    """The same through AOT autograd on CPU (the float32 emulation inside the same custom ops). The
    experts' bf16 output may differ by an ulp in a few elements (2 of 98,304 on an AVX2 CPU: a
    float32 summation order flips a rounding; other CPUs match exactly); a wrong or missing product is off by
    orders of magnitude more."""
    assert max(_compiled_vs_eager(recipe, "cpu", experts, backend="aot_eager")) < (1e-4 if experts else 1e-5)


_QUANTIZER_CASES = """
import torch
from lit_deepseek.kernels import fp8, fp8_triton
torch.manual_seed(0)
dev = "{device}"
spread = lambda *shape: torch.randn(*shape, device=dev) * 10.0 ** torch.randint(-6, 4, shape[:-1] + (1,), device=dev)
cases = [("quantize_1x128", spread(70, 200).bfloat16()), ("quantize_1x128", spread(33, 256)),
         ("quantize_1x128", torch.zeros(5, 130, device=dev)), ("quantize_1x128_t", spread(300, 72).bfloat16()),
         ("quantize_1x128_t", spread(128, 256)), ("quantize_128x128", spread(200, 300) * 0.02),
         ("quantize_128x128", spread(3, 72, 200)), ("quantize_rows", spread(70, 96).bfloat16()),
         ("quantize_rows", spread(4, 48, 320)),
         ("quantize_rows", spread(300, 200).bfloat16().t()),
         # rows past fp8_triton._WHOLE_ROW_MAX, and transposed rows: the row-maxima + quantize pair
         # (a weight gradient's x.t(): tokens along the row)
         ("quantize_rows", spread(6, 4200).bfloat16()), ("quantize_rows", spread(4500, 40).bfloat16().t()),
         ("quantize_rows", spread(4096, 512).t()), ("quantize_rows", spread(4096, 128).bfloat16()),
         ("quantize_1x128_dual", spread(300, 200).bfloat16()), ("quantize_1x128_dual", spread(128, 256)),
         # the blockwise backward's transposed reads: a weight gradient's 4096 tokens along the tile
         # (x.t(), quantized from a contiguous copy) and the 128x128 blocks of w.t()
         ("quantize_1x128_t", spread(4096, 256)), ("quantize_128x128", (spread(300, 200) * 0.02).t()),
         # strides that are multiples of 16 (the shapes whose strided read went wrong on an H200)
         ("quantize_128x128", (spread(512, 1024) * 0.02).t()), ("quantize_128x128", spread(3, 256, 640).transpose(1, 2)),
         ("quantize_128x128", spread(256, 512)[:, ::2]),
         # bf16 operands with strides that are multiples of 16, tiled along the tokens: the shapes of
         # the routed experts' weight gradient that was wrong on an H100 (g [1024, 512], x [1024, 256])
         ("quantize_1x128_t", spread(1024, 256).bfloat16()), ("quantize_1x128_dual", spread(1024, 512).bfloat16()),
         ("quantize_1x128_t", spread(2048, 768).bfloat16()), ("quantize_1x128_dual", spread(640, 384).bfloat16()),
         ("quantize_rows", spread(1024, 256).bfloat16().t()), ("quantize_rows", spread(4096, 512).bfloat16().t())]
bad = []
for name, t in cases:
    ref, out = getattr(fp8, name)(t), getattr(fp8_triton, name)(t)
    if not fp8._same_bits(tuple(ref), tuple(out)):  # the rule the run-time kernel check applies
        bad.append(f"{{name}}{{tuple(t.shape)}}")
# the blocks of w.T from those of w (the weight reuse's input gradient; the quantizer of a transposed
# view): the bytes of torch's transposed copy, contiguous; shapes with partial tiles too
for shape in [(256, 384), (3, 384, 256), (2, 200, 72), (1, 640, 384)]:
    q = torch.randint(0, 256, shape, dtype=torch.uint8, device=dev).view(torch.float8_e4m3fn)
    s = torch.rand(*shape[:-2], -(-shape[-2] // 128), -(-shape[-1] // 128), device=dev)
    qt, st = fp8_triton.transposed_blocks(q, s)
    if not (qt.is_contiguous() and qt.dtype == q.dtype and torch.equal(st, s.transpose(-2, -1))
            and torch.equal(qt.view(torch.uint8), q.view(torch.uint8).transpose(-2, -1))):
        bad.append(f"transposed_blocks{{shape}}")
print(" ".join(bad) or "ok")
"""


def _triton_quantizer_mismatches(device: str) -> str:
    """Runs `_QUANTIZER_CASES` in a fresh process (TRITON_INTERPRET is read when triton compiles):
    "ok", or the cases where the Triton and torch quantizers differ."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), **({"TRITON_INTERPRET": "1"} if device == "cpu" else {}))
    proc = subprocess.run([sys.executable, "-c", _QUANTIZER_CASES.format(device=device)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip()


def test_a_kernel_that_gives_other_bits_runs_its_reference_from_then_on_and_says_so(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`fp8.checked_kernel`, the guard every Triton quantizer and block transpose takes on CUDA: the
    first call at a signature (the kernel variant) is compared bit for bit with the torch reference.
    A kernel that flips one bit is caught with a warning naming it and the shapes; its output is never
    returned, and that signature (other token counts of the variant too) runs the reference without
    calling the kernel again. A kernel that agrees is checked once per signature; inputs with inf are
    not checked; LIT_DEEPSEEK_FP8_CHECK=0 skips it."""
    monkeypatch.setattr(fp8, "_checked", {})
    monkeypatch.setattr(fp8, "_check_counts", {"checked": 0, "mismatched": 0})
    monkeypatch.setattr(fp8, "_warned", set())
    monkeypatch.delenv("LIT_DEEPSEEK_FP8_CHECK", raising=False)
    torch.manual_seed(0)
    x = (torch.randn(256, 384) * 10.0 ** torch.randint(-3, 3, (256, 1))).bfloat16()
    calls = {"kernel": 0, "reference": 0}

    def reference(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        calls["reference"] += 1
        return fp8.quantize_1x128(t)

    def flips_a_bit(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        calls["kernel"] += 1
        q, s = fp8.quantize_1x128(t)
        bits = q.view(torch.uint8).clone()
        bits[7, 100] ^= 1
        return bits.view(torch.float8_e4m3fn), s

    want = fp8.quantize_1x128(x)
    with pytest.warns(UserWarning, match=r"Triton kernel quantize_1x128 gave other bits .*bfloat16 \[256, 384\]"):
        got = fp8.checked_kernel("quantize_1x128", (x,), flips_a_bit, reference)
    assert fp8._same_bits(got, want)
    assert fp8.fp8_kernel_checks() == {"checked": 1, "mismatched": 1}
    got = fp8.checked_kernel("quantize_1x128", (x,), flips_a_bit, reference)
    assert fp8._same_bits(got, want) and calls == {"kernel": 1, "reference": 2}
    # another token count of the same kernel variant (multiples of 128 and 16 alike) is not trusted either
    x2 = torch.cat([x, x])
    assert fp8._same_bits(fp8.checked_kernel("quantize_1x128", (x2,), flips_a_bit, reference), fp8.quantize_1x128(x2))
    assert calls == {"kernel": 1, "reference": 3}

    # a kernel that agrees: checked at its first signature only, then trusted
    good = lambda t: (calls.__setitem__("kernel", calls["kernel"] + 1), fp8.quantize_1x128(t))[1]  # noqa: E731
    y = x.float()[:200]
    for _ in range(3):
        assert fp8._same_bits(fp8.checked_kernel("quantize_1x128", (y,), good, reference), fp8.quantize_1x128(y))
    assert calls == {"kernel": 4, "reference": 4} and fp8.fp8_kernel_checks() == {"checked": 2, "mismatched": 1}

    # not checked: inputs holding inf (a kernel and its reference may place them differently), or the check off
    z = x.float()[:96].clone()  # a signature of its own (96 rows: a multiple of 16, not of 128)
    z[3, 3] = float("inf")
    fp8.checked_kernel("quantize_1x128", (z,), flips_a_bit, reference)
    monkeypatch.setenv("LIT_DEEPSEEK_FP8_CHECK", "0")
    fp8.checked_kernel("quantize_1x128", (x[:64],), flips_a_bit, reference)
    assert fp8.fp8_kernel_checks() == {"checked": 2, "mismatched": 1} and calls["reference"] == 4


@pytest.mark.skipif(not has_triton, reason="triton is not installed")
def test_triton_quantizers_give_the_bits_of_the_torch_quantizers_interpreted() -> None:
    """The one-kernel Triton quantizers (run on CPU tensors under TRITON_INTERPRET=1) give exactly
    the e4m3 values and scales of the torch quantizers, over magnitudes from 1e-6 to 1e4."""
    assert _triton_quantizer_mismatches("cpu") == "ok"


@pytest.mark.gpu
@block_fp8_gpu
@pytest.mark.skipif(not has_triton, reason="triton is not installed")
def test_triton_quantizers_give_the_bits_of_the_torch_quantizers_on_gpu() -> None:
    assert _triton_quantizer_mismatches("cuda") == "ok"


@pytest.mark.gpu
@block_fp8_gpu
@pytest.mark.skipif(not has_triton, reason="triton is not installed")
@pytest.mark.parametrize("experts", [False, True])
def test_triton_quantizers_inside_compiled_fp8_layers(monkeypatch: pytest.MonkeyPatch, experts: bool) -> None:
    """Compiled FP8 layers equal eager ones with the Triton quantizers (the default on CUDA) as they
    do with the torch ones (LIT_DEEPSEEK_FP8_QUANT=torch)."""
    bound = 5e-2 if experts else 1e-3  # as test_compiled_fp8_layers_equal_eager
    monkeypatch.setenv("LIT_DEEPSEEK_FP8_QUANT", "torch")
    with_torch = _compiled_vs_eager("blockwise", "cuda", experts)
    monkeypatch.setenv("LIT_DEEPSEEK_FP8_QUANT", "triton")
    with_triton = _compiled_vs_eager("blockwise", "cuda", experts)
    assert max(with_triton) < bound and max(with_torch) < bound, (with_triton, with_torch)


def test_quantizer_backend_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    """LIT_DEEPSEEK_FP8_QUANT: auto (default) takes the Triton quantizers when triton imports and
    says so when it falls back; torch forces the reference ones; anything else is a clear error."""
    monkeypatch.setenv("LIT_DEEPSEEK_FP8_QUANT", "torch")
    assert fp8._quant_backend() == "torch"
    monkeypatch.setenv("LIT_DEEPSEEK_FP8_QUANT", "fast")
    with pytest.raises(ValueError, match="LIT_DEEPSEEK_FP8_QUANT='fast'"):
        fp8._quant_backend()
    monkeypatch.delenv("LIT_DEEPSEEK_FP8_QUANT")
    if has_triton:
        assert fp8._quant_backend() == "triton"
    else:
        monkeypatch.setattr(fp8, "_warned", set())
        with pytest.warns(UserWarning, match="triton is not installed"):
            assert fp8._quant_backend() == "torch"
        monkeypatch.setenv("LIT_DEEPSEEK_FP8_QUANT", "triton")
        with pytest.raises(RuntimeError, match="triton is not installed"):
            fp8._quant_backend()


# ---------------------------------------------------------------------------------- weight reuse
def _reuse_loss(part: nn.Module, h: torch.Tensor, mtp: list, labels: torch.Tensor):
    return model_loss(part.head.weight, h, mtp, labels, 0.3)


def _reuse_model() -> nn.Module:
    """A tiny blockwise FP8 model (float32 emulation) whose dense FFN, shared experts and routed
    experts take the fused gate/up products, the rest the dense and grouped ones."""
    torch.manual_seed(0)
    model = DeepSeekV3(tiny_model_config(**{"dense_intermediate_size": 128, "moe.expert_intermediate_size": 128}))
    convert_to_fp8(model, recipe="blockwise", emulate=True)
    return model


def _reuse_batch(seed: int, sequences: int = 6, vocab: int = 97) -> dict:
    ids = torch.randint(0, vocab, (sequences, 17), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}


def _count_weight_quantizations(monkeypatch: pytest.MonkeyPatch, model: nn.Module) -> list[int]:
    """Weight quantizations (`fp8._q_128x128` calls) per micro-batch: one entry per model forward, the
    backward counted with its forward."""
    calls: list[int] = []
    real = getattr(fp8._q_128x128, "__wrapped__", fp8._q_128x128)  # not an earlier counter's

    def count(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        calls[-1] += 1
        return real(t)

    count.__wrapped__ = real  # type: ignore[attr-defined]
    monkeypatch.setattr(fp8, "_q_128x128", count)
    model.register_forward_pre_hook(lambda *_: calls.append(0))
    return calls


def _reuse_step(model: nn.Module, batch: dict, micro: int = 2) -> tuple[torch.Tensor, list]:
    from lit_deepseek.training.step import LocalPlan

    loss = LocalPlan().forward_backward(model, batch, micro, _reuse_loss)
    return loss.total, [None if p.grad is None else p.grad.clone() for p in model.parameters()]


def _same_grads(a: list, b: list) -> bool:
    return all((x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))
               for x, y in zip(a, b, strict=True))


def test_weight_reuse_over_micro_batches_is_bit_identical(monkeypatch: pytest.MonkeyPatch) -> None:
    """Three micro-batches through `LocalPlan.forward_backward`: the first quantizes every weight once
    and keeps the blocks (its backward transposes them), the other two quantize none, and loss and
    gradients are bit for bit those of LIT_DEEPSEEK_FP8_WEIGHT_CACHE=0, where every micro-batch
    quantizes every weight twice (forward, and transposed for the input gradient)."""
    base, batch = _reuse_model(), _reuse_batch(0)
    runs = {}
    for env in ("1", "0"):
        monkeypatch.setenv("LIT_DEEPSEEK_FP8_WEIGHT_CACHE", env)
        fp8.clear_fp8_weight_cache()
        model = copy.deepcopy(base)
        calls = _count_weight_quantizations(monkeypatch, model)
        loss, grads = _reuse_step(model, batch)
        runs[env] = (loss, grads, calls, fp8.fp8_weight_cache_info())
    (loss_on, grads_on, calls_on, info_on), (loss_off, grads_off, calls_off, info_off) = runs["1"], runs["0"]
    assert torch.equal(loss_on, loss_off) and _same_grads(grads_on, grads_off)
    per_micro_batch = calls_off[0]
    assert per_micro_batch > 0 and calls_off == [per_micro_batch] * 3
    assert per_micro_batch % 2 == 0 and calls_on == [per_micro_batch // 2, 0, 0]
    # one miss per weight (the first forward), then its backward and both passes of the two others hit
    assert info_on["entries"] > 0 and info_on["hits"] == 5 * info_on["misses"] and info_on["bytes"] > 0
    assert info_on["reused"] == 4 * info_on["misses"]  # the hits of micro-batches 2 and 3
    assert info_off == {"entries": 0, "bytes": 0, "hits": 0, "reused": 0, "misses": 0}


def test_weights_changed_by_an_optimizer_step_are_quantized_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fused AdamW writes the weights without bumping their version counters: the next step's first
    micro-batch quantizes them anew, so its gradients are those of a fresh copy of the updated
    model run without the reuse."""
    model = _reuse_model()
    fp8.clear_fp8_weight_cache()
    monkeypatch.setenv("LIT_DEEPSEEK_FP8_WEIGHT_CACHE", "1")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    _reuse_step(model, _reuse_batch(0))
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    fresh = copy.deepcopy(model)  # new parameter objects: nothing kept applies to them
    loss, grads = _reuse_step(model, _reuse_batch(1))
    monkeypatch.setenv("LIT_DEEPSEEK_FP8_WEIGHT_CACHE", "0")
    loss_ref, grads_ref = _reuse_step(fresh, _reuse_batch(1))
    assert torch.equal(loss, loss_ref) and _same_grads(grads, grads_ref)


def test_one_micro_batch_keeps_no_weight_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _reuse_model()
    fp8.clear_fp8_weight_cache()
    calls = _count_weight_quantizations(monkeypatch, model)
    _reuse_step(model, _reuse_batch(0, sequences=2))
    assert len(calls) == 1 and calls[0] > 0
    assert fp8.fp8_weight_cache_info() == {"entries": 0, "bytes": 0, "hits": 0, "reused": 0, "misses": 0}


def test_kept_weight_blocks_key_on_the_tensor_object_and_its_version(monkeypatch: pytest.MonkeyPatch) -> None:
    """A kept entry serves only the very tensor it was filled from (not an equal copy), forward and
    transposed (its blocks transposed are those of w.T, bit for bit), until the tensor changes in
    place; it goes with the tensor."""
    fp8.clear_fp8_weight_cache()
    w = torch.randn(200, 136)

    def bits(t: torch.Tensor) -> torch.Tensor:
        return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t

    def fresh(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(bits(x) for x in quantize_128x128(t))

    with fp8.fp8_weight_reuse("fill"):
        q, s = fp8.weight_blocks(w)
    with fp8.fp8_weight_reuse("reuse"):
        assert fp8.weight_blocks(w)[0] is q
        twin = w.clone()
        assert fp8.weight_blocks(twin)[0] is not q
        qt, st = fp8.weight_blocks(w, transposed=True)
        assert all(torch.equal(a, b) for a, b in zip((bits(qt), st), fresh(w.t()), strict=True))
        w.mul_(3)
        q2, s2 = fp8.weight_blocks(w)
        assert all(torch.equal(a, b) for a, b in zip((bits(q2), s2), fresh(w), strict=True))
    assert fp8.fp8_weight_cache_info()["entries"] == 2  # w and its twin; w.T's blocks are w's transposed
    # blocks of an earlier step's fill never serve a later step, even for a weight changed without a
    # version bump (as fused AdamW does) and left untouched by the later step's first micro-batch
    with fp8.fp8_weight_reuse("fill"):
        fp8.weight_blocks(twin)
    version = w._version
    w.data.mul_(0.5)
    assert w._version == version
    with fp8.fp8_weight_reuse("reuse"):
        q3, s3 = fp8.weight_blocks(w)
        assert all(torch.equal(a, b) for a, b in zip((bits(q3), s3), fresh(w), strict=True))
    with fp8.fp8_weight_reuse("off"):
        fp8.weight_blocks(torch.randn(128, 128))
    del w, twin
    assert fp8.fp8_weight_cache_info()["entries"] == 0
    monkeypatch.setenv("LIT_DEEPSEEK_FP8_WEIGHT_CACHE", "yes")
    with pytest.raises(ValueError, match="LIT_DEEPSEEK_FP8_WEIGHT_CACHE"), fp8.fp8_weight_reuse("fill"):
        pass


@pytest.mark.gpu
@block_fp8_gpu
def test_weight_reuse_under_cuda_graphs_matches_no_reuse_on_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Three micro-batches per step through `LocalPlan(cuda_graphs=True)`, past the warm-up into
    capture (the first micro-batch's graph in "fill", the later ones' in "reuse") and replays, against
    a second graphed plan captured with LIT_DEEPSEEK_FP8_WEIGHT_CACHE=0, every step from the same
    weights; the optimizer (fused AdamW) then steps, so the replays see weights changed in place."""
    from lit_deepseek.model import DeepSeekV3 as Model
    from lit_deepseek.training.step import LocalPlan, build_optimizer, make_loss_fn
    from tests.test_cuda_graphs import gpu_config

    cfg = gpu_config(micro=2, global_batch=6, compile_=False, fp8=True)
    t = cfg.training
    reuse, reference = LocalPlan(cuda_graphs=True), LocalPlan(cuda_graphs=True)
    with torch.device("cuda"):
        model = Model(cfg.model)
    model.init_weights(seed=7)
    model = reuse.parallelize(model, cfg)  # converts to FP8; no setting of cfg blocks the graphs
    optimizer, _ = build_optimizer(reuse, model, cfg)
    loss_fn = make_loss_fn(cfg.model, t)
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(0)
    fp8.clear_fp8_weight_cache()
    for step in range(5):  # two warm-up steps, the capture, two replayed steps
        ids = torch.randint(0, cfg.model.vocab_size, (t.global_batch_size, t.seq_length + 1), generator=gen).cuda()
        batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
        runs = []
        for plan, env in ((reference, "0"), (reuse, "1")):
            monkeypatch.setenv("LIT_DEEPSEEK_FP8_WEIGHT_CACHE", env)
            with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
                loss = plan.forward_backward(model, batch, t.micro_batch_size, loss_fn).total.item()
            runs.append((loss, torch.cat([p.grad.flatten() for p in params])))
            optimizer.zero_grad(set_to_none=True)
        (l0, g0), (l1, g1) = runs
        err = ((g1 - g0).norm() / g0.norm()).item()
        print(f"step {step}: loss {l0:.6f} vs {l1:.6f}, relative gradient difference {err:.2e}")  # shown with -s
        assert abs(l1 - l0) <= 2e-3 * abs(l0), (step, l0, l1)
        assert err < 8e-2, (step, err)  # test_graphed_steps_equal_eager_steps_on_gpu's FP8 bound
        for p, g in zip(params, torch.split(g1, [p.numel() for p in params]), strict=True):
            p.grad = g.view_as(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert reuse.graphs(model).captured == 2 and reference.graphs(model).captured == 2
    info = fp8.fp8_weight_cache_info()
    assert info["entries"] > 0 and info["reused"] > 0  # the later micro-batches' graph took the kept blocks
