"""FP8 against BF16 through the product path: `lit-deepseek fit` runs, read back from MLflow.

(a) convergence: BF16 seed A, BF16 seed B (the seed-to-seed noise floor), FP8 blockwise and FP8
    row-wise (seed A), same model, data (the built-in corpus: real text) and schedule, >= 64k tokens
    per step. The learning rate is constant after warm-up, so runs that a time limit
    (`--trainer.max_time`, an equal share of --conv-budget-s each) stops at different steps are
    compared over their common steps: final loss = mean of the last 100 common steps. A gap table
    against BF16 seed A and a PNG of the curves (saved in benchmarks/, logged to MLflow with the table).
(b) speed: tokens/s and MFU of bf16 vs FP8 blockwise vs FP8 row-wise (bf16-mixed, regional
    compile) on the small config and on a d_model 2048 config, median of the last half of the steps.

All runs log to one MLflow SQLite store (`<out>/mlflow.db`, experiment `bench-fp8`); every run is a
subprocess with a hard time limit, and the whole script stops starting runs past --budget-s.

    python benchmarks/bench_fp8.py --phases convergence --steps 1000 --out $OUT/fp8
    python benchmarks/bench_fp8.py --phases speed --speed-configs small --out $OUT/fp8
    python benchmarks/bench_fp8.py --phases speed --speed-configs large --out $OUT/fp8
    python benchmarks/bench_fp8.py --phases convergence --steps 4 --conv-size tiny --device cpu \
        --conv-budget-s 600 --out /tmp/bench_fp8  # CPU smoke of the whole path
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = "bench-fp8"

# (a) the convergence model: a small DeepSeek-V3-shaped MoE (MLA, 8 experts top-2 + shared, MTP)
# sized so four 1,000-step runs at 64k tokens per step aim at 8 minutes on one H200; dims are
# multiples of 128 (whole FP8 tiles); byte tokens of the built-in corpus
CONV_MODEL = {
    "model.vocab_size": 320, "model.num_layers": 4, "model.first_dense_layers": 1,
    "model.dense_intermediate_size": 1536, "model.mtp_depth": 1,
    "model.mla.d_model": 512, "model.mla.d_latent": 256, "model.mla.d_q_latent": 384, "model.mla.num_heads": 8,
    "model.mla.qk_nope_head_dim": 64, "model.mla.qk_rope_head_dim": 32, "model.mla.v_head_dim": 64,
    "model.mla.max_context_length": 1024,
    "model.moe.num_experts": 8, "model.moe.num_experts_per_token": 2, "model.moe.expert_intermediate_size": 512,
    "model.moe.num_shared_experts": 1, "model.moe.num_expert_groups": 1, "model.moe.num_limited_groups": 1,
    "training.seq_length": 1024, "training.global_batch_size": 64, "training.micro_batch_size": 32,
    "training.learning_rate": 1e-3, "training.lr_schedule": "constant", "training.lr_warmup_steps": 100,
}
# the CPU smoke size (same code path, a few steps)
TINY_MODEL = {**CONV_MODEL, "model.num_layers": 2, "model.mla.d_model": 128, "model.mla.d_latent": 128,
              "model.mla.d_q_latent": 128, "model.mla.num_heads": 2, "model.dense_intermediate_size": 256,
              "model.moe.num_experts": 4, "model.moe.expert_intermediate_size": 128, "training.seq_length": 128,
              "training.global_batch_size": 4, "training.micro_batch_size": 2, "training.lr_warmup_steps": 2,
              "model.mla.max_context_length": 128}
# (b) speed: the small config on one GPU, and a d_model 2048 config (V3 head dims, 32 experts top-6,
# 8 layers: fits one H200 with float32 master weights and AdamW states)
SPEED = {
    "small": ("configs/deepseek_v3_small.yaml", {"training.micro_batch_size": 4, "training.global_batch_size": 8}),
    "large": ("configs/deepseek_v3_small.yaml", {
        "model.num_layers": 8, "model.dense_intermediate_size": 8192, "model.mla.d_model": 2048,
        "model.mla.num_heads": 16, "model.mla.d_q_latent": 1536, "model.mla.d_latent": 512,
        "model.mla.qk_nope_head_dim": 128, "model.mla.qk_rope_head_dim": 64, "model.mla.v_head_dim": 128,
        "model.moe.num_experts": 32, "model.moe.num_experts_per_token": 6, "model.moe.expert_intermediate_size": 1408,
        "model.moe.num_shared_experts": 2, "training.micro_batch_size": 2, "training.global_batch_size": 4}),
}
VARIANTS = {"bf16": (False, None), "fp8-blockwise": (True, "blockwise"), "fp8-rowwise": (True, "rowwise")}


def fit(name: str, config: str, overrides: dict[str, Any], out: Path, limit_s: float, device: str) -> dict[str, Any]:
    """One `lit-deepseek fit` subprocess that stops training after limit_s (`--trainer.max_time`) and
    is killed 90 s later; returns its MLflow metric histories (or the failure)."""
    run_dir = Path("/tmp") / "bench_fp8_runs" / f"{name}-{int(time.time())}"
    args = [sys.executable, "-m", "lit_deepseek", "fit", "--config", str(ROOT / config),
            "--parallel.expert_parallel_size", "1", "--parallel.data_parallel_size", "1", "--parallel.zero_stage", "0",
            "--logging.run_dir", str(run_dir), "--logging.tracking_uri", f"sqlite:///{out / 'mlflow.db'}",
            "--logging.experiment_name", EXPERIMENT, "--logging.run_name", name, "--logging.log_every_n_steps", "1",
            "--logging.progress_bar", "false", "--logging.heatmap_every_n_steps", "100000",
            "--checkpoint.every_n_steps", "100000", "--training.val_every_n_steps", "100000",
            "--trainer.max_time", time.strftime("00:%H:%M:%S", time.gmtime(max(1, int(limit_s))))]
    if device == "cpu":
        args += ["--trainer.accelerator", "cpu", "--trainer.devices", "1"]
    for key, value in overrides.items():
        args += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    start = time.perf_counter()
    print(f"[{name}] starting (limit {limit_s:.0f}s)", flush=True)
    try:
        proc = subprocess.run(args, cwd=out, env=env, capture_output=True, text=True, timeout=limit_s + 90)
        ok, tail = proc.returncode == 0, proc.stderr[-3000:]
    except subprocess.TimeoutExpired as exc:
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        ok, tail = False, f"killed after {limit_s + 90:.0f}s; " + err[-2000:]
    wall = time.perf_counter() - start
    result: dict[str, Any] = {"name": name, "ok": ok, "wall_s": wall, **read_run(out, name)}
    print(f"[{name}] {'done' if ok else 'FAILED'} in {wall:.0f}s, {len(result.get('loss', []))} logged steps", flush=True)
    if not ok:
        result["error"] = tail
        print(tail, flush=True)
    return result


def read_run(out: Path, name: str) -> dict[str, Any]:
    """train/loss, train/tokens_per_s and train/mfu of the latest run called `name`, by step."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        return {}
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.runName = '{name}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        return {}
    out_d: dict[str, Any] = {"run_id": runs[0].info.run_id}
    for key, metric in (("loss", "train/loss"), ("tokens_per_s", "train/tokens_per_s"), ("mfu", "train/mfu")):
        hist = sorted(client.get_metric_history(runs[0].info.run_id, metric), key=lambda m: m.step)
        out_d[key] = [m.value for m in hist]
    return out_d


