"""Callbacks and logger setup: checkpoints, MLflow tracking, the expert-load heatmap."""

from __future__ import annotations

import copy
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
import yaml
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lit_deepseek.config import CheckpointConfig, ConfigError, DeepSeekConfig, LoggingConfig
from lit_deepseek.training.run_guard import hardlink, step_checkpoints

RUN_ID_FILE = "mlflow_run_id"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file in the same folder, fsyncs it, then renames it
    over the target, so a crash while saving never leaves a damaged checkpoint behind.

    With ``async_save`` (the default) the state is first copied off the live tensors (into host
    buffers that are reused from save to save, for GPU tensors) and written by one background thread, so training stalls only for that
    copy. Writes, links and removals run in the order they were asked for; at most one checkpoint is
    in flight, and `teardown` waits for the last one (a failed write is raised at the next call)."""

    def __init__(self, async_save: bool = True) -> None:
        super().__init__()
        self.async_save = async_save
        self._executor: Optional[ThreadPoolExecutor] = None
        self._pending: list[Future] = []
        self._host: dict[str, torch.Tensor] = {}
        self._seen: dict[tuple, torch.Tensor] = {}

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        path = Path(path)
        fs = get_filesystem(str(path))
        if type(fs).__name__ != "LocalFileSystem":
            self.wait()
            return super().save_checkpoint(checkpoint, path, storage_options)
        if not self.async_save:
            return _write_atomic(checkpoint, path)
        self.wait()  # one checkpoint in flight: its host buffers are reused for this one
        snapshot = self._snapshot(checkpoint, "")
        self._seen = {}
        self._submit(_write_atomic, snapshot, path)

    def reserve(self, state: dict[str, Any]) -> None:
        """Allocate, in the background, the host buffers that snapshots of checkpoints holding `state`
        (shaped like a checkpoint: {"state_dict": ..., "optimizer_states": [...]}) copy into, and touch
        their pages. Fresh host memory pages in at about 1 GB/s, most of the first save's stall of
        the small model (~19 GB) on an H200 host; after this the save stalls for the copy alone."""
        if not self.async_save:
            return
        shapes: dict[str, tuple[torch.Size, torch.dtype]] = {}
        self._walk(state, "", shapes)
        if shapes:
            self._submit(self._allocate, shapes)

    def _walk(self, obj: Any, key: str, shapes: dict[str, tuple[torch.Size, torch.dtype]]) -> None:
        """The buffer keys of `_snapshot` (same path scheme) and their shapes, for kept tensors."""
        if isinstance(obj, torch.Tensor):
            if self.keeps(obj):
                shapes[key] = (obj.shape, obj.dtype)
        elif isinstance(obj, dict):
            for k, v in obj.items():
                self._walk(v, f"{key}/{k}", shapes)
        elif isinstance(obj, (list, tuple)) and type(obj) in (list, tuple):
            for i, v in enumerate(obj):
                self._walk(v, f"{key}/{i}", shapes)

    def _allocate(self, shapes: dict[str, tuple[torch.Size, torch.dtype]]) -> None:
        for key, (shape, dtype) in shapes.items():
            self._buffer(key, shape, dtype)

    def _buffer(self, key: str, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """The host buffer kept under `key`, (re)allocated and paged in when it does not fit."""
        buf = self._host.get(key)
        if buf is None or buf.shape != shape or buf.dtype != dtype:
            buf = self._host[key] = torch.empty(shape, dtype=dtype)
            buf.reshape(-1).view(torch.uint8)[::4096].zero_()  # one write per page pages it in now
        return buf

    @staticmethod
    def keeps(t: torch.Tensor) -> bool:
        """Whether the snapshot copies t into a buffer kept from save to save (accelerator tensors;
        host tensors are cloned, so CPU training does not hold a second copy of its state)."""
        return t.device.type != "cpu"

    def link(self, src: Any, dst: Any) -> None:
        """Point dst at src's bytes (hard link) once src is written."""
        self._submit(hardlink, src, dst)

    def remove_checkpoint(self, path: Any) -> None:
        self._submit(super().remove_checkpoint, path)

    def wait(self) -> None:
        """Block until every queued write, link and removal is done; raise the first failure."""
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()

    def teardown(self) -> None:
        self.wait()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        self._host.clear()

    def _submit(self, fn: Any, *args: Any) -> None:
        if not self.async_save:
            fn(*args)
            return
        done = [f for f in self._pending if f.done()]
        self._pending = [f for f in self._pending if not f.done()]
        for future in done:
            future.result()  # surface a failed background write
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")
        self._pending.append(self._executor.submit(fn, *args))

    def _snapshot(self, obj: Any, key: str) -> Any:
        """A copy of the checkpoint that training can no longer change (tensors on the host)."""
        if isinstance(obj, torch.Tensor):
            t = obj.detach()
            same = (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride())  # tied weights stay one tensor
            if same in self._seen:
                return self._seen[same]
            if not self.keeps(t):
                copy_ = t.clone()
            else:  # host buffers kept for the next save (plain memory: pinning ~19 GB took ~24 s on an
                # H200 host); `reserve` may have allocated them ahead of the first save
                copy_ = self._buffer(key, t.shape, t.dtype)
                copy_.copy_(t)
            self._seen[same] = copy_
            return copy_
        if isinstance(obj, dict):
            out = type(obj)() if type(obj) is not dict else {}
            for k, v in obj.items():
                out[k] = self._snapshot(v, f"{key}/{k}")
            return out
        if isinstance(obj, (list, tuple)) and type(obj) in (list, tuple):
            return type(obj)(self._snapshot(v, f"{key}/{i}") for i, v in enumerate(obj))
        return copy.deepcopy(obj)


