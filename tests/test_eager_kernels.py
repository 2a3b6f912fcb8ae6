"""The eager Triton kernels (`lit_deepseek.kernels.rms_norm`, `lit_deepseek.kernels.swiglu`)
against their PyTorch references, and when the model takes them.

The same cases run on CPU tensors under TRITON_INTERPRET=1 (a fresh process: the variable is read
when triton compiles) and on the GPU: outputs and every gradient, for float32 and bf16 activations,
float32 gains (bf16-mixed) and bf16 gains (bf16-true), widths that are not powers of two, row
counts that leave partial tiles, strided inputs (a slice of a wider projection, as the KV latent
and a fused gate/up product are) and broadcast output gradients. Bounds are relative to the
largest element of each result.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from lit_deepseek.kernels import eager
from lit_deepseek.kernels import mla_rope as mr
from lit_deepseek.kernels import rms_norm as rms
from lit_deepseek.kernels import swiglu as sw
from lit_deepseek.model.moe import SwiGLU
from lit_deepseek.model.norm import RMSNorm

ROOT = Path(__file__).resolve().parents[1]
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_triton = pytest.mark.skipif(not eager.HAS_TRITON, reason="triton is not installed")

_CASES = r"""
import torch
from lit_deepseek.kernels.rms_norm import RMSNormFunction, rms_norm_reference
from lit_deepseek.kernels.swiglu import SwiGLUFunction, swiglu_reference
from lit_deepseek.kernels.mla_rope import AssembleQKFunction, assemble_qk_reference

device = "{device}"
torch.manual_seed(0)
bad = []


def tolerance(*dtypes):
    # bf16 results differ where an ulp of a float32 sum flips a rounding; the interpreter also
    # rounds float32 -> bf16 towards zero where the GPU (and torch) round to nearest even
    return 1e-5 if all(d == torch.float32 for d in dtypes) else (8e-3 if device == "cuda" else 2e-2)


def compare(label, got, want, tol, names=("out", "grad 1", "grad 2")):
    for name, a, b in zip(names, got, want):
        if a.dtype != b.dtype or a.shape != b.shape:
            bad.append(f"{{label}} {{name}}: {{a.dtype}}{{tuple(a.shape)}} vs {{b.dtype}}{{tuple(b.shape)}}")
        elif b.numel():
            err = ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-6)).item()
            if not err <= tol:
                bad.append(f"{{label}} {{name}}: relative error {{err:.2e}} > {{tol}}")


# RMSNorm: (rows, width, x dtype, weight dtype, strided x, broadcast dy, asked output dtype)
# (an asked bf16 output: a norm feeding matmuls under autocast, float32 residual or bf16 latent in)
for rows, n, xd, wd, strided, broadcast, od in [
    (37, 96, torch.float32, torch.float32, False, False, None),
    (64, 1024, torch.float32, torch.float32, False, False, None),
    (50, 1000, torch.bfloat16, torch.float32, False, False, None),
    (33, 256, torch.bfloat16, torch.float32, True, False, None),
    (40, 512, torch.bfloat16, torch.bfloat16, False, False, None),
    (3, 7168, torch.bfloat16, torch.float32, False, False, None),
    (29, 320, torch.float32, torch.float32, True, True, None),
    (0, 64, torch.float32, torch.float32, False, False, None),
    (48, 1024, torch.float32, torch.float32, False, False, torch.bfloat16),
    (31, 512, torch.bfloat16, torch.float32, True, False, torch.bfloat16),
]:
    base = torch.randn(2, rows, n + (32 if strided else 0), device=device) * 3
    w = 1 + 0.1 * torch.randn(n, device=device)
    out_dtype = od or torch.promote_types(wd, xd)
    dy = (torch.randn(n, device=device).expand(2, rows, n) if broadcast
          else torch.randn(2, rows, n, device=device)).to(out_dtype)
    results = []
    for fn in (RMSNormFunction.apply, rms_norm_reference):
        x = base.to(xd)[..., :n].detach().requires_grad_()  # a strided view when strided
        wi = w.to(wd).requires_grad_()
        y = fn(x, wi, 1e-6, od)
        y.backward(dy)
        results.append([y.detach(), x.grad, wi.grad])
    compare(f"rms_norm{{(rows, n, str(xd), str(wd), strided, broadcast, str(od))}}", *results,
            tolerance(xd, wd, out_dtype))

