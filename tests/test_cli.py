"""The `lit-deepseek` command: bad input is one line, the demo really trains and tracks."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "cpu_demo.yaml"


def run_cli(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    return subprocess.run([sys.executable, "-m", "lit_deepseek", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def assert_one_line_error(proc: subprocess.CompletedProcess, needle: str) -> None:
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("lit-deepseek: error:")]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert needle in lines[0], lines[0]


def test_base_config_on_one_cpu_fails_fast_with_one_line(tmp_path: Path) -> None:
    start = time.perf_counter()
    proc = run_cli("fit", "--config", str(ROOT / "configs" / "base.yaml"), cwd=tmp_path, timeout=120)
    assert_one_line_error(proc, "world size 1 is not divisible by TP x PP x EP = 4 x 4 x 2 = 32")
    assert time.perf_counter() - start < 60
    assert not (tmp_path / "runs").exists()  # nothing was started


@pytest.mark.parametrize("args,needle", [
    (["--model.mla.d_modell", "64"], "model.mla.d_modell"),
    (["--model.num_layers", "four"], "model.num_layers"),
    (["--parallel.expert_parallel_size", "3", "--trainer.devices", "3", "--trainer.accelerator", "cpu"],
     "model.moe.num_experts (8) must be divisible by EP (3)"),
    (["--training.global_batch_size", "12"], "training.global_batch_size"),
    (["--model.moe.num_limited_groups", "4"], "model.moe.num_limited_groups"),
])
def test_bad_input_is_one_clear_line(tmp_path: Path, args: list, needle: str) -> None:
    proc = run_cli("fit", "--config", str(DEMO), *args, cwd=tmp_path, timeout=120)
    assert_one_line_error(proc, needle)


def test_unknown_key_in_a_second_config_file(tmp_path: Path) -> None:
    extra = tmp_path / "extra.yaml"
    extra.write_text("training:\n  learning_rat: 0.1\n")
    proc = run_cli("fit", "--config", str(DEMO), "--config", str(extra), cwd=tmp_path, timeout=120)
    assert_one_line_error(proc, "learning_rat")


def test_summary_subcommand(tmp_path: Path) -> None:
    proc = run_cli("summary", "--config", str(ROOT / "configs" / "deepseek_v3_base.yaml"), cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "671.03B" in proc.stdout and "active per token" in proc.stdout


def test_demo_trains_tracks_and_checkpoints(tmp_path: Path) -> None:
    import mlflow

    run_dir = tmp_path / "run"
    proc = run_cli("fit", "--config", str(DEMO), "--training.max_steps", "6", "--training.val_every_n_steps", "3",
                   "--training.val_batches", "2", "--checkpoint.every_n_steps", "3", "--logging.log_every_n_steps", "1",
                   "--logging.heatmap_every_n_steps", "3", "--logging.run_dir", str(run_dir),
                   "--logging.progress_bar", "false",
                   # a trainer argument given as a class path reaches Lightning as an object
                   "--trainer.profiler", "lightning.pytorch.profilers.SimpleProfiler",
                   "--trainer.profiler.init_args.dirpath", str(tmp_path / "prof"),
                   "--trainer.profiler.init_args.filename", "steps", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "run_training_batch" in (tmp_path / "prof" / "fit-steps.txt").read_text()
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt"))
    assert "last.ckpt" in ckpts and "step0000006.ckpt" in ckpts and "best.ckpt" in ckpts, ckpts

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("cpu-demo")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in history] == [0, 1, 2, 3, 4, 5]
    assert all(0 < m.value < 10 for m in history)
    for key in ("val/loss", "train/grad_norm", "train/lr", "train/tokens_per_s", "moe/max_imbalance"):
        assert key in run.data.metrics, key
    assert run.data.params["model.mla.d_model"] == "128"
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "config")]
    assert "config/config.yaml" in artifacts
    plots = [a.path for a in client.list_artifacts(run.info.run_id, "expert_load")]
    assert any(p.endswith(".png") for p in plots), plots

    # validate and test the best checkpoint: the same validation loss as the one that made it best
    best_val = min(m.value for m in client.get_metric_history(run.info.run_id, "val/loss"))
    # outputs stay under the run directory, and the run says where they are
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / ".lit_deepseek_data").exists()
    assert any((run_dir / "mlartifacts").rglob("config.yaml")) and any((run_dir / "data").rglob("val-*.tar"))
    assert f"checkpoints:  {run_dir / 'checkpoints'}" in proc.stdout and "mlflow.db" in proc.stdout

    # `test` needs its own shards: never silently the validation set
    proc = run_cli("test", "--config", str(DEMO), "--logging.run_dir", str(run_dir), "--ckpt_path",
                   str(run_dir / "checkpoints" / "best.ckpt"), cwd=tmp_path, timeout=120)
    assert_one_line_error(proc, "data.test_shards")
    val_shards = str(next((run_dir / "data").glob("*/val-*.tar")))
    for sub, key in (("validate", "val/loss"), ("test", "test/loss")):
        proc = run_cli(sub, "--config", str(DEMO), "--training.val_batches", "2", "--logging.run_dir", str(run_dir),
                       "--ckpt_path", str(run_dir / "checkpoints" / "best.ckpt"), "--trainer.logger", "false",
                       "--data.test_shards", val_shards, "--logging.progress_bar", "false", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        line = next(line for line in proc.stdout.splitlines() if key in line)
        assert abs(float(line.split()[-2]) - best_val) < 1e-5, line


def test_convert_round_trip_through_the_cli(tmp_path: Path) -> None:
    import torch

    from lit_deepseek.checkpoint.hf import load_hf_model, save_hf_model
    from lit_deepseek.config import load_config
    from lit_deepseek.model import DeepSeekV3

    cfg = load_config(DEMO).model
    cfg.num_layers = 2
    model = DeepSeekV3(cfg)
    model.init_weights(seed=3)
    save_hf_model(model, tmp_path / "hf", max_shard_size="200KB")
    for args in (["convert", str(tmp_path / "hf"), str(tmp_path / "native"), "--to", "native"],
                 ["convert", str(tmp_path / "native"), str(tmp_path / "hf2"), "--to", "hf",
                  "--max_shard_size", "300KB"]):
        proc = run_cli(*args, cwd=tmp_path, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list((tmp_path / "hf2").glob("*.safetensors"))) > 1
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(load_hf_model(tmp_path / "hf2")(ids), model(ids), rtol=0, atol=0)
    proc = run_cli("convert", str(tmp_path / "missing"), str(tmp_path / "x"), "--to", "native", cwd=tmp_path)
    assert_one_line_error(proc, "convert")


def test_deepspeed_is_refused_for_model_parallel_layouts(tmp_path: Path) -> None:
    proc = run_cli("fit", "--config", str(DEMO), "--trainer.strategy", "deepspeed", "--trainer.accelerator", "cpu",
                   "--trainer.devices", "2", "--parallel.expert_parallel_size", "2", cwd=tmp_path, timeout=120)
    assert_one_line_error(proc, "DeepSpeed runs data-parallel layouts only")


def test_fabric_custom_loop_example_trains_the_same_under_ep2_and_pp2(tmp_path: Path) -> None:
    """The Fabric example runs on 2 CPU processes; EP2 and PP2 layouts print the same losses."""
    example = ROOT / "examples" / "fabric_custom_loop.py"
    losses = []
    for layout in (["--ep", "2"], ["--pp", "2", "--ep", "1", "--zero-stage", "3"]):
        proc = subprocess.run([sys.executable, str(example), *layout], cwd=tmp_path, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        losses.append([float(line.split()[3]) for line in proc.stdout.splitlines() if line.startswith("step ")])
    assert len(losses[0]) == 5
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)


def test_one_and_two_process_runs_share_a_run_dir_and_resume_across(tmp_path: Path) -> None:
    """A 1-process run (file checkpoints), then a 2-process run (folder checkpoints) in the same run directory,
    then one process resuming the 2-process checkpoint through the CLI."""
    run_dir = tmp_path / "run"
    common = ["--config", str(DEMO), "--training.val_every_n_steps", "2", "--training.val_batches", "2",
              "--checkpoint.every_n_steps", "2", "--logging.run_dir", str(run_dir), "--logging.progress_bar", "false",
              "--logging.heatmap_every_n_steps", "0"]
    proc = run_cli("fit", *common, "--training.max_steps", "2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run_dir / "checkpoints" / "best.ckpt").is_file()
    two = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--parallel.expert_parallel_size", "2"]
    proc = run_cli("fit", *common, *two, "--ckpt_path", "last", cwd=tmp_path, timeout=120)
    assert_one_line_error(proc, "is a one-process checkpoint (one file)")
    proc = run_cli("fit", *common, "--training.max_steps", "4", *two, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    folders = [p for p in (run_dir / "checkpoints").glob("step0000004*.ckpt") if p.is_dir()]
    assert len(folders) == 1 and (run_dir / "checkpoints" / "best.ckpt").is_dir(), proc.stderr[-3000:]
    proc = run_cli("fit", *common, "--training.max_steps", "6", "--ckpt_path", str(folders[0]), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"Restored all states from the checkpoint at {folders[0]}" in proc.stdout + proc.stderr
    assert (run_dir / "checkpoints" / "step0000006.ckpt").exists()


def test_help_lists_every_subcommand_and_predict_is_gone(tmp_path: Path) -> None:
    proc = run_cli("--help", cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    listed = {line.split()[0] for line in proc.stdout.splitlines() if line.startswith("  ") and line.split()}
    assert {"fit", "validate", "test", "summary", "plan", "prepare-data", "convert"} <= listed
    assert "predict" not in proc.stdout
    proc = run_cli("predict", "--config", str(DEMO), cwd=tmp_path, timeout=120)
    assert_one_line_error(proc, "invalid choice: 'predict'")


def test_print_config_shows_the_values_that_will_be_used(tmp_path: Path) -> None:
    import yaml

    proc = run_cli("fit", "--config", str(DEMO), "--print_config", "--training.max_steps", "7", cwd=tmp_path,
                   timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    printed = yaml.safe_load(proc.stdout)
    assert printed["trainer"]["max_steps"] == 7 and printed["trainer"]["precision"] == "32-true"
    assert printed["trainer"]["default_root_dir"] == "runs/cpu_demo"
    assert printed["data"]["cache_dir"] == "runs/cpu_demo/data"
    assert "args parameter" not in proc.stderr