def _write_atomic(checkpoint: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        if path.is_dir():  # a folder checkpoint of a multi-process run in the same directory
            from lit_deepseek.parallel.checkpoint import remove_path

            remove_path(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def expected_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """`optimizer.state_dict()` as a checkpoint will hold it: the current one, or, for Adam and AdamW
    before their first step, one with each trainable parameter's moments (shaped like the parameter)
    under its state index, in the order the optimizer creates them."""
    state = optimizer.state_dict()
    if state["state"] or not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return state
    for group, saved in zip(optimizer.param_groups, state["param_groups"], strict=True):
        names = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if group.get("amsgrad") else ())
        for p, index in zip(group["params"], saved["params"], strict=True):
            if p.requires_grad:
                state["state"][index] = {name: p.detach() for name in names}
    return state


class LinkedCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose `last` (and, for the best-checkpoint callback, `best`) is a hard link to the
    step checkpoint of the same step rather than another full copy."""

    @staticmethod
    def _link_checkpoint(trainer: L.Trainer, filepath: str, linkpath: str) -> None:
        if trainer.is_global_zero and os.path.abspath(filepath) != os.path.abspath(linkpath):
            io = getattr(trainer.strategy, "checkpoint_io", None)
            if isinstance(io, AtomicCheckpointIO):
                io.link(filepath, linkpath)
            else:
                hardlink(filepath, linkpath)
        trainer.strategy.barrier()

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        if self.monitor != "step":  # the best checkpoint: link to this step's periodic checkpoint if there is one
            for cb in trainer.checkpoint_callbacks:
                if (cb is not self and isinstance(cb, LinkedCheckpoint) and cb.monitor == "step"
                        and cb._last_global_step_saved == trainer.global_step and cb._last_checkpoint_saved):
                    self._link_checkpoint(trainer, cb._last_checkpoint_saved, filepath)
                    self._last_global_step_saved = trainer.global_step
                    self._last_checkpoint_saved = filepath
                    return
        super()._save_checkpoint(trainer, filepath)
        if self.monitor == "step" and self.save_top_k > 0 and trainer.is_global_zero and self.dirpath:
            # keep_last counts every periodic checkpoint in the folder, also those of an earlier process
            older = [p for p in step_checkpoints(self.dirpath) if os.path.abspath(p) != os.path.abspath(filepath)]
            for p in older[self.save_top_k - 1:]:
                trainer.strategy.remove_checkpoint(str(p))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._reserve(trainer)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if not getattr(self, "_reserved_after_step", False) and trainer.global_step > 0:
            self._reserved_after_step = True
            self._reserve(trainer)  # the optimizer states exist now: buffers for whatever was not foreseen

    def _reserve(self, trainer: L.Trainer) -> None:
        """Host buffers for the periodic saves, allocated while training starts (see `AtomicCheckpointIO.reserve`)."""
        io = getattr(trainer.strategy, "checkpoint_io", None)
        if self.monitor == "step" and self._every_n_train_steps > 0 and trainer.is_global_zero \
                and isinstance(io, AtomicCheckpointIO):
            io.reserve({"state_dict": trainer.strategy.lightning_module_state_dict(),
                        "optimizer_states": [expected_optimizer_state(o) for o in trainer.optimizers]})

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """A run that ends between periodic saves (max_steps not a multiple of every_n_steps) still
        leaves its final state: the periodic checkpoint of the last step, and `last`."""
        if self.monitor == "step" and self._every_n_train_steps > 0:
            self.save_now(trainer)
        super().on_train_end(trainer, pl_module)

    def save_now(self, trainer: L.Trainer) -> Optional[str]:
        """Save this step's periodic checkpoint (and last) now, unless this step is saved already."""
        if trainer.global_step == 0:
            return None
        if self._last_global_step_saved != trainer.global_step:
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)
        return self._last_checkpoint_saved


