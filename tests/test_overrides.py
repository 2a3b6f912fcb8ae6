"""Every override file stacks on every config it is meant for: it validates and summarises (no training)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lit_deepseek.config import load_config
from tests.test_cli import run_cli

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
OVERRIDES = CONFIGS / "overrides"
SHIPPED = sorted(p for p in CONFIGS.glob("*.yaml") if not p.is_symlink())


def _pairs() -> list[tuple[Path, Path]]:
    pairs = []
    for config in SHIPPED:
        for override in sorted(OVERRIDES.glob("*.yaml")):  # size-independent: stacks on every config
            pairs.append((config, override))
        for override in sorted((OVERRIDES / config.stem).glob("*.yaml")):  # sized for this config
            pairs.append((config, override))
    return pairs


def test_every_config_has_its_sized_overrides_and_no_override_is_orphaned() -> None:
    sized = {p.parent.name for p in OVERRIDES.glob("*/*.yaml")}
    assert sized <= {c.stem for c in SHIPPED}, sized
    for config in ("deepseek_v3_base", "deepseek_v3_small"):
        assert {p.name for p in (OVERRIDES / config).glob("*.yaml")} == {"smaller_gpus.yaml", "max_quality.yaml"}


@pytest.mark.parametrize("config,override", _pairs(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_override_stacks_validates_and_summarises(config: Path, override: Path) -> None:
    plain = load_config(config)
    cfg = load_config(config, override)
    text = cfg.summary()
    assert "Parameters" in text and "Estimated memory per GPU" in text
    if override.name == "max_quality.yaml":
        a = cfg.model.mla
        assert a.d_model / 2 >= a.d_latent > plain.model.mla.d_latent  # a higher latent, within the guide's range
        assert cfg.training.grad_clip == 0.5 and cfg.model.moe.capacity_factor == 1.25
    if override.name == "smaller_gpus.yaml":
        assert cfg.training.micro_batch_size == 1 and not cfg.training.use_fp8 and not cfg.model.mla.use_fp8_kv
        assert cfg.memory_estimate(64)["total"] < plain.memory_estimate(64)["total"]


def test_readme_stacking_example_runs_through_the_cli(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    example = "--config configs/deepseek_v3_small.yaml --config configs/overrides/deepseek_v3_small/max_quality.yaml"
    assert example in readme
    proc = run_cli("fit", *example.split(), "--print_config", cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "d_latent: 512" in proc.stdout and "capacity_factor: 1.25" in proc.stdout