# SwiGLU: (leading shape, width, dtype, gate and up as halves of one fused product)
for lead, n, dt, fused in [
    ((37,), 96, torch.float32, False),
    ((2, 33), 2560, torch.bfloat16, False),
    ((45,), 1408, torch.bfloat16, True),
    ((3, 5), 700, torch.float32, True),
    ((0,), 128, torch.bfloat16, False),
]:
    gu = torch.randn(*lead, 2 * n, device=device) * 4
    dh = torch.randn(*lead, n, device=device).to(dt)
    results = []
    for fn in (SwiGLUFunction.apply, swiglu_reference):
        if fused:
            src = gu.to(dt).requires_grad_()
            gate, up = src.chunk(2, dim=-1)
        else:
            gate = gu[..., :n].to(dt).contiguous().requires_grad_()
            up = gu[..., n:].to(dt).contiguous().requires_grad_()
        h = fn(gate, up)
        h.backward(dh)
        grads = [src.grad[..., :n], src.grad[..., n:]] if fused else [gate.grad, up.grad]
        results.append([h.detach(), *grads])
    compare(f"swiglu{{(lead, n, str(dt), fused)}}", *results, tolerance(dt))

# MLA queries and keys with RoPE: (batch, positions, heads, nope, rope, dtype, per-batch cos/sin).
# q is a view of a projection, k_nope a slice of the decompressed [k_nope, v] and the shared key a
# slice of the KV down-projection, as in the model; dq and dk arrive transposed from attention.
for b, s, h, nope, r, dt, per_batch in [
    (2, 7, 3, 16, 8, torch.float32, False),
    (1, 9, 16, 64, 32, torch.bfloat16, False),
    (3, 5, 5, 24, 12, torch.bfloat16, True),
    (2, 4, 128, 128, 64, torch.bfloat16, False),
    (1, 0, 4, 16, 8, torch.float32, False),
]:
    width = nope + r
    q_src = torch.randn(b, s, h * width, device=device) * 2
    kv_src = torch.randn(b, s, h, nope + 40, device=device)
    latent_src = torch.randn(b, s, 24 + r, device=device)
    angles = torch.rand(b if per_batch else 1, s, r // 2, device=device) * 6.3
    cos, sin = angles.cos(), angles.sin()
    dq = torch.randn(b, h, s, width, device=device).to(dt).transpose(1, 2)
    dk = torch.randn(b, h, s, width, device=device).to(dt).transpose(1, 2)
    results = []
    for fn in (AssembleQKFunction.apply, assemble_qk_reference):
        qs, kvs, ls = (t.to(dt).requires_grad_() for t in (q_src, kv_src, latent_src))
        q_out, k_out = fn(qs.view(b, s, h, width), kvs[..., :nope], ls[..., 24:], cos, sin)
        torch.autograd.backward((q_out, k_out), (dq, dk))
        results.append([torch.cat((q_out.detach(), k_out.detach()), -1), qs.grad, kvs.grad, ls.grad])
    label = f"mla_rope{{(b, s, h, nope, r, str(dt), per_batch)}}"
    compare(label, results[0][:3], results[1][:3], tolerance(dt), ("q, k", "grad q", "grad k_nope"))
    # the shared key's gradient is a bf16 rounding of a sum over heads, then four more roundings:
    # under the interpreter's truncation (see tolerance) its error reaches a few ulps of the largest
    compare(label + " shared key", results[0][3:], results[1][3:], tolerance(dt) * (2 if device == "cpu" else 1),
            ("grad k_rope",))
print("\n".join(bad) or "ok")
"""


def _mismatches(device: str) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT), **({"TRITON_INTERPRET": "1"} if device == "cpu" else {}))
    proc = subprocess.run([sys.executable, "-c", _CASES.format(device=device)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip()


@needs_triton
def test_eager_kernels_match_references_interpreted() -> None:
    assert _mismatches("cpu") == "ok"


@pytest.mark.gpu
@gpu
@needs_triton
def test_eager_kernels_match_references_on_gpu() -> None:
    assert _mismatches("cuda") == "ok"


@pytest.mark.gpu
@gpu
@needs_triton
def test_layers_take_the_kernels_eagerly_and_the_references_when_compiled(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under bf16 autocast with float32 weights (the default precision), the layers' eager outputs
    are the kernels', bit for bit; compiled layers trace the references, and both agree.
    LIT_DEEPSEEK_EAGER_KERNELS=torch keeps the references."""
    torch.manual_seed(0)
    norm = RMSNorm(1024).cuda()
    ffn = SwiGLU(1024, 2560).cuda()
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.1)
        for p in ffn.parameters():
            p.normal_(0.0, 0.02)
    x = torch.randn(4, 512, 1024, device="cuda", dtype=torch.bfloat16)
    with torch.autocast("cuda", torch.bfloat16):
        normed = norm(x)
        h = ffn(normed)
        assert torch.equal(normed, rms.RMSNormFunction.apply(x, norm.weight, norm.eps))
        # feeding matmuls, the norm writes bf16 itself: autocast's round-to-nearest cast of its output
        assert torch.equal(norm(x, for_matmul=True), normed.to(torch.bfloat16))
        gate, up = eager.project_siblings(normed, ffn.gate_proj, ffn.up_proj)  # one GEMM, as the layer runs
        assert torch.equal(h, ffn.down_proj(sw.SwiGLUFunction.apply(gate, up)))
        normed_c = torch.compile(norm, fullgraph=True)(x)
        h_c = torch.compile(ffn, fullgraph=True)(normed)
    assert normed.dtype == torch.float32 and h.dtype == torch.bfloat16
    assert rms.fused_applies(x, norm.weight) and sw.fused_applies(gate, up)
    assert eager.siblings_fuse(normed, ffn.gate_proj, ffn.up_proj) and gate.data_ptr() + 2 * 2560 == up.data_ptr()
    assert (normed_c - normed).abs().max().item() <= 8e-3 * normed.abs().max().item()
    assert (h_c.float() - h.float()).abs().max().item() <= 2e-2 * h.float().abs().max().item()
    monkeypatch.setenv(eager.ENV, "torch")
    assert not rms.fused_applies(x, norm.weight) and not sw.fused_applies(gate, up)
    assert not eager.siblings_fuse(normed, ffn.gate_proj, ffn.up_proj)