def final_loss(loss: list[float], window: int = 100) -> Optional[float]:
    return sum(loss[-window:]) / len(loss[-window:]) if loss else None


def convergence(args: argparse.Namespace, out: Path, deadline: float) -> list[str]:
    model = TINY_MODEL if args.conv_size == "tiny" else CONV_MODEL
    runs = [("bf16-seedA", False, None, args.seed_a), ("bf16-seedB", False, None, args.seed_b),
            ("fp8-blockwise", True, "blockwise", args.seed_a), ("fp8-rowwise", True, "rowwise", args.seed_a)]
    results = {}
    share = args.conv_budget_s / len(runs)
    for name, fp8, recipe, seed in runs:
        left = deadline - time.time()
        if left < 60:
            print(f"[{name}] skipped: benchmark budget spent", flush=True)
            continue
        over = {**model, "training.max_steps": args.steps, "training.seed": seed, "training.use_fp8": fp8,
                "training.precision": "bf16-mixed" if args.device != "cpu" else "32-true",
                "training.compile": args.device != "cpu"}
        if recipe:
            over["training.fp8_recipe"] = recipe
        results[name] = fit(f"conv-{name}", "configs/cpu_demo.yaml", over, out, min(share, left - 30), args.device)
    tokens = model["training.seq_length"] * model["training.global_batch_size"]
    common = min((len(r.get("loss", [])) for r in results.values()), default=0)
    window = min(100, common)
    lines = [f"## FP8 convergence ({common} common steps of {args.steps} asked x {tokens:,} tokens, mean of the "
             f"last {window})", "", "| run | steps done | final loss | vs BF16 seed A | wall s |",
             "| --- | --- | --- | --- | --- |"]
    base = final_loss(results.get("bf16-seedA", {}).get("loss", [])[:common], window)
    finals = {}
    for name, r in results.items():
        f = final_loss(r.get("loss", [])[:common], window) if common else None
        finals[name] = f
        gap = f"{100 * (f - base) / base:+.3f}%" if f is not None and base else "-"
        done = len(r.get("loss", []))
        lines.append(f"| {name} | {done} | {f:.4f} | {gap} | {r['wall_s']:.0f} |" if f is not None else
                     f"| {name} | {done} | failed | - | {r['wall_s']:.0f} |")
    b = finals.get("bf16-seedB")
    if base and b is not None:
        noise = abs(b - base) / base
        lines += ["", f"Noise floor (|BF16 B - BF16 A| / A): {100 * noise:.3f}%."]
        for name in ("fp8-blockwise", "fp8-rowwise"):
            f = finals.get(name)
            if f is not None:
                gap = abs(f - base) / base
                verdict = "met" if gap <= 0.005 and gap <= noise + 0.0025 else "not met"
                lines.append(f"{name}: gap {100 * gap:.3f}% (target <= 0.5% and <= noise + 0.25% = "
                             f"{100 * (noise + 0.0025):.3f}%): {verdict}.")
    png = plot(results, out / "fp8_convergence.png", window)
    if png:
        (ROOT / "benchmarks" / "fp8_convergence.png").write_bytes(png.read_bytes())
    (out / "fp8_convergence.json").write_text(json.dumps(results))
    log_summary(out, "conv-summary", "\n".join(lines), [png] if png else [])
    return lines


