"""Bit-exact resume after SIGKILL, and tracking to a real MLflow server that a resumed run continues."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "cpu_demo.yaml")
FAST = ["--training.seq_length", "64", "--training.micro_batch_size", "2", "--training.global_batch_size", "4",
        "--training.val_every_n_steps", "1000", "--logging.log_every_n_steps", "1", "--logging.progress_bar", "false",
        "--logging.heatmap_every_n_steps", "0", "--logging.async_logging", "false"]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "lit_deepseek", "fit", "--config", DEMO, *FAST, *args]


def run(args: list[str], cwd: Path) -> None:
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


def loss_history(tracking_uri: str, experiment: str) -> tuple[list, dict[int, float]]:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    by_step: dict[int, float] = {}
    for run in runs:
        for m in sorted(client.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.timestamp):
            by_step[m.step] = m.value  # the latest value logged for a step wins (a resumed run re-logs)
    return runs, by_step


def test_sigkill_and_resume_is_bit_exact(tmp_path: Path) -> None:
    steps = 8
    common = ["--training.max_steps", str(steps), "--training.deterministic", "true",
              "--checkpoint.every_n_steps", "1", "--checkpoint.keep_last", "2"]
    ref_dir, crash_dir = tmp_path / "ref", tmp_path / "crash"
    run(cli(*common, "--logging.run_dir", str(ref_dir)), tmp_path)

    proc = subprocess.Popen(cli(*common, "--logging.run_dir", str(crash_dir)), cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt_dir = crash_dir / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and not (ckpt_dir / "step0000003.ckpt").exists():
        assert proc.poll() is None, "training ended before it could be killed"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # mid-step, wherever it is
    proc.wait()
    assert not (ckpt_dir / f"step{steps:07d}.ckpt").exists()
    run(cli(*common, "--logging.run_dir", str(crash_dir), "--ckpt_path", "last"), tmp_path)

    runs_ref, ref = loss_history(f"sqlite:///{ref_dir / 'mlflow.db'}", "cpu-demo")
    runs_crash, resumed = loss_history(f"sqlite:///{crash_dir / 'mlflow.db'}", "cpu-demo")
    assert sorted(ref) == list(range(steps))
    assert len(runs_crash) == 1  # the resumed run continued the same MLflow run
    assert sorted(resumed) == list(range(steps))
    assert resumed == ref  # to the last bit, every step


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path: Path):
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "artifacts"), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if time.time() > deadline or proc.poll() is not None:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail("mlflow server did not start")
        time.sleep(0.5)
    yield url
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def test_tracks_to_a_real_mlflow_server_and_resume_continues_the_run(tmp_path: Path, mlflow_server: str) -> None:
    import mlflow

    run_dir = tmp_path / "run"
    common = ["--logging.tracking_uri", mlflow_server, "--logging.run_dir", str(run_dir),
              "--logging.experiment_name", "server-test", "--checkpoint.every_n_steps", "1",
              "--logging.heatmap_every_n_steps", "2"]
    run(cli(*common, "--training.max_steps", "3"), tmp_path)
    run(cli(*common, "--training.max_steps", "5", "--ckpt_path", "last"), tmp_path)
    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    exp = client.get_experiment_by_name("server-test")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run_id = runs[0].info.run_id
    steps = sorted({m.step for m in client.get_metric_history(run_id, "train/loss")})
    assert steps == [0, 1, 2, 3, 4]
    assert runs[0].data.params["training.global_batch_size"] == "4"
    assert "config/config.yaml" in [a.path for a in client.list_artifacts(run_id, "config")]
    assert any(a.path.endswith(".png") for a in client.list_artifacts(run_id, "expert_load"))
