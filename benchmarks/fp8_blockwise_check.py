"""Where a wrong blockwise FP8 dense product comes from, in one device call: the quantizers, the
scale layout handed to cuBLAS, or cuBLAS itself. A diagnosis tool, not a benchmark.

For each shape of `tests/test_fp8.py::test_blockwise_linear_kernel_matches_emulation_and_bounds`
and a few seeds, with that test's inputs (x = randn * rand(rows) * 10, an nn.Linear weight):

* quant bits: do the Triton quantizers (`fp8_triton`, the default on CUDA) give the torch
  quantizers' bits and scales for x (1x128) and w (128x128)?
* kernel vs emulation: the shipped product (`fp8._blockwise_mm_t_impl`, cuBLAS block scaling)
  against the float32 product of the dequantized operands, on the same quantized tensors, with the
  Triton and then the torch quantizers' output;
* gradients: the backward's quantizer reads (`quantize_128x128(w.t())`, `quantize_1x128_dual(g)`,
  `quantize_1x128_t(x)`, which quantizes a contiguous copy of x.T) against the torch quantizers' bits, then
  y, dx and dw of `fp8_linear` against its emulation (and, in brackets, against float64) with
  LIT_DEEPSEEK_FP8_QUANT = triton and torch;
* structured scales: every e4m3 value 1.0 and each scale a distinct power of two per tile / block,
  so the exact product is known and any scale read from the wrong tile or block shows up; printed
  with the first wrong output position and the K tile / N block it falls in.

    python benchmarks/fp8_blockwise_check.py                 # on a Hopper GPU
    TRITON_INTERPRET=1 python benchmarks/fp8_blockwise_check.py --device cpu   # quantizer bits only
"""

from __future__ import annotations

import argparse
import subprocess

import torch
from torch import nn

import lit_deepseek.kernels.fp8 as fp8

