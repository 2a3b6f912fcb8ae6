"""FP8 products against bf16, op by op, on one CUDA GPU: a diagnosis of where an FP8 step's time
goes, not a product figure (the product figures come from `bench_fp8.py --phases speed`).

At the small config's shapes (8 x 4096 = 32768 tokens; the dense projections of one layer, and the
routed experts' grouped products over 16 experts with 65536 routed rows) it times forward + backward
of `fp8_linear` / `fp8_grouped_linear` (blockwise, blockwise with the bf16 expert weight gradient that
the product runs by default, and rowwise: the custom ops the product runs)
against the bf16 products of the default precision, and, separately, the quantizers and the
forward GEMMs alone. CUDA events, 10 (5 for the experts) calls after 3 warm-up calls.

    python benchmarks/fp8_ops_probe.py
    LIT_DEEPSEEK_FP8_QUANT=triton python benchmarks/fp8_ops_probe.py   # the products with the Triton quantizers
    python benchmarks/fp8_ops_probe.py --tiles   # only the tile/warp/stage sweep of the grouped Triton kernels

`--tiles` times the routed experts' blockwise Triton kernels (`fp8_triton.grouped_mm_t`, forward and
input gradient; `fp8_triton.grouped_wgrad`, weight gradient) at the small config's expert shapes for
several launch configurations, the first of each list being the default, checks each against the
default's output, and prints TFLOP/s next to the bf16 `torch._grouped_mm` of the same product.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

import lit_deepseek.kernels.fp8 as fp8

TOKENS = 32768
#: (K, N, count) of the dense products of one MoE layer of the small config: q_a, q_b, kv_a, kv_b,
#: o, the shared expert's w1 and w3, and its w2
DENSE = ((1024, 512, 1), (512, 1536, 1), (1024, 288, 1), (256, 2048, 1), (1024, 1024, 1), (1024, 2560, 2),
         (2560, 1024, 1))
EXPERTS, ROUTED = 16, 65536


HOST: dict[str, float] = {}


def bench(fn: Callable[[], Any], n: int = 10, host_key: str = "") -> float:
    """Milliseconds per call of fn (CUDA events, after 3 warm-up calls); with host_key, the host
    (Python and launch) milliseconds per call are kept in HOST[host_key]: when they exceed the device
    time, the products are bound by the host, not by their kernels."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0 = time.perf_counter()
    start.record()
    for _ in range(n):
        fn()
    end.record()
    if host_key:
        HOST[host_key] = HOST.get(host_key, 0.0) + (time.perf_counter() - t0) * 1e3 / n
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n


def dense() -> None:
    total = {"bf16": 0.0, "blockwise": 0.0, "rowwise": 0.0}
    for k, n, count in DENSE:
        row = dense_product(k, n)
        for key in total:
            total[key] += row[key] * count
    print("dense products of one layer, fwd+bwd ms:", {k: round(v, 2) for k, v in total.items()}, flush=True)
    print("  host ms per call of each product (the sum over the shapes, each counted once):",
          {k: round(v, 2) for k, v in HOST.items()}, flush=True)


def dense_product(k: int, n: int) -> dict[str, float]:
    x = torch.randn(TOKENS, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(n, k, device="cuda") * 0.02).requires_grad_()
    g = torch.randn(TOKENS, n, device="cuda", dtype=torch.bfloat16)

    def bf16() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = F.linear(x, w)
        y.backward(g)

    row = {"bf16": bench(bf16, host_key="dense bf16")}
    for recipe in ("blockwise", "rowwise"):
        row[recipe] = bench(lambda r=recipe: fp8.fp8_linear(x, w, r, False, torch.bfloat16).backward(g),
                            host_key=f"dense {recipe}")
    q_x, q_w, q_rows = (bench(lambda: fp8.quantize_1x128(x)), bench(lambda: fp8.quantize_128x128(w)),
                        bench(lambda: fp8.quantize_rows(x)))
    from lit_deepseek.kernels import fp8_triton

    q_x_triton = bench(lambda: fp8_triton.quantize_1x128(x))
    xq, sx = fp8.quantize_1x128(x)
    wq, sw = fp8.quantize_128x128(w)
    mm_fp8 = bench(lambda: fp8.blockwise_mm_t(xq, sx, wq, sw, True, False))
    mm_bf16 = bench(lambda: x @ w.to(torch.bfloat16).t())
    print(f"dense K={k} N={n}: fwd+bwd bf16 {row['bf16']:.2f} ms, blockwise {row['blockwise']:.2f}, rowwise "
          f"{row['rowwise']:.2f} | quantize x 1x128 {q_x:.2f} (Triton {q_x_triton:.2f}), w 128x128 {q_w:.2f}, x rows {q_rows:.2f} | "
          f"forward GEMM blockwise FP8 {mm_fp8:.2f} vs bf16 {mm_bf16:.2f}", flush=True)
    return row


