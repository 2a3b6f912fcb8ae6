"""Where the device time of a `lit-deepseek fit` step goes, by kernel family.

Runs one row of `bench_fit.py` (the same `lit-deepseek fit` command) under Lightning's
`PyTorchProfiler`, then groups the report's kernels into families (expert GEMMs, FP8 quantizers,
attention, optimizer, ...) and prints milliseconds per profiled step and the share of all kernel
time, then the GEMMs' share and the most that twice-as-fast GEMMs (FP8) could speed the step's
kernels up. CUDA graphs are off for the profile (the kernels are the same; graph replays hide them
from the report).

    python benchmarks/profile_fit.py --row small-s4096-m8x1-bf16-mixed-compile-fp8 --out $OUT
    python benchmarks/profile_fit.py --row small-s4096-m8x1-bf16-mixed-compile-fp8rowwise
    python benchmarks/profile_fit.py --report fit-blockwise.txt      # group a saved report

The profiler's default schedule records three training steps after one skipped and one warm-up
step, so `--steps` must be at least 6. The table lists the `--row-limit` costliest entries only:
families of small kernels may be missing from it, and the shares are of all kernel time.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_fit  # noqa: E402

PROFILED_STEPS = 3  # Lightning's PyTorchProfiler default schedule: wait 1, warm-up 1, active 3

#: (family, pattern on the kernel name); the first match wins
FAMILIES = [
    ("Triton blockwise FP8 grouped GEMMs (routed experts)", r"^_grouped_(wgrad|mm_t)_kernel"),
    ("FP8 quantizers (Triton)", r"^_(quantize|rows)_\w*kernel"),
    ("FP8 weight-block transposes (Triton)", r"^_transpose_kernel"),
    ("cuBLAS FP8 GEMMs", r"^nvjet_sm\d+_qq"),
    ("CUTLASS grouped GEMMs (routed experts)", r"^_ZN7cutlass"),
    ("cuBLAS bf16 GEMMs", r"^(nvjet_sm\d+_tst|sm90_xmma|ampere_|cutlass_80)"),
    ("cuDNN attention", r"^cudnn_generated"),
    ("multi-tensor kernels (AdamW, gradient clip)", r"multi_tensor_apply_kernel|^void at::native::\(anonymous namespace\)::multi_tensor"),
    # torch's generic kernel serves operands it cannot index linearly: copies of transposed or sliced views
    ("ATen strided elementwise (copies of transposed or sliced views)", r"^void at::native::elementwise_kernel"),
    ("ATen elementwise (casts, contiguous copies, fills, adds)",
     r"^void at::native::(unrolled_|vectorized_)elementwise_kernel"),
    ("Inductor-generated kernels", r"^triton_(poi|red|per|tem)_"),
]

_UNITS = (("ms", 1.0), ("us", 1e-3), ("s", 1e3))


def _ms(value: str) -> float:
    value = value.strip()
    for unit, factor in _UNITS:
        if value.endswith(unit):
            return float(value[: -len(unit)]) * factor
    return 0.0


def parse_report(text: str) -> tuple[float, list[tuple[str, float, int]]]:
    """(kernel ms in total, [(name, self CUDA ms, calls)]) from a `PyTorchProfiler` report table."""
    total = None
    rows: dict[tuple[str, float, int], tuple[str, float, int]] = {}
    for line in text.splitlines():
        if line.startswith("Self CUDA time total:"):
            total = _ms(line.split(":", 1)[1])
        parts = re.split(r"\s{2,}", line.strip())
        # name, self CPU %, self CPU, CPU total %, CPU total, CPU avg, self CUDA, self CUDA %, CUDA total, CUDA avg, calls
        if len(parts) == 11 and parts[10].isdigit():
            name, self_cuda, calls = parts[0], _ms(parts[6]), int(parts[10])
            # an Inductor kernel appears twice (its launch record and the kernel), with equal times: keep
            # one (different kernels whose truncated names agree keep their own rows)
            rows.setdefault((name, self_cuda, calls), (name, self_cuda, calls))
    if total is None:
        raise ValueError("no 'Self CUDA time total' line: not a CUDA profile report")
    return total, list(rows.values())


def group(text: str, steps: int = PROFILED_STEPS) -> str:
    """A markdown table of kernel families: ms per profiled step, share of all kernel time, launches."""
    total, rows = parse_report(text)
    lines = [f"kernel time per profiled step: {total / steps:.1f} ms", "",
             "| family | ms / step | share | launches / step |", "| --- | --- | --- | --- |"]
    listed = gemm = 0.0
    for family, pattern in FAMILIES:
        hits = [r for r in rows if re.search(pattern, r[0])]
        rows = [r for r in rows if not re.search(pattern, r[0])]
        ms = sum(r[1] for r in hits)
        listed += ms
        gemm += ms if "GEMM" in family else 0.0
        lines.append(f"| {family} | {ms / steps:.1f} | {100 * ms / total:.1f}% | {sum(r[2] for r in hits) // steps} |")
    lines.append(f"| other kernels and entries past the row limit | {(total - listed) / steps:.1f} | "
                 f"{100 * (total - listed) / total:.1f}% | |")
    # Amdahl's bound for a faster matrix product (FP8): only the GEMM families shrink
    share = gemm / total
    lines += ["", f"GEMMs: {gemm / steps:.1f} ms / step, {100 * share:.1f}% of kernel time. Were every GEMM twice as "
              f"fast at no other cost, a step's kernels would run at most {1 / (1 - share / 2):.2f}x faster."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--row", default="small-s4096-m8x1-bf16-mixed-compile", help="a bench_fit.py row name")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--row-limit", type=int, default=80)
    ap.add_argument("--work", type=Path, default=Path("/tmp/lit-deepseek-profile"))
    ap.add_argument("--out", type=Path, default=None, help="folder for the raw report and the grouped table")
    ap.add_argument("--timeout-s", type=float, default=300)
    ap.add_argument("--report", type=Path, default=None, help="only group an existing report file")
    args = ap.parse_args()
    if args.report is not None:
        try:
            print(group(args.report.read_text()))
        except ValueError as err:
            raise SystemExit(f"--report {args.report}: {err}") from None
        return
    if args.steps < 6:
        raise SystemExit("--steps: at least 6 (the profiler skips one step, warms up one, records three)")
    (row,) = bench_fit.select_rows([args.row])
    row = dataclasses.replace(row, graphs=False)
    out = args.out or args.work
    out.mkdir(parents=True, exist_ok=True)
    name = row.name  # names the recipe (...-fp8rowwise) and the eager step (...-nograph)
    # a fresh run directory: a rerun on the same machine must not log into an earlier run's store
    cmd = bench_fit.fit_command(row, args.work / time.strftime("%Y%m%d-%H%M%S") / name, args.steps,
                                max(1, args.steps // 2))
    cmd += ["--trainer.profiler", "lightning.pytorch.profilers.PyTorchProfiler",
            "--trainer.profiler.init_args.sort_by_key", "cuda_time_total",
            "--trainer.profiler.init_args.row_limit", str(args.row_limit),
            "--trainer.profiler.init_args.export_to_chrome", "false",
            "--trainer.profiler.init_args.dirpath", str(out), "--trainer.profiler.init_args.filename", name]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout_s)
    (out / f"{name}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"{name}: lit-deepseek fit failed: " + " | ".join((proc.stderr or proc.stdout).splitlines()[-3:]))
    table = f"{name}\n\n" + group((out / f"fit-{name}.txt").read_text())
    (out / f"{name}.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