SHAPES = ((4096, 1024, 512), (4096, 640, 576), (1000, 200, 72), (512, 1408, 2048))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def same_bits(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> bool:
    return all(torch.equal(u.view(torch.uint8) if u.dtype == torch.float8_e4m3fn else u,
                           v.view(torch.uint8) if v.dtype == torch.float8_e4m3fn else v) for u, v in zip(a, b, strict=True))


def structured(m: int, k: int, n: int, device: str) -> str:
    """All-ones e4m3 operands with power-of-two scales, in three patterns whose exact products are
    small multiples of powers of two (exact in bf16): scales varying by row and N block only, and
    by (row + K tile) or (N block + K tile), so that a scale read from the wrong row, tile or block
    changes the output."""
    kt, nb = -(-k // 128), -(-n // 128)
    aq = torch.ones(m, kt * 128, device=device).to(torch.float8_e4m3fn)
    bq = torch.ones(nb * 128, kt * 128, device=device).to(torch.float8_e4m3fn)
    rows = torch.arange(m, device=device)[:, None]
    tiles = torch.arange(kt, device=device)[None, :]
    blocks = torch.arange(nb, device=device)[:, None]
    patterns = {
        "rows x blocks": (torch.exp2((rows % 5).float() - 2).expand(m, kt), torch.exp2((blocks % 7).float() - 3).expand(nb, kt)),
        "rows + tiles": (torch.exp2(((rows + tiles) % 4).float()), torch.ones(nb, kt, device=device)),
        "blocks + tiles": (torch.ones(m, kt, device=device), torch.exp2(((blocks + 2 * tiles) % 4).float())),
    }
    report = []
    for name, (sa, sb) in patterns.items():
        sa, sb = sa.contiguous(), sb.contiguous()
        want = 128.0 * sa @ sb.repeat_interleave(128, 0).t()
        got = fp8._blockwise_mm_t_impl(aq, sa, bq, sb, True).float()
        bad = got != want
        if not bad.any():
            report.append(f"{name}: exact")
            continue
        i, j = (int(v) for v in bad.nonzero()[0])
        report.append(f"{name}: {int(bad.sum())} of {bad.numel()} wrong, first at row {i}, column {j} "
                      f"(N block {j // 128}): got {got[i, j].item():.6g}, want {want[i, j].item():.6g}")
    return "; ".join(report)


def gradients(m: int, k: int, n: int, seed: int, dev: str = "cuda") -> str:
    """The backward's quantizer bits and `fp8_linear`'s y, dx, dw against emulation per quantizer backend."""
    import os

    from lit_deepseek.kernels import fp8_triton

    torch.manual_seed(seed)
    x = torch.randn(m, k, device=dev) * torch.rand(m, 1, device=dev) * 10
    w = nn.Linear(k, n, bias=False, device=dev).weight.detach()
    g = torch.randn(m, n, device=dev)
    bits = {name: same_bits(getattr(fp8_triton, name)(t), getattr(fp8, name)(t))
            for name, t in (("quantize_128x128", w.t()), ("quantize_1x128_t", x))}
    dual_t, dual_r = fp8_triton.quantize_1x128_dual(g.bfloat16()), fp8.quantize_1x128_dual(g.bfloat16())
    bits["quantize_1x128_dual"] = same_bits(dual_t[:2], dual_r[:2]) and same_bits(dual_t[2:], dual_r[2:])
    cells = [", ".join(f"{k_}: {'same' if v else 'DIFFER'}" for k_, v in bits.items())]

    def run(emulate: bool) -> tuple[torch.Tensor, ...]:
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = fp8.fp8_linear(xi, wi, "blockwise", emulate, torch.float32)
        y.backward(g)
        return y.detach(), xi.grad, wi.grad

    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    y64 = x64 @ w64.t()
    y64.backward(g.double())
    exact = y64.detach(), x64.grad, w64.grad
    for mode in ("triton", "torch"):
        os.environ["LIT_DEEPSEEK_FP8_QUANT"] = mode
        try:
            got, emu = run(False), run(True)
        finally:
            os.environ.pop("LIT_DEEPSEEK_FP8_QUANT")
        cells.append(" ".join(f"{name} {rel(a, b):.1e} ({rel(a, c):.1e})"
                              for name, a, b, c in zip(("y", "dx", "dw"), got, emu, exact, strict=True)))
    return " | ".join(cells)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    dev = args.device
    from lit_deepseek.kernels import fp8_triton

    if dev == "cuda":
        print(torch.cuda.get_device_name(), "torch", torch.__version__, "CUDA", torch.version.cuda)
        print(subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True).stdout.strip())
    print("| m, k, n | seed | x bits | w bits | kernel vs emulation (Triton quant) | (torch quant) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for m, k, n in SHAPES:
        for seed in range(args.seeds):
            torch.manual_seed(seed)
            x = torch.randn(m, k, device=dev) * torch.rand(m, 1, device=dev) * 10
            w = nn.Linear(k, n, bias=False, device=dev).weight.detach()
            qt = fp8_triton.quantize_1x128(x), fp8_triton.quantize_128x128(w)
            qr = fp8.quantize_1x128(x), fp8.quantize_128x128(w)
            cells = [f"{m}, {k}, {n}", str(seed), "same" if same_bits(qt[0], qr[0]) else "DIFFER",
                     "same" if same_bits(qt[1], qr[1]) else "DIFFER"]
            for (aq, sa), (bq, sb) in (qt, qr):
                if dev != "cuda":
                    cells.append("(needs CUDA)")
                    continue
                emu = fp8.blockwise_mm_t(aq, sa, bq, sb, True, emulate=True)[:, :n]
                out = fp8.blockwise_mm_t(aq, sa, bq, sb, True, emulate=False)[:, :n]
                cells.append(f"{rel(out, emu):.2e}")
            print("| " + " | ".join(cells) + " |", flush=True)
    if dev == "cuda":
        print("\n| m, k, n | backward quantizer bits (Triton vs torch) | y, dx, dw vs emulation (vs float64): triton | torch |")
        print("| --- | --- | --- | --- |")
        for m, k, n in SHAPES:
            print(f"| {m}, {k}, {n} | {gradients(m, k, n, 0)} |", flush=True)
        for m, k, n in SHAPES:
            print(f"structured scales {m}, {k}, {n}: {structured(m, k, n, dev)}", flush=True)


if __name__ == "__main__":
    main()
