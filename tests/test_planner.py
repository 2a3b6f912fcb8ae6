"""The layout planner: what it lists fits by the estimates `summary` prints, and `fit` names a change that fits."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lit_deepseek.config import load_config, validate_config
from lit_deepseek.planner import (
    USABLE_FRACTION,
    Layout,
    estimate,
    layout_of,
    memory_check,
    parse_memory,
    plan,
    with_layout,
)
from tests.test_cli import assert_one_line_error, run_cli

ROOT = Path(__file__).resolve().parents[1]
SMALL = ROOT / "configs" / "deepseek_v3_small.yaml"
BASE = ROOT / "configs" / "deepseek_v3_base.yaml"


def test_parse_memory_reads_vendor_sizes() -> None:
    assert parse_memory("80GB") == 80 and parse_memory("141 GiB") == 141 and parse_memory("512MB") == 0.5
    with pytest.raises(ValueError, match="--gpu_memory"):
        parse_memory("lots")


def test_every_listed_layout_validates_and_fits_by_the_summary_estimate() -> None:
    cfg = load_config(SMALL)
    fits = plan(cfg, 8, 24.0)
    assert fits, "the small config fits 8 GPUs of 24 GiB by its estimate"
    for cand in fits:
        layout_cfg = with_layout(cfg, cand.layout)
        validate_config(layout_cfg, 8)
        assert layout_cfg.memory_estimate(8)["total"] == pytest.approx(cand.memory_gib)
        assert cand.memory_gib <= 24.0 * USABLE_FRACTION
    times = [c.step_time_s for c in fits]
    assert times == sorted(times)
    # less memory per GPU leaves fewer layouts; the config's own layout (EP 4, micro batch 2) is among those at 80
    assert len(plan(cfg, 8, 80.0)) > len(fits)
    assert layout_of(cfg, 8) in {c.layout for c in plan(cfg, 8, 80.0)}


def test_the_step_model_charges_the_pipeline_bubble_and_cross_node_tensor_parallelism() -> None:
    cfg = load_config(SMALL, overrides={"parallel.expert_parallel_size": 1})
    one = layout_of(cfg, 16)
    pp4 = Layout(1, 4, 1, 4, 1, "none", 2)
    assert estimate(cfg, pp4).bubble_s > 0 == estimate(cfg, one).bubble_s
    tp8 = Layout(8, 1, 1, 2, 1, "none", 2)
    assert estimate(cfg, tp8, gpus_per_node=4).communication_s > estimate(cfg, tp8, gpus_per_node=8).communication_s


def test_memory_check_names_the_smallest_change_and_that_change_fits() -> None:
    cfg = load_config(SMALL, overrides={"training.micro_batch_size": 16, "training.seq_length": 8192})
    assert memory_check(load_config(SMALL), 8, 80.0) is None
    line = memory_check(cfg, 8, 80.0)
    assert line is not None and "\n" not in line
    assert "smallest change that fits: --training.micro_batch_size" in line
    value = int(line.split("--training.micro_batch_size ")[1].split()[0])
    fixed = load_config(SMALL, overrides={"training.micro_batch_size": value, "training.seq_length": 8192})
    assert fixed.memory_estimate(8)["total"] <= 80.0 * USABLE_FRACTION
    assert value > 1  # the closest fitting value, not merely the smallest


def test_base_config_says_how_many_gpus_it_needs() -> None:
    line = memory_check(load_config(BASE), 32, 80.0)
    assert line is not None and "no layout fits 32 GPUs: it needs about 256 GPUs" in line
    # on 2048 GPUs it names a change, and that change (with its layer split) validates and fits
    line = memory_check(load_config(BASE), 2048, 141.0)
    change = line.split("smallest change that fits: ")[1].rsplit(" (", 1)[0].split()
    overrides = {k[2:]: __import__("yaml").safe_load(v) for k, v in zip(change[::2], change[1::2], strict=True)}
    fixed = load_config(BASE, overrides=overrides, world_size=2048)
    assert fixed.memory_estimate(2048)["total"] <= 141.0 * USABLE_FRACTION


def test_plan_cli_first_layout_fits_by_summary(tmp_path: Path) -> None:
    proc = run_cli("plan", "--config", str(BASE), "--gpus", "256", "--gpu_memory", "80GB", "--top", "3", cwd=tmp_path,
                   timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "config's layout: TP 4 x PP 4 x EP 2 x DP 8" in proc.stdout and "does NOT fit" in proc.stdout
    assert "layouts fit" in proc.stdout
    flags = next(line for line in proc.stdout.splitlines() if line.startswith("run the first: "))
    overrides = flags.removeprefix("run the first: ").split()
    proc = run_cli("summary", "--config", str(BASE), "--world_size", "256", *overrides, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Fits 80 GiB GPUs" in proc.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
def test_fit_on_a_gpu_refuses_a_layout_that_does_not_fit(tmp_path: Path) -> None:
    env_skip = os.environ.pop("LIT_DEEPSEEK_SKIP_MEMORY_CHECK", None)
    try:
        proc = run_cli("fit", "--config", str(SMALL), "--trainer.devices", "1", "--parallel.expert_parallel_size", "1",
                       "--training.micro_batch_size", "64", "--training.seq_length", "8192",
                       "--logging.run_dir", str(tmp_path / "run"), cwd=tmp_path, timeout=300)
    finally:
        if env_skip is not None:
            os.environ["LIT_DEEPSEEK_SKIP_MEMORY_CHECK"] = env_skip
    assert_one_line_error(proc, "smallest change that fits: --training.micro_batch_size")
    assert not (tmp_path / "run").exists()
