"""The README's command blocks run as written, in order, in a fresh copy of the project.

Each fenced block is marked with an HTML comment `<!-- readme-test: KIND ... -->`: `cpu` blocks run
here (bash blocks under bash, python blocks under python, `cpu transcript` blocks compare a `$ command`
with the lines shown under it), `gpu` blocks need a multi-GPU node and long runs and are not run here, `skip`
blocks say why they do not run. `pip install` is satisfied by the test environment (a `pip` on PATH
that reports and succeeds); `lit-deepseek` and `python` are this checkout's.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MARK = re.compile(r"<!-- readme-test: (\w+)([^>]*)-->\s*\n```(\w*)\n(.*?)\n```", re.S)
FENCE = re.compile(r"^```(\w+)\n", re.M)


def readme_blocks() -> list[tuple[str, str, str, str]]:
    """(kind, note, language, body) of every marked block, in README order."""
    return [(m.group(1), m.group(2).strip(), m.group(3), m.group(4)) for m in MARK.finditer((ROOT / "README.md").read_text())]


def test_every_command_block_is_marked() -> None:
    text = (ROOT / "README.md").read_text()
    commands = [m for m in FENCE.finditer(text) if m.group(1) in ("bash", "python", "sh")]
    marked = {m.start(4) - len(m.group(3)) - 4 for m in MARK.finditer(text)}
    unmarked = [text[m.start():m.start() + 80] for m in commands if m.start() not in marked]
    assert not unmarked, unmarked
    kinds = {kind for kind, *_ in readme_blocks()}
    assert kinds <= {"cpu", "gpu", "skip"}, kinds


def _shims(bin_dir: Path) -> None:
    bin_dir.mkdir()
    (bin_dir / "lit-deepseek").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m lit_deepseek "$@"\n')
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (bin_dir / "pip").write_text('#!/bin/sh\necho "pip $*: satisfied by the test environment"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)


def _own_data(cwd: Path) -> None:
    """The inputs the README's prepare-data line names: a few JSONL and text files and a BPE tokenizer."""
    import json
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    texts = [topics[k] for k in sorted(topics)[:40]]
    (cwd / "corpus").mkdir()
    (cwd / "books").mkdir()
    (cwd / "corpus" / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:30]))
    (cwd / "books" / "b.txt").write_text("\n\n".join(texts[30:]))
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=500, special_tokens=["<unk>", "<|endoftext|>"]))
    tok.save(str(cwd / "tokenizer.json"))


def _run(cmd: list[str], cwd: Path, env: dict, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.timeout(2400)  # about 4 minutes on 2 idle cores: the demo's 200 steps are most of it
def test_readme_cpu_blocks_run_in_order(tmp_path: Path) -> None:
    cwd = tmp_path / "lit-deepseek"
    cwd.mkdir()
    for name in ("configs", "examples"):
        shutil.copytree(ROOT / name, cwd / name, symlinks=True)
    shutil.copy(ROOT / "README.md", cwd)
    _shims(tmp_path / "bin")
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "LOCAL_RANK", "RANK")}
    env.update(PATH=f"{tmp_path / 'bin'}{os.pathsep}{env.get('PATH', '')}", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    ran = []
    for kind, note, lang, body in readme_blocks():
        if kind in ("skip", "gpu"):
            continue
        if "prepare-data" in body:
            _own_data(cwd)
        if "transcript" in note:
            lines = body.splitlines()
            command = lines[0].removeprefix("$ ").split("#")[0].strip()
            proc = _run(["bash", "-c", command], cwd, env, 300)
            got = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
            for expected in lines[1:]:
                assert expected in got, f"README shows {expected!r} for {command!r}; got {got[-5:]}"
        elif lang == "python":
            script = tmp_path / "block.py"
            script.write_text(body)
            proc = _run([sys.executable, str(script)], cwd, env, 300)
            assert proc.returncode == 0, f"{body}\n{proc.stderr[-3000:]}"
        else:
            proc = _run(["bash", "-e", "-o", "pipefail", "-c", body], cwd, env, 1800)
            assert proc.returncode == 0, f"{body}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        ran.append((body.splitlines()[0], proc.stdout))

    # what the blocks promise: the demo trained, checkpointed and said where its outputs are; own data was sharded;
    # the 2-process run's folder checkpoint resumed on one process
    outputs = "\n".join(out for _, out in ran)
    run_dir = cwd / "runs" / "cpu_demo"
    assert "lit-deepseek: run outputs" in outputs
    assert (run_dir / "checkpoints" / "step0000200.ckpt").is_file()
    assert (run_dir / "checkpoints" / "step0000070.ckpt").is_dir()
    assert any((run_dir / "mlartifacts").rglob("*.png")) and (run_dir / "mlflow.db").is_file()
    assert list((cwd / "shards").glob("train-*.tar"))
    assert "layouts fit" in outputs and "Active params: 36.6B" in outputs
    assert not (cwd / "mlruns").exists() and not (cwd / ".lit_deepseek_data").exists()

