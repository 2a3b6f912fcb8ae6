"""Checkpoint cost of `lit-deepseek fit` as a user runs it: training stall per periodic save and disk use.

Runs the CLI (one process, MLflow on, synchronous metric logging so each step's timestamp is when it
ended), saving every `--every` steps, then reads the per-step timestamps of `train/loss` back from the
run's MLflow store. The stall of a save is the extra time of the step gaps around it over the median
step. Disk use counts each file once per inode: `last` and `best` are hard links, not copies.

    python benchmarks/bench_checkpoint.py --out $OUT/ckpt.json            # GPU: small config, one device
    python benchmarks/bench_checkpoint.py --cpu --out /tmp/ckpt.json      # CPU smoke run (demo config)

Bounded by --timeout seconds (default 540) for the training subprocess.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="the CPU demo config instead of the small config on a GPU")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--timeout", type=int, default=540)
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args()

    run_dir = Path(tempfile.mkdtemp(prefix="bench-ckpt-"))
    if args.cpu:
        model = ["--config", str(ROOT / "configs" / "cpu_demo.yaml"), "--training.seq_length", "128",
                 "--training.micro_batch_size", "8", "--training.global_batch_size", "8"]
    else:
        model = ["--config", str(ROOT / "configs" / "deepseek_v3_small.yaml"), "--parallel.expert_parallel_size", "1",
                 "--trainer.devices", "1", "--training.seq_length", "4096", "--training.micro_batch_size", "8",
                 "--training.global_batch_size", "8"]
    cmd = [sys.executable, "-m", "lit_deepseek", "fit", *model, "--training.max_steps", str(args.steps),
           "--checkpoint.every_n_steps", str(args.every), "--checkpoint.keep_last", "2",
           "--training.val_every_n_steps", "1000000", "--training.val_batches", "1",
           "--logging.run_dir", str(run_dir), "--logging.log_every_n_steps", "1", "--logging.async_logging", "false",
           "--logging.heatmap_every_n_steps", "0", "--logging.progress_bar", "false"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        print(proc.stderr[-4000:], file=sys.stderr)
        return proc.returncode

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    run = client.search_runs([e.experiment_id for e in client.search_experiments()])[0]
    stamps = {m.step: m.timestamp / 1000 for m in client.get_metric_history(run.info.run_id, "train/loss")}
    steps = sorted(stamps)
    gaps = {s: stamps[s] - stamps[p] for p, s in zip(steps, steps[1:], strict=False)}
    # a save after optimizer step k (global_step k + 1 = a multiple of every) shows in the gaps next to it
    saves = [s for s in steps if (s + 1) % args.every == 0 and s + 1 < args.steps]
    quiet = [g for s, g in gaps.items() if all(abs(s - k) > 1 for k in saves)]
    median = statistics.median(quiet) if quiet else float("nan")
    stalls = [sum(max(0.0, gaps.get(k + d, median) - median) for d in (0, 1, 2)) for k in saves]

    ckpt_dir = run_dir / "checkpoints"
    files = [p for p in ckpt_dir.iterdir() if p.is_file()]
    apparent = sum(p.stat().st_size for p in files)
    on_disk = sum({p.stat().st_ino: p.stat().st_size for p in files}.values())
    result = {
        "command": " ".join(cmd), "wall_s": round(wall, 1), "median_step_s": round(median, 4),
        "save_stall_s": [round(s, 3) for s in stalls], "max_save_stall_s": round(max(stalls, default=0.0), 3),
        "checkpoint_bytes": max((p.stat().st_size for p in files), default=0),
        "files": sorted(p.name for p in files), "apparent_bytes": apparent, "on_disk_bytes": on_disk,
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    if os.environ.get("KEEP_RUN") is None:
        import shutil

        shutil.rmtree(run_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