def experts() -> None:
    counts = torch.full((EXPERTS,), ROUTED // EXPERTS, device="cuda")
    offsets = counts.cumsum(0).to(torch.int32)
    for k, n in ((1024, 2560), (2560, 1024)):
        experts_product(k, n, offsets)
    gate_up(1024, 2560, offsets)


def gate_up(k: int, n: int, offsets: torch.Tensor) -> None:
    """SwiGLU's gate and up products, blockwise, for the routed experts and for a dense layer (the
    shared expert): one product over both weights (`fp8_grouped_gate_up` / `fp8_gate_up`, what the
    model runs) against two products."""
    for grouped in (True, False):
        gate_up_pair(k, n, offsets, grouped)


def gate_up_pair(k: int, n: int, offsets: torch.Tensor, grouped: bool) -> None:
    x = torch.randn(ROUTED if grouped else TOKENS, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w1, w3 = ((torch.randn(*((EXPERTS,) if grouped else ()), n, k, device="cuda") * 0.02).requires_grad_()
              for _ in range(2))
    g = torch.randn(x.shape[0], n, device="cuda", dtype=torch.bfloat16)
    if grouped:  # bf16 expert weight gradient, the product's default (training.fp8_expert_wgrad)
        fused = lambda: fp8.fp8_grouped_gate_up(x, w1, w3, offsets, False, True)  # noqa: E731
        separate = lambda: [fp8.fp8_grouped_linear(x, w, offsets, False, "blockwise", True) for w in (w1, w3)]  # noqa: E731
    else:
        fused = lambda: fp8.fp8_gate_up(x, w1, w3)  # noqa: E731
        separate = lambda: [fp8.fp8_linear(x, w, "blockwise") for w in (w1, w3)]  # noqa: E731
    kind = "experts" if grouped else "dense"
    times = {name: bench(lambda f=fn: torch.autograd.backward(list(f()), [g, g]), 5, host_key=f"{kind} gate_up {name}")
             for name, fn in (("fused", fused), ("separate", separate))}
    print(f"{kind} gate + up, K={k} N={n} each, blockwise fwd+bwd: " + ", ".join(
        f"{a} {b:.2f} ms (host {HOST[f'{kind} gate_up {a}']:.2f})" for a, b in times.items()), flush=True)


def experts_product(k: int, n: int, offsets: torch.Tensor) -> None:
    x = torch.randn(ROUTED, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(EXPERTS, n, k, device="cuda") * 0.02).requires_grad_()
    g = torch.randn(ROUTED, n, device="cuda", dtype=torch.bfloat16)
    grouped_mm = fp8._grouped_mm()

    def bf16() -> None:
        grouped_mm(x, w.to(torch.bfloat16).transpose(-2, -1), offs=offsets).backward(g)

    res = {"bf16": bench(bf16, 5, host_key=f"experts {k} bf16")}
    # blockwise-ewbf16: the product's default for routed experts (training.fp8_expert_wgrad bf16)
    for name, recipe, bw in (("blockwise", "blockwise", False), ("blockwise-ewbf16", "blockwise", True),
                             ("rowwise", "rowwise", False)):
        res[name] = bench(lambda r=recipe, b=bw: fp8.fp8_grouped_linear(x, w, offsets, False, r, b).backward(g), 5,
                          host_key=f"experts {k} {name}")
    xq, sx = fp8.quantize_1x128(x)
    wq, sw = fp8.quantize_128x128(w)
    fwd = bench(lambda: fp8.blockwise_grouped_mm_t(xq, sx, wq, sw, offsets, False), 5)
    gq, sg = fp8.quantize_1x128(fp8._pad_to(g, -1).t())
    xq_t, sx_t = fp8.quantize_1x128(x.t())
    wgrad = bench(lambda: fp8._blockwise_grouped_wgrad_impl(gq, sg, xq_t, sx_t, offsets), 5)
    print(f"experts K={k} N={n}: fwd+bwd " + ", ".join(f"{a} {b:.2f}" for a, b in res.items())
          + " ms (host " + ", ".join(f"{a} {HOST[f'experts {k} {a}']:.2f}" for a in res)
          + f") | Triton blockwise forward {fwd:.2f}, weight gradient {wgrad:.2f}", flush=True)


#: launch configurations swept by --tiles, the default first: grouped_mm_t (block_m, warps, stages)
#: and grouped_wgrad (block_k, warps, stages)
#: (block_m, warps, stages[, block_n]) of `grouped_mm_t`, the default first
MM_T_TILES = ((128, 8, 3), (128, 8, 4), (64, 4, 3), (64, 4, 4), (128, 4, 3), (128, 8, 3, 256), (128, 8, 4, 256),
              (64, 4, 3, 256), (64, 8, 3, 256))
WGRAD_TILES = ((256, 8, 3), (128, 8, 3), (128, 8, 4), (128, 4, 3), (256, 8, 4), (128, 8, 2))


def tiles() -> None:
    from lit_deepseek.kernels import fp8_triton

    counts = torch.full((EXPERTS,), ROUTED // EXPERTS, device="cuda")
    offsets = counts.cumsum(0).to(torch.int32)
    grouped_mm = fp8._grouped_mm()
    for k, n in ((1024, 5120), (1024, 2560), (2560, 1024)):  # fused gate/up, one of them, the down product
        x = torch.randn(ROUTED, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(EXPERTS, n, k, device="cuda") * 0.02
        g = torch.randn(ROUTED, n, device="cuda", dtype=torch.bfloat16)
        flops = 2 * ROUTED * k * n
        wb = w.to(torch.bfloat16)
        bf_fwd = bench(partial(grouped_mm, x, wb.transpose(-2, -1), offs=offsets), 5)
        bf_wgrad = bench(partial(grouped_mm, g.t(), x, offs=offsets), 5)
        xq, sx = fp8.quantize_1x128(x)
        wq, sw = fp8.quantize_128x128(w)
        sweep(f"grouped_mm_t K={k} N={n}", "block_m", MM_T_TILES, partial(fp8_triton.grouped_mm_t, xq, sx, wq, sw, offsets),
              flops, bf_fwd)
        gq, sg = fp8.quantize_1x128(fp8._pad_to(g, -1).t())
        xq_t, sx_t = fp8.quantize_1x128(x.t())
        sweep(f"grouped_wgrad K={k} N={n}", "block_k", WGRAD_TILES,
              partial(fp8_triton.grouped_wgrad, gq, sg, xq_t, sx_t, offsets), flops, bf_wgrad)


def sweep(label: str, tile_name: str, configs: tuple[tuple[int, ...], ...], kernel: Callable[..., torch.Tensor],
          flops: int, bf16_ms: float) -> None:
    """Time kernel(tile, warps, stages) for each configuration; the first one's output is the reference."""
    ref = None
    for tile, warps, stages, *more in configs:
        name = f"tiles {label} {tile_name}={tile} warps={warps} stages={stages}" + "".join(f" block_n={n}" for n in more)
        try:
            fn = partial(kernel, tile, warps, stages, *more)
            out = fn().float()
            ref = out if ref is None else ref
            ms = bench(fn, 5)
            print(f"{name}: {ms:.3f} ms {flops / ms / 1e9:.0f} TFLOP/s (bf16 grouped_mm {bf16_ms:.3f} ms) "
                  f"max|diff| {(out - ref).abs().max().item():.2e}", flush=True)
        except Exception as exc:  # a configuration that does not compile or fit: say so, keep sweeping
            print(f"{name}: {type(exc).__name__}: {str(exc)[:160]}", flush=True)


if __name__ == "__main__":
    if not torch.cuda.is_available():
        raise SystemExit("fp8_ops_probe: needs a CUDA GPU (compute capability >= 9.0)")
    if "--tiles" in sys.argv[1:]:
        tiles()
        raise SystemExit(0)
    dense()
    experts()