def test_eager_kernel_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    """CPU tensors take the references; LIT_DEEPSEEK_EAGER_KERNELS accepts auto, triton and torch
    only; CUDA without triton says so once per layer kind instead of falling back silently."""
    x, w = torch.randn(3, 8), torch.ones(8)
    assert not rms.fused_applies(x, w) and not sw.fused_applies(x, x)
    assert torch.equal(rms.rms_norm(x, w, 1e-6), rms.rms_norm_reference(x, w, 1e-6))
    norm = RMSNorm(8)
    assert torch.equal(norm(x, for_matmul=True), norm(x))  # no autocast: the matmul dtype is x's
    with torch.autocast("cpu", torch.bfloat16):
        assert torch.equal(norm(x, for_matmul=True), norm(x).to(torch.bfloat16)) and norm(x).dtype == torch.float32
    assert torch.equal(sw.swiglu(x, x), sw.swiglu_reference(x, x))
    q, k_nope, k_rope = torch.randn(1, 2, 3, 12), torch.randn(1, 2, 3, 8), torch.randn(1, 2, 4)
    cos, sin = torch.randn(1, 2, 2), torch.randn(1, 2, 2)
    assert not mr.fused_applies(q, k_nope, k_rope)
    assert all(torch.equal(a, b) for a, b in zip(mr.assemble_qk(q, k_nope, k_rope, cos, sin),
                                                  mr.assemble_qk_reference(q, k_nope, k_rope, cos, sin), strict=True))
    meta = torch.empty(3, 8, device="meta")
    meta_qk = [torch.empty(t.shape, device="meta") for t in (q, k_nope, k_rope)]
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setenv(eager.ENV, "fast")
    with pytest.raises(ValueError, match="LIT_DEEPSEEK_EAGER_KERNELS: must be auto, triton or torch"):
        rms.fused_applies(meta, w)
    monkeypatch.setenv(eager.ENV, "auto")
    monkeypatch.setattr(eager, "HAS_TRITON", False)
    monkeypatch.setattr(eager, "_warned", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            assert not rms.fused_applies(meta, w)
            assert not sw.fused_applies(meta, meta)
            assert not mr.fused_applies(*meta_qk)
    messages = [str(c.message) for c in caught]
    assert sum(m.startswith("RMSNorm: triton is not installed") for m in messages) == 1
    assert sum(m.startswith("SwiGLU: triton is not installed") for m in messages) == 1
    assert sum(m.startswith("MLA RoPE: triton is not installed") for m in messages) == 1
    monkeypatch.setenv(eager.ENV, "triton")
    with pytest.raises(RuntimeError, match="LIT_DEEPSEEK_EAGER_KERNELS=triton: triton is not installed"):
        sw.fused_applies(meta, meta)


_MODEL_CASE = r"""
import torch
from lit_deepseek.kernels import eager, mla_rope, rms_norm, swiglu
from lit_deepseek.model import DeepSeekV3
from lit_deepseek.model.moe import GroupedExperts
from lit_deepseek.training.loss import model_loss
from tests.conftest import tiny_model_config

# bf16 routed experts take the grouped GEMM on CPU too, so their SwiGLU is the kernel's
plain_forward = GroupedExperts.forward
GroupedExperts.forward = lambda self, x, counts, use_grouped_mm=None: plain_forward(
    self, x, counts, x.dtype == torch.bfloat16 if use_grouped_mm is None else use_grouped_mm)
calls = {{"RMSNorm": 0, "SwiGLU": 0, "MLA RoPE": 0, "siblings": 0}}


def forced(kind):
    def applies(*tensors):
        calls[kind] += 1
        return True
    return applies


# every token to every expert: no top-k choice for a rounding to flip, so bf16 gradients stay comparable
cfg = tiny_model_config(**{{"mla.d_model": 64, "moe.expert_intermediate_size": 32, "dense_intermediate_size": 96,
                           "moe.num_experts_per_token": 8, "moe.num_expert_groups": 1, "moe.num_limited_groups": 1}})
torch.manual_seed(0)
base = DeepSeekV3(cfg)
ids = torch.randint(0, cfg.vocab_size, (2, 24))
worst = {{}}
for dtype, bound in ((torch.float32, 1e-5), (torch.bfloat16, 5e-2)):
    results = []
    for kernels in (True, False):
        rms_norm.fused_applies = forced("RMSNorm") if kernels else (lambda *t: False)
        swiglu.fused_applies = forced("SwiGLU") if kernels else (lambda *t: False)
        mla_rope.fused_applies = forced("MLA RoPE") if kernels else (lambda *t: False)
        eager.siblings_fuse = forced("siblings") if kernels else (lambda *t: False)
        model = DeepSeekV3(cfg).to(dtype)
        model.load_state_dict(base.state_dict())
        h, mtp = model(ids, return_hidden=True)
        loss = model_loss(model.head.weight, h, mtp, ids, 0.3).total
        loss.backward()
        results.append((loss.detach().float(), {{n: p.grad.float() for n, p in model.named_parameters()
                                                 if p.grad is not None}}))
    (l1, g1), (l2, g2) = results
    assert g1.keys() == g2.keys()
    errs = {{n: ((g1[n] - g2[n]).norm() / g2[n].norm().clamp(min=1e-12)).item() for n in g2}}
    name = max(errs, key=errs.get)
    worst[str(dtype)] = (abs(l1 - l2).item() / l2.item(), name, errs[name])
    assert abs(l1 - l2).item() <= bound * l2.item() and errs[name] <= bound, worst
print(calls["RMSNorm"], calls["SwiGLU"], calls["MLA RoPE"], calls["siblings"], worst)
"""


@needs_triton
def test_model_with_the_kernels_equals_the_model_with_the_references_interpreted() -> None:
    """Every call site (block, latent, final and MTP norms; dense, shared and routed SwiGLU, the
    routed ones through the grouped GEMM in bf16; each attention's queries and keys; the sibling
    projections as one GEMM) runs the kernels, interpreted on CPU tensors, and
    the loss and every parameter gradient equal the reference model's: 1e-5 relative in float32,
    5e-2 in bf16 (measured 2e-2; the interpreter rounds bf16 towards zero)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", _MODEL_CASE.format()], env=env, capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    norms, swiglus, ropes, siblings = (int(v) for v in proc.stdout.split()[:4])
    cfg_layers = 3 + 1  # tiny config: 3 layers and one MTP block
    # per layer: block norms (2) and latent norms (2); final norm; MTP: two input norms and its own
    assert norms == 2 * (cfg_layers * 4 + 1 + 3), proc.stdout
    # the first layer's dense FFN and the shared experts of the 3 MoE blocks (MTP's included) in both
    # runs; the routed experts in the bf16 run (float32 experts on CPU take the per-expert loop)
    moe_blocks = cfg_layers - 1
    assert swiglus == (1 + moe_blocks) + (1 + 2 * moe_blocks), proc.stdout
    assert ropes == 2 * cfg_layers, proc.stdout  # each attention's queries and keys, both dtypes
    # one GEMM for each attention's two down-projections and each dense or shared SwiGLU's gate and up
    assert siblings == 2 * (cfg_layers + 1 + moe_blocks), proc.stdout


@pytest.mark.gpu
@gpu
@needs_triton
def test_attention_takes_the_rope_kernel_eagerly(monkeypatch: pytest.MonkeyPatch) -> None:
    """An MLA layer of the small config's shape under bf16 autocast (float32 weights, as
    `lit-deepseek fit` runs) assembles its queries and keys with the kernel once per call, and its
    output and gradients agree with the same layer on the references."""
    from lit_deepseek.model.attention import MultiHeadLatentAttention
    from lit_deepseek.model.rope import RotaryEmbedding
    from tests.conftest import tiny_model_config

    mla = tiny_model_config(**{"mla.d_model": 1024, "mla.d_latent": 256, "mla.d_q_latent": 512, "mla.num_heads": 16,
                               "mla.qk_nope_head_dim": 64, "mla.qk_rope_head_dim": 32, "mla.v_head_dim": 64,
                               "mla.max_context_length": 1024}).mla
    torch.manual_seed(0)
    attn, rope = MultiHeadLatentAttention(mla).cuda(), RotaryEmbedding(mla).cuda()
    x = torch.randn(2, 1024, 1024, device="cuda")
    cos, sin = rope(torch.arange(1024, device="cuda")[None])
    launches = []
    plain_apply = mr.AssembleQKFunction.apply
    monkeypatch.setattr(mr.AssembleQKFunction, "apply", lambda *a: launches.append(1) or plain_apply(*a))
    results = []
    for backend in ("auto", "torch"):
        monkeypatch.setenv(eager.ENV, backend)
        attn.zero_grad()
        xi = x.clone().requires_grad_()
        with torch.autocast("cuda", torch.bfloat16):
            out = attn(xi, cos, sin)
        out.float().square().mean().backward()
        results.append([out.float(), xi.grad, *(p.grad for p in attn.parameters())])
    assert len(launches) == 1
    for a, b in zip(*results, strict=True):
        assert ((a - b).norm() / b.norm()).item() < 2e-2
