"""Fault injection through the real CLI: bad setups, a busy run directory, SIGTERM, damaged files.

Each case runs `python -m lit_deepseek` in a subprocess, as a user or a scheduler would, and checks
that it ends in one line with a non-zero status, and that nothing a user saved is lost. Tests run as
root here, so read-only folders are made with a filesystem root cannot write either (/sys); where
that is writable the case is skipped.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "cpu_demo.yaml")
TINY = ["--config", DEMO, "--model.num_layers", "2", "--training.seq_length", "32", "--training.micro_batch_size", "2",
        "--training.global_batch_size", "2", "--training.val_every_n_steps", "1000", "--logging.progress_bar", "false",
        "--logging.heatmap_every_n_steps", "0", "--logging.log_every_n_steps", "1", "--logging.async_logging", "false"]


def lit(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    return subprocess.run([sys.executable, "-m", "lit_deepseek", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def one_line(proc: subprocess.CompletedProcess, needle: str, status: int = 2) -> str:
    assert proc.returncode == status, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert needle in lines[0], lines[0]
    return lines[0]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the socket is: nothing listens there


def unwritable_dir() -> Path:
    path = Path("/sys/lit-deepseek-read-only")
    try:
        path.mkdir()
    except OSError:
        return path
    path.rmdir()
    pytest.skip("no filesystem here refuses writes to root")


@pytest.mark.parametrize("case", ["unreachable_mlflow", "read_only_run_dir", "read_only_cache_dir", "dir_as_config"])
def test_fit_refuses_a_bad_setup_at_once_with_one_line(tmp_path: Path, case: str) -> None:
    run_dir = tmp_path / "run"
    args, needle = {
        "unreachable_mlflow": (["--logging.tracking_uri", f"http://127.0.0.1:{closed_port()}"],
                               "logging.tracking_uri: cannot reach http://127.0.0.1:"),
        "read_only_run_dir": (["--logging.run_dir", str(unwritable_dir() / "run") if case == "read_only_run_dir"
                               else ""], "logging.run_dir: cannot write to"),
        "read_only_cache_dir": (["--data.cache_dir", str(unwritable_dir() / "cache") if case == "read_only_cache_dir"
                                 else ""], "data.cache_dir: cannot write the built-in corpus"),
        "dir_as_config": (["--config", str(tmp_path)], "is a directory, not a YAML file"),
    }[case]
    start = time.perf_counter()
    proc = lit("fit", *TINY, "--logging.run_dir", str(run_dir), *args, cwd=tmp_path, timeout=120)
    one_line(proc, needle)
    assert time.perf_counter() - start < 90  # seconds, not minutes of retries
    assert not (run_dir / "mlflow.db").exists() and not (run_dir / "checkpoints").exists()


def intact_and_finite(path: Path) -> int:
    state = torch.load(path, weights_only=True, map_location="cpu")
    tensors = list(state["state_dict"].values())
    for opt in state["optimizer_states"]:
        tensors += [v for s in opt["state"].values() for v in s.values() if isinstance(v, torch.Tensor)]
    assert all(torch.isfinite(t).all() for t in tensors if t.is_floating_point())
    return int(state["global_step"])


def test_busy_run_dir_sigterm_then_resume_past_damaged_files(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    ckpts = run_dir / "checkpoints"
    common = [*TINY, "--logging.run_dir", str(run_dir), "--checkpoint.every_n_steps", "2",
              "--checkpoint.keep_last", "2"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    first = subprocess.Popen([sys.executable, "-m", "lit_deepseek", "fit", *common, "--training.max_steps", "100000"],
                             cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not (ckpts / "step0000004.ckpt").exists():
            assert first.poll() is None, first.stderr.read()[-3000:] if first.stderr else ""
            assert time.time() < deadline, "no checkpoint within 4 minutes"
            time.sleep(0.1)
        # a second run on the busy run directory is refused, naming the PID that holds it
        one_line(lit("fit", *common, "--training.max_steps", "3", cwd=tmp_path, timeout=120),
                 f"is in use by another run (PID {first.pid})")
        # the scheduler's SIGTERM: the step finishes, a checkpoint is saved, the status is not 0
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 143, err[-3000:]
    line = next(line for line in err.splitlines() if "stopped by SIGTERM" in line)
    saved = Path(line.split("checkpoint saved to ")[1].split(";")[0])
    stopped_at = intact_and_finite(saved)
    assert stopped_at >= 4 and (ckpts / "last.ckpt").stat().st_ino == saved.stat().st_ino  # last is a link
    steps = sorted(p.name for p in ckpts.glob("step*.ckpt"))
    assert len(steps) <= 2, steps  # keep_last
    # every step the checkpoint holds has its metrics in MLflow, the one that was running at SIGTERM too
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    (run,) = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    logged = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss"))
    assert logged == list(range(stopped_at)), (logged[-5:], stopped_at)

    # damage what a crash or a full disk leaves: a cut last.ckpt, an orphaned temporary file, a broken mlflow.db
    (ckpts / "last.ckpt").unlink()
    (ckpts / "last.ckpt").write_bytes(saved.read_bytes()[:4096])
    (ckpts / ".step0000099.ckpt.tmp-12345").write_bytes(b"partial")
    (run_dir / "mlflow.db").write_bytes(b"this is not a database" * 100)
    proc = lit("fit", *common, "--training.max_steps", str(stopped_at + 2), "--ckpt_path", "last", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "last.ckpt cannot be loaded" in proc.stderr and f"resuming from {saved.name}" in proc.stderr
    assert "removed 1 temporary file(s)" in proc.stderr
    assert "mlflow.db cannot be read" in proc.stderr and list(run_dir.glob("mlflow.db.damaged-*"))
    assert not list(ckpts.glob(".*tmp*"))
    assert intact_and_finite(ckpts / "last.ckpt") > stopped_at  # it trained on from the intact checkpoint


def test_out_of_vocabulary_shard_names_the_shard_even_from_a_worker(tmp_path: Path) -> None:
    import numpy as np
    import webdataset as wds

    shard = tmp_path / "foreign-000000.tar"
    with wds.TarWriter(str(shard), encoder=False) as sink:
        for i in range(8):
            sink.write({"__key__": f"{i:04d}", "tokens.u16": np.full(64, 5000 + i, dtype="<u2").tobytes()})
    proc = lit("fit", *TINY, "--logging.run_dir", str(tmp_path / "run"), "--data.train_shards", str(shard),
               "--data.val_shards", str(shard), "--data.num_workers", "1", "--training.max_steps", "2", cwd=tmp_path)
    one_line(proc, f"data.train_shards: shard {shard} holds token id 500")


def test_prepare_data_reports_bad_input_and_writes_all_or_nothing(tmp_path: Path) -> None:
    good = tmp_path / "good.txt"
    good.write_text("some text " * 20)
    (tmp_path / "binary.txt").write_bytes(bytes(range(256)) * 8)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (tmp_path / "empty.txt").write_text("")
    out = tmp_path / "shards"
    proc = lit("prepare-data", "--inputs", str(good), str(tmp_path / "binary.txt"), str(tmp_path / "latin1.txt"),
               "--output", str(out), "--no_progress", cwd=tmp_path)
    line = one_line(proc, "2 of 3 file(s) are binary or not UTF-8 text")
    assert "binary.txt" in line and "latin1.txt" in line
    assert not out.exists()
    one_line(lit("prepare-data", "--inputs", str(tmp_path / "empty.txt"), "--output", str(out), "--no_progress",
                 cwd=tmp_path), "hold no non-empty document")
    assert not out.exists()
    # a good run, then a failing --overwrite: the first run's shards and manifest are untouched
    proc = lit("prepare-data", "--inputs", str(good), "--output", str(out), "--no_progress", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert "manifest.json" in before
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "fine"}\n{"text": broken\n')
    proc = lit("prepare-data", "--inputs", str(good), str(bad_json), "--output", str(out), "--overwrite",
               "--no_progress", cwd=tmp_path)
    one_line(proc, "is not valid JSON")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".shards")]


def test_deep_ep_without_the_package_warns_once_and_falls_back() -> None:
    import importlib.util

    from lit_deepseek.cli import _warn_unavailable_deep_ep
    from lit_deepseek.config import load_config

    if importlib.util.find_spec("deep_ep") is not None and torch.cuda.is_available():
        pytest.skip("DeepEP is usable here")
    cfg = load_config(DEMO, overrides={"model.moe.use_deep_ep": True})
    with pytest.warns(UserWarning, match=r"^model\.moe\.use_deep_ep: .*; tokens are dispatched by the built-in"):
        _warn_unavailable_deep_ep(cfg)
    assert cfg.model.moe.use_deep_ep is False  # the dispatcher choice later does not warn a second time