def plot(results: dict[str, dict[str, Any]], path: Path, window: int) -> Optional[Path]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG", flush=True)
        return None
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, r in results.items():
        loss = r.get("loss", [])
        if not loss:
            continue
        k = max(1, min(20, len(loss) // 10))
        smooth = [sum(loss[max(0, i - k + 1):i + 1]) / len(loss[max(0, i - k + 1):i + 1]) for i in range(len(loss))]
        ax.plot(range(len(smooth)), smooth, label=name, linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel(f"train/loss ({k}-step mean)" if results else "train/loss")
    ax.set_title("lit-deepseek fit: FP8 vs BF16")
    if any(r.get("loss") for r in results.values()):
        tail = [v for r in results.values() for v in r.get("loss", [])[len(r.get("loss", [])) // 3:]]
        if tail:
            ax.set_ylim(min(tail) * 0.98, max(tail) * 1.02)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"curves: {path}", flush=True)
    return path


def log_summary(out: Path, name: str, text: str, files: list[Path]) -> None:
    """The table (and the PNG) as artifacts of a summary run in the same MLflow store."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name(EXPERIMENT)
    exp_id = exp.experiment_id if exp else client.create_experiment(EXPERIMENT)
    run = client.create_run(exp_id, run_name=name)
    client.log_text(run.info.run_id, text, f"{name}.md")
    for f in files:
        client.log_artifact(run.info.run_id, str(f))
    client.set_terminated(run.info.run_id)


def speed(args: argparse.Namespace, out: Path, deadline: float) -> list[str]:
    lines = [f"## FP8 speed (`lit-deepseek fit`, bf16-mixed, regional compile, {args.speed_steps} steps, "
             "median of the last half)", "", "| config | recipe | tokens/s | MFU | vs bf16 |", "| --- | --- | --- | --- | --- |"]
    for config in args.speed_configs.split(","):
        path, over = SPEED[config]
        base = None
        for variant in args.recipes.split(","):
            left = deadline - time.time()
            if left < 60:
                lines.append(f"| {config} | {variant} | skipped (budget) | | |")
                continue
            fp8, recipe = VARIANTS[variant]
            o = {**over, "training.max_steps": args.speed_steps, "training.use_fp8": fp8, "training.compile": True,
                 "training.precision": "bf16-mixed", "training.seq_length": 4096, "training.lr_warmup_steps": 2}
            if recipe:
                o["training.fp8_recipe"] = recipe
            r = fit(f"speed-{config}-{variant}", path, o, out, min(args.run_limit_s, left - 30), args.device)
            tps, mfu = r.get("tokens_per_s", []), r.get("mfu", [])
            if not tps:
                lines.append(f"| {config} | {variant} | failed | | |")
                continue
            t = statistics.median(tps[len(tps) // 2:])
            m = statistics.median(mfu[len(mfu) // 2:]) if mfu else float("nan")
            if variant == "bf16":
                base = t
            ratio = f"{t / base:.2f}x" if base else "-"
            lines.append(f"| {config} | {variant} | {t:,.0f} | {100 * m:.1f}% | {ratio} |")
    log_summary(out, "speed-summary", "\n".join(lines), [])
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phases", default="convergence,speed", help="comma list: convergence, speed")
    ap.add_argument("--out", default="bench_fp8_out", help="folder for mlflow.db, the JSON and the report")
    ap.add_argument("--steps", type=int, default=1000, help="optimizer steps asked of each convergence run")
    ap.add_argument("--conv-budget-s", type=float, default=440,
                    help="training time of the four convergence runs together (an equal share each)")
    ap.add_argument("--conv-size", choices=["gpu", "tiny"], default="gpu", help="tiny: the CPU smoke model")
    ap.add_argument("--seed-a", type=int, default=1234)
    ap.add_argument("--seed-b", type=int, default=4321)
    ap.add_argument("--speed-configs", default="small,large", help="comma list of: small, large")
    ap.add_argument("--recipes", default="bf16,fp8-blockwise,fp8-rowwise", help="speed variants")
    ap.add_argument("--speed-steps", type=int, default=12)
    ap.add_argument("--run-limit-s", type=float, default=150, help="training time limit of one speed run")
    ap.add_argument("--budget-s", type=float, default=560, help="no run starts after this many seconds")
    ap.add_argument("--device", choices=["gpu", "cpu"], default="gpu")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.time() + args.budget_s
    report = []
    phases = args.phases.split(",")
    if "convergence" in phases:
        report += convergence(args, out, deadline) + [""]
    if "speed" in phases:
        report += speed(args, out, deadline) + [""]
    text = "\n".join(report)
    (out / "bench_fp8.md").write_text(text)
    print(text, flush=True)


if __name__ == "__main__":
    main()
