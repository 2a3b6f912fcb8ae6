"""The eager Triton kernels against their PyTorch references, one layer call at a time, on one CUDA
GPU: a diagnosis of where an eager step's time goes, not a product figure (the product figures
come from `bench_fit.py`).

At the small config's shapes (8 x 4096 = 32768 tokens, d_model 1024, 16 heads of 64 + 32 query/key
dims, KV latent 256) it times forward + backward through autograd of:

* `rms_norm` over the residual stream (float32 under bf16-mixed), asked for a float32 output and
  for a bf16 one (a norm that feeds matmuls only), and over the bf16 KV latent;
* `swiglu` on the halves of one fused gate/up product;
* `assemble_qk`, MLA's queries and keys with RoPE, from the projections' real layouts (the
  queries a view of the q_b product, k_nope a strided slice of the kv_b product, the shared key a
  slice of the KV down-projection) and gradients in the layout attention's backward returns.

CUDA events (`fp8_ops_probe.bench`), 20 calls after 3 warm-up calls, each call's host overhead included.

    python benchmarks/eager_kernels_probe.py
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from fp8_ops_probe import bench  # benchmarks/ is on sys.path when run as a script

from lit_deepseek.kernels.mla_rope import AssembleQKFunction, assemble_qk_reference
from lit_deepseek.kernels.rms_norm import RMSNormFunction, rms_norm_reference
from lit_deepseek.kernels.swiglu import SwiGLUFunction, swiglu_reference

B, S, D, H, NOPE, ROPE, V, LATENT, FFN = 8, 4096, 1024, 16, 64, 32, 64, 256, 2560


def norm_case(x_dtype: torch.dtype, width: int, out_dtype: torch.dtype | None) -> dict[str, Callable[[], Any]]:
    x = torch.randn(B * S, width, device="cuda", dtype=x_dtype, requires_grad=True)
    w = torch.ones(width, device="cuda", requires_grad=True)
    dy = torch.randn(B * S, width, device="cuda", dtype=out_dtype or torch.float32)

    def run(fn: Callable[..., torch.Tensor]) -> Callable[[], Any]:
        return lambda: fn(x, w, 1e-6, out_dtype).backward(dy)

    return {"triton": run(RMSNormFunction.apply), "reference": run(rms_norm_reference)}


def swiglu_case() -> dict[str, Callable[[], Any]]:
    gu = torch.randn(B * S, 2 * FFN, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dh = torch.randn(B * S, FFN, device="cuda", dtype=torch.bfloat16)

    def run(fn: Callable[..., torch.Tensor]) -> Callable[[], Any]:
        return lambda: fn(*gu.chunk(2, dim=-1)).backward(dh)

    return {"triton": run(SwiGLUFunction.apply), "reference": run(swiglu_reference)}


def qk_case() -> dict[str, Callable[[], Any]]:
    dt = torch.bfloat16
    q = torch.randn(B, S, H * (NOPE + ROPE), device="cuda", dtype=dt, requires_grad=True)
    kv = torch.randn(B, S, H, NOPE + V, device="cuda", dtype=dt, requires_grad=True)
    latent = torch.randn(B, S, LATENT + ROPE, device="cuda", dtype=dt, requires_grad=True)
    angles = torch.rand(1, S, ROPE // 2, device="cuda") * 6
    cos, sin = angles.cos(), angles.sin()
    # attention's backward hands gradients back as [B, H, S, dim] transposed to [B, S, H, dim]
    dq = torch.randn(B, H, S, NOPE + ROPE, device="cuda", dtype=dt).transpose(1, 2)
    dk = torch.randn(B, H, S, NOPE + ROPE, device="cuda", dtype=dt).transpose(1, 2)

    def run(fn: Callable[..., tuple[torch.Tensor, torch.Tensor]]) -> Callable[[], Any]:
        def step() -> None:
            qo, ko = fn(q.view(B, S, H, NOPE + ROPE), kv[..., :NOPE], latent[..., LATENT:], cos, sin)
            torch.autograd.backward((qo, ko), (dq, dk))
        return step

    return {"triton": run(AssembleQKFunction.apply), "reference": run(assemble_qk_reference)}


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("eager_kernels_probe: needs a CUDA GPU (the kernels run on CUDA tensors only)")
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__}")
    cases = {
        f"rms_norm [{B * S} x {D}] float32 in, float32 out": norm_case(torch.float32, D, None),
        f"rms_norm [{B * S} x {D}] float32 in, bf16 out (feeds matmuls)": norm_case(torch.float32, D, torch.bfloat16),
        f"rms_norm [{B * S} x {LATENT}] bf16 in, bf16 out (KV latent)": norm_case(torch.bfloat16, LATENT, torch.bfloat16),
        f"swiglu [{B * S} x {FFN}] bf16, halves of one product": swiglu_case(),
        f"assemble_qk [{B} x {S}, {H} heads, {NOPE}+{ROPE}] bf16": qk_case(),
    }
    print("| layer call, forward + backward | reference ms | Triton ms | speed-up |")
    print("| --- | --- | --- | --- |")
    for name, fns in cases.items():
        ref, tri = bench(fns["reference"], 20), bench(fns["triton"], 20)
        print(f"| {name} | {ref:.3f} | {tri:.3f} | {ref / tri:.2f}x |")


if __name__ == "__main__":
    main()
