"""`lit-deepseek fit` on a GPU, end to end: the real CLI in a subprocess, the built-in corpus' shards,
MLflow. Each run is a few steps of a small model; they check that the loss falls, the metrics land,
mixed precision takes the grouped-GEMM path, compiled runs stop compiling after warm-up, and a
run resumes from `--ckpt_path last` into the same MLflow run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "cpu_demo.yaml"

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

#: the demo model widened to shapes every GPU path accepts (FP8 tiles of 128, grouped GEMM strides)
GPU_SHAPES = ["--model.vocab_size", "512", "--model.mla.d_model", "256", "--model.mla.num_heads", "4",
              "--model.mla.qk_nope_head_dim", "32", "--model.mla.qk_rope_head_dim", "32", "--model.mla.v_head_dim", "32",
              "--model.mla.d_latent", "128", "--model.mla.d_q_latent", "128", "--model.dense_intermediate_size", "512",
              "--model.moe.expert_intermediate_size", "256", "--training.seq_length", "256"]


def fit(tmp_path: Path, *args: str, steps: int = 12, name: str = "run") -> tuple[subprocess.CompletedProcess, Path]:
    run_dir = tmp_path / name
    cmd = [sys.executable, "-m", "lit_deepseek", "fit", "--config", str(DEMO), *GPU_SHAPES,
           "--trainer.accelerator", "cuda", "--trainer.devices", "1", "--training.max_steps", str(steps),
           "--training.lr_warmup_steps", "2", "--training.val_every_n_steps", "6", "--training.val_batches", "2",
           "--checkpoint.every_n_steps", "6", "--logging.log_every_n_steps", "1", "--logging.progress_bar", "false",
           "--logging.run_dir", str(run_dir), "--data.cache_dir", str(tmp_path / "data"), *args]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc, run_dir


def metrics(run_dir: Path) -> tuple[str, dict[str, list[tuple[int, float]]]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert len(runs) == 1
    run = runs[0]
    history = {k: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, k))
               for k in run.data.metrics}
    return run.info.run_id, history


def assert_learns(history: dict[str, list[tuple[int, float]]], steps: int) -> None:
    losses = [v for _, v in history["train/loss"]]
    assert len(losses) == steps
    assert all(v == v for v in losses)
    assert sum(losses[-3:]) / 3 < losses[0] - 0.3, losses
    assert history["train/max_memory_gib"][-1][1] > 0  # the run lived on the GPU
    assert "val/loss" in history


def assert_graphed(proc: subprocess.CompletedProcess, history: dict[str, list[tuple[int, float]]], graphs: int) -> None:
    """The default `training.cuda_graphs`: the step was captured (one graph, two with accumulation) and
    replayed through the last step, with no fallback warning."""
    captured = [v for _, v in history["train/cuda_graphs"]]
    assert captured[0] == 0 and captured[-1] == graphs, captured
    assert "without CUDA graphs" not in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("precision,compile_,steps", [("bf16-mixed", True, 18), ("bf16-true", False, 8),
                                                      ("32-true", False, 8)])
def test_fit_on_gpu_learns(tmp_path: Path, precision: str, compile_: bool, steps: int) -> None:
    proc, run_dir = fit(tmp_path, "--training.precision", precision, "--training.compile", str(compile_).lower(),
                        steps=steps)
    _, history = metrics(run_dir)
    assert_learns(history, steps)
    if precision != "32-true":
        assert "reference loop" not in proc.stderr  # bf16 compute takes grouped GEMM
        assert_graphed(proc, history, 2)  # the demo config's 2 micro-batches per step
    else:  # float32 experts take the reference loop, which the graphs cannot hold: said, not silent
        assert "training.precision is 32-true" in proc.stderr
    if compile_:
        # warm-up = the first training steps and the first validation (eval graphs); after that
        # nothing compiles again, through the second validation at step 12 included
        graphs = [v for _, v in history["train/compiled_graphs"]]
        assert graphs[0] > 0 and len(set(graphs[7:])) == 1, graphs


def test_fit_on_gpu_fp8_with_accumulation_and_mtp(tmp_path: Path) -> None:
    """FP8 (the default recipe) under bf16-mixed, with compile, 4 micro-batches per step and MTP."""
    proc, run_dir = fit(tmp_path, "--training.use_fp8", "true", "--training.compile", "true",
                        "--training.precision", "bf16-mixed",
                        "--training.micro_batch_size", "4", "--training.global_batch_size", "16")
    _, history = metrics(run_dir)
    assert_learns(history, 12)
    assert_graphed(proc, history, 2)
    assert "train/mtp_loss" in history
    # later micro-batches took the first one's FP8 weight blocks (LocalPlan's weight reuse)
    assert history["fp8/weight_reuse_hits"][-1][1] > 0 and history["fp8/kept_weight_gib"][-1][1] > 0
    # every Triton quantizer and block transpose the run took gave its torch reference's bits
    assert history["fp8/kernel_checks"][-1][1] > 0 and history["fp8/kernel_mismatches"][-1][1] == 0
    assert "gave other bits" not in proc.stderr, proc.stderr[-2000:]


def test_fit_on_gpu_resumes_into_the_same_run(tmp_path: Path) -> None:
    """The default precision (bf16-mixed, eager) with 2 micro-batches per step and MTP, stopped
    after 6 steps and resumed from `last` to 12: one MLflow run, the first 6 losses kept."""
    accumulate = ["--training.precision", "bf16-mixed",  # the demo config itself trains in 32-true
                  "--training.micro_batch_size", "4", "--training.global_batch_size", "8"]
    proc, run_dir = fit(tmp_path, *accumulate, steps=6)
    assert "reference loop" not in proc.stderr  # mixed precision takes grouped GEMM
    first_id, first = metrics(run_dir)
    proc, run_dir = fit(tmp_path, *accumulate, "--ckpt_path", "last", steps=12)
    run_id, history = metrics(run_dir)
    assert run_id == first_id
    assert_graphed(proc, history, 2)  # captured again after the resume's own warm-up
    assert [s for s, _ in history["train/loss"]] == list(range(12))
    assert history["train/loss"][:6] == first["train/loss"]
    assert_learns(history, 12)
