"""What keeps a run directory safe: one run at a time, checkpoint files tidy, resuming from an intact one.

- `lock_run_dir`: an exclusive `fcntl` lock on ``<run_dir>/.lock`` (holding the PID) that the kernel
  releases when the process dies, so a second `fit` on a busy run directory is refused with one line and a
  lock left by a dead process is simply taken over.
- `tidy_checkpoint_dir`: removes temporary files of interrupted saves and periodic checkpoints beyond
  ``checkpoint.keep_last``.
- `resolve_resume`: ``--ckpt_path last`` (or a path) -> the newest intact checkpoint, falling back past a
  damaged ``last.ckpt`` with one line.
- `hardlink`: ``last`` and ``best`` are hard links to a step checkpoint (a tree of hard links for a
  distributed checkpoint folder), replaced atomically; pruning a step name never frees their bytes.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import zipfile
from pathlib import Path
from typing import Any, Optional, Union

from lit_deepseek.config import ConfigError

LOCK_NAME = ".lock"
STEP_RE = re.compile(r"^step(\d+)\.ckpt$")
_TMP_RE = re.compile(r"^\..+\.(tmp|link)-\d+$|^.+\.ckpt\.tmp$")
_held: dict[str, Any] = {}  # open lock files, kept for the life of the process


def note(message: str) -> None:
    """One line to the user on stderr."""
    print(f"lit-deepseek: {message}", file=sys.stderr, flush=True)


def launch_rank() -> int:
    """The process' global rank as the launcher set it (0 for the process a user started)."""
    for key in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        value = os.environ.get(key)
        if value is not None and value.isdigit() and int(value) != 0:
            return int(value)
    return 0


def lock_run_dir(run_dir: Union[str, os.PathLike]) -> None:
    """Take the run directory's lock or raise ConfigError (busy, or not writable)."""
    import fcntl

    path = Path(run_dir)
    key = str(path.resolve())
    if key in _held:
        return
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd = os.open(path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise ConfigError(f"logging.run_dir: cannot write to {path}: {exc.strerror or exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise ConfigError(f"logging.run_dir: {path} is in use by another run (PID {holder}); wait for it to "
                          f"finish, stop it, or choose another logging.run_dir") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
    except OSError as exc:
        os.close(fd)
        raise ConfigError(f"logging.run_dir: cannot write to {path}: {exc.strerror or exc}") from None
    _held[key] = fd


def step_of(path: Union[str, os.PathLike]) -> Optional[int]:
    m = STEP_RE.match(Path(path).name)
    return int(m.group(1)) if m else None


def step_checkpoints(dirpath: Union[str, os.PathLike]) -> list[Path]:
    """Periodic checkpoints of a folder, newest step first."""
    d = Path(dirpath)
    if not d.is_dir():
        return []
    found = [p for p in d.iterdir() if step_of(p) is not None]
    return sorted(found, key=lambda p: step_of(p) or 0, reverse=True)


def write_error(folder: Path) -> Optional[OSError]:
    """None if `folder` can be created and written to (a probe file is written and removed), else
    the OSError that stopped it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        return exc
    return None


def tidy_checkpoint_dir(dirpath: Union[str, os.PathLike], keep_last: int,
                        protect: Optional[Path] = None) -> tuple[int, int]:
    """Remove temporary files of interrupted saves and step checkpoints beyond keep_last (-1 keeps all).

    Returns (temporary files removed, checkpoints removed). ConfigError when the folder is not writable.
    """
    d = Path(dirpath)
    exc = write_error(d)
    if exc is not None:
        raise ConfigError(f"checkpoint.dir: cannot write to {d}: {exc.strerror or exc}")
    temps = 0
    for p in list(d.iterdir()):
        if _TMP_RE.match(p.name):
            _remove(p)
            temps += 1
    pruned = 0
    if keep_last > 0:
        protected = protect.resolve() if protect is not None else None
        for p in step_checkpoints(d)[keep_last:]:
            if protected is None or p.resolve() != protected:
                _remove(p)
                pruned += 1
    if temps or pruned:
        note(f"checkpoint: removed {temps} temporary file(s) of interrupted saves and {pruned} periodic "
             f"checkpoint(s) beyond checkpoint.keep_last ({keep_last}) in {d}")
    return temps, pruned


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def damage(path: Union[str, os.PathLike]) -> Optional[str]:
    """Why a checkpoint cannot be loaded (None when it looks intact): a torch zip archive whose CRCs
    match, or a distributed checkpoint folder with its metadata."""
    p = Path(path)
    if p.is_dir():
        return None if (p / ".metadata").is_file() else "no .metadata (incomplete distributed checkpoint)"
    if not p.is_file():
        return "missing"
    try:
        with zipfile.ZipFile(p) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        return f"not a readable checkpoint archive ({exc})"
    return None if bad is None else f"damaged member {bad}"


def resolve_resume(ckpt_path: str, dirpath: Union[str, os.PathLike]) -> Optional[str]:
    """The checkpoint to resume from: for 'last', the newest intact one of last.ckpt and the step
    checkpoints (one line when last.ckpt is skipped); None when there is none yet. A named file that is
    damaged is a ConfigError."""
    if ckpt_path != "last":
        reason = damage(ckpt_path)
        if reason is not None:
            raise ConfigError(f"ckpt_path: {ckpt_path} cannot be loaded: {reason}")
        return ckpt_path
    d = Path(dirpath)
    candidates = [d / "last.ckpt"] if (d / "last.ckpt").exists() else []
    candidates += step_checkpoints(d)
    if not candidates:
        note(f"checkpoint: --ckpt_path last, but {d} holds no checkpoint yet; starting from the beginning")
        return None
    skipped: list[str] = []
    for c in candidates:
        reason = damage(c)
        if reason is None:
            if skipped:
                note(f"checkpoint: {skipped[0]}; resuming from {c.name}, the newest intact checkpoint")
            return str(c)
        skipped.append(f"{c.name} cannot be loaded ({reason})")
    raise ConfigError(f"ckpt_path: no intact checkpoint in {d} ({skipped[0]}); start without --ckpt_path")


def hardlink(src: Union[str, os.PathLike], dst: Union[str, os.PathLike]) -> None:
    """Make dst name the same bytes as src (a file, or a folder as a tree of links), atomically replacing dst.
    Falls back to a copy where the filesystem has no hard links."""
    src, dst = Path(src), Path(dst)
    tmp = dst.with_name(f".{dst.name}.link-{os.getpid()}")
    _remove(tmp)
    if src.is_dir():
        shutil.copytree(src, tmp, copy_function=_link_or_copy)
        old = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
        if dst.exists():
            os.replace(dst, old)
        os.replace(tmp, dst)
        _remove(old)
    else:
        _link_or_copy(src, tmp)
        os.replace(tmp, dst)


def _link_or_copy(src: Any, dst: Any) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