def flush_mlflow(trainer: L.Trainer) -> None:
    """Wait until the MLflow loggers' asynchronously logged metrics are written."""
    from lightning.pytorch.loggers import MLFlowLogger

    if any(isinstance(lg, MLFlowLogger) for lg in trainer.loggers):
        import mlflow

        mlflow.flush_async_logging()


class StopOnSigterm(L.Callback):
    """SIGTERM (what a scheduler sends before it kills a job): finish the current step, save a checkpoint,
    and leave with exit status 143 (the CLI prints where the checkpoint is)."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if getattr(trainer, "received_sigterm", False) and trainer.world_size == 1:
            # this step is done (the checkpoint will hold it): write its metrics first, as the training
            # loop would right after these hooks, and drain MLflow's asynchronous queue
            trainer._logger_connector.on_batch_end()
            trainer._logger_connector.update_train_step_metrics()
            flush_mlflow(trainer)
            raise SIGTERMException()  # more than one process: Lightning agrees on it at the next step

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        periodic = next((cb for cb in trainer.checkpoint_callbacks
                         if isinstance(cb, LinkedCheckpoint) and cb.monitor == "step"), None)
        path = periodic.save_now(trainer) if periodic is not None else None
        io = getattr(trainer.strategy, "checkpoint_io", None)
        if isinstance(io, AtomicCheckpointIO):
            io.wait()
        exception.checkpoint = path  # type: ignore[attr-defined]


def checkpoint_dir(cfg: DeepSeekConfig) -> Path:
    d = Path(cfg.checkpoint.dir)
    return d if d.is_absolute() else Path(cfg.logging.run_dir) / d


def checkpoint_callbacks(ckpt: CheckpointConfig, dirpath: Path) -> list[ModelCheckpoint]:
    """Periodic (keep-last-N), last and best-by-validation-loss checkpoints; last and best are hard links."""
    callbacks = [LinkedCheckpoint(
        dirpath=dirpath, filename="step{step:07d}", auto_insert_metric_name=False,
        every_n_train_steps=ckpt.every_n_steps, save_top_k=ckpt.keep_last, monitor="step", mode="max",
        save_last="link" if ckpt.save_last else False, save_on_train_epoch_end=False, enable_version_counter=False,
    )]
    if ckpt.save_best:
        callbacks.append(LinkedCheckpoint(
            dirpath=dirpath, filename="best", auto_insert_metric_name=False, monitor=ckpt.monitor, mode="min",
            save_top_k=1, save_last=False, enable_version_counter=False,
        ))
    return callbacks


def tracking_uri(cfg: LoggingConfig) -> str:
    if cfg.tracking_uri:
        return cfg.tracking_uri
    return f"sqlite:///{(Path(cfg.run_dir) / 'mlflow.db').resolve()}"


def check_tracking_uri(cfg: LoggingConfig, timeout: float = 5.0) -> None:
    """ConfigError within `timeout` seconds when an http(s) tracking server cannot be reached."""
    import socket
    from urllib.parse import urlparse

    if not cfg.tracking_uri:
        return
    url = urlparse(cfg.tracking_uri)
    if url.scheme not in ("http", "https"):
        return
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "localhost", port), timeout=timeout):
            pass
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise ConfigError(f"logging.tracking_uri: cannot reach {cfg.tracking_uri} ({reason}, {timeout:g} s timeout); "
                          f"start the server, fix the URI, or leave it null to track under logging.run_dir") from None


def _intact_sqlite(db: Path) -> Optional[str]:
    """Why a SQLite file is unusable (None when it passes SQLite's quick check)."""
    import sqlite3

    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            row = con.execute("PRAGMA quick_check").fetchone()
        finally:
            con.close()
    except sqlite3.Error as exc:
        return str(exc)
    return None if row and row[0] == "ok" else str(row[0] if row else "quick_check failed")


def build_mlflow_logger(cfg: LoggingConfig, resume: bool) -> Any:
    """MLFlowLogger for the logging section; a resumed run continues the MLflow run it started.

    A damaged `mlflow.db` in the run directory is moved aside (one line) and tracking starts a new store."""
    import time

    from lightning.pytorch.loggers import MLFlowLogger

    from lit_deepseek.training.run_guard import note

    run_dir = Path(cfg.run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"logging.run_dir: cannot write to {run_dir}: {exc.strerror or exc}") from None
    run_id = None
    id_file = run_dir / RUN_ID_FILE
    if resume and id_file.is_file():
        run_id = id_file.read_text().strip() or None
    db = run_dir / "mlflow.db"
    if not cfg.tracking_uri and db.is_file() and db.stat().st_size:
        reason = _intact_sqlite(db)
        if reason is not None:
            aside = db.with_name(f"mlflow.db.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
            os.replace(db, aside)
            note(f"logging: {db} cannot be read ({reason}); moved to {aside.name}, tracking continues in a new store")
            run_id = None
    return MLFlowLogger(experiment_name=cfg.experiment_name, run_name=cfg.run_name, tracking_uri=tracking_uri(cfg),
                        run_id=run_id, synchronous=not cfg.async_logging, save_dir=None,
                        artifact_location=artifact_location(cfg))


def artifact_location(cfg: LoggingConfig) -> Optional[str]:
    """Artifacts of a new experiment in the default store go to `<run_dir>/mlartifacts` (not ./mlruns of the
    working directory); a user-given tracking URI keeps its own artifact store."""
    if cfg.tracking_uri:
        return None
    return (Path(cfg.run_dir) / "mlartifacts").resolve().as_uri()


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


class TrackConfig(L.Callback):
    """Logs the resolved config as MLflow params and as a YAML artifact, and remembers the run id
    so that a resumed run continues the same MLflow run."""

    def __init__(self, cfg: DeepSeekConfig, trainer_config: Optional[dict] = None) -> None:
        self.cfg = cfg
        self.trainer_config = trainer_config or {}

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_rank != 0:
            return
        resolved = self.cfg.to_dict()
        resolved["trainer"] = {k: v for k, v in self.trainer_config.items() if _plain(v)}
        for logger in trainer.loggers:
            run_id = getattr(logger, "run_id", None)
            if run_id is None:
                continue
            (Path(self.cfg.logging.run_dir) / RUN_ID_FILE).write_text(run_id)
            params = {k: str("null" if v is None else v) for k, v in flatten(resolved).items()}
            # MLflow params are write-once: a resumed run logs only new keys and records what changed
            logged = logger.experiment.get_run(run_id).data.params
            changed = {k: v for k, v in params.items() if k in logged and logged[k] != v}
            new = {k: v for k, v in params.items() if k not in logged}
            if new:
                logger.log_hyperparams(new)
            if changed:
                logger.experiment.set_tag(run_id, "resumed_with_changes",
                                          ", ".join(f"{k}={v}" for k, v in sorted(changed.items()))[:5000])
            logger.experiment.log_text(run_id, yaml.safe_dump(resolved, sort_keys=False), "config/config.yaml")


def _plain(v: Any) -> bool:
    return v is None or isinstance(v, (str, int, float, bool, list, tuple))


class ExpertLoadHeatmap(L.Callback):
    """Saves a layers x experts expert-load heatmap as an MLflow image artifact every N steps."""

    def __init__(self, every_n_steps: int, out_dir: Optional[str] = None) -> None:
        self.every_n_steps = every_n_steps
        self.out_dir = out_dir

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        from lit_deepseek.training.module import DeepSeekLightningModule

        load = pl_module.last_expert_load if isinstance(pl_module, DeepSeekLightningModule) else None
        if (self.every_n_steps <= 0 or trainer.global_rank != 0 or load is None or step == 0
                or step % self.every_n_steps):
            return
        load = load.float().cpu()
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        share = load / load.sum(dim=1, keepdim=True).clamp(min=1)
        n_layers, n_experts = load.shape
        fig, ax = plt.subplots(figsize=(min(16, max(5, n_experts * 0.25 + 2.5)), min(12, max(3.5, n_layers * 0.3 + 2))))
        im = ax.imshow(share.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_xticks(range(0, n_experts, max(1, n_experts // 16)))
        ax.set_yticks(range(0, n_layers, max(1, n_layers // 16)))
        ax.set_xlabel("routed expert")
        ax.set_ylabel("MoE layer (main blocks, then MTP)")
        ax.set_title(f"expert load share, step {step}")
        fig.colorbar(im, ax=ax, label="share of routed tokens")
        fig.tight_layout()
        name = f"expert_load_step{step:07d}.png"
        if self.out_dir:
            Path(self.out_dir).mkdir(parents=True, exist_ok=True)
            fig.savefig(Path(self.out_dir) / name, dpi=80)
        for logger in trainer.loggers:
            run_id = getattr(logger, "run_id", None)
            if run_id is not None:
                logger.experiment.log_figure(run_id, fig, f"expert_load/{name}")
        plt.close(fig)
