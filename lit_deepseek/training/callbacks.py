"""Callbacks and logger setup: checkpoints, MLflow tracking, the expert-load heatmap."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
import yaml
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lit_deepseek.config import CheckpointConfig, DeepSeekConfig, LoggingConfig

RUN_ID_FILE = "mlflow_run_id"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file in the same folder, fsyncs it, then renames it
    over the target, so a crash while saving never leaves a damaged checkpoint behind."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        path = Path(path)
        fs = get_filesystem(str(path))
        if type(fs).__name__ != "LocalFileSystem":
            return super().save_checkpoint(checkpoint, path, storage_options)
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


def checkpoint_dir(cfg: DeepSeekConfig) -> Path:
    d = Path(cfg.checkpoint.dir)
    return d if d.is_absolute() else Path(cfg.logging.run_dir) / d


def checkpoint_callbacks(ckpt: CheckpointConfig, dirpath: Path) -> list[ModelCheckpoint]:
    """Periodic (keep-last-N), last and best-by-validation-loss checkpoints."""
    callbacks = [ModelCheckpoint(
        dirpath=dirpath, filename="step{step:07d}", auto_insert_metric_name=False,
        every_n_train_steps=ckpt.every_n_steps, save_top_k=ckpt.keep_last, monitor="step", mode="max",
        save_last=ckpt.save_last, save_on_train_epoch_end=False,
    )]
    if ckpt.save_best:
        callbacks.append(ModelCheckpoint(
            dirpath=dirpath, filename="best", auto_insert_metric_name=False, monitor=ckpt.monitor, mode="min",
            save_top_k=1, save_last=False, enable_version_counter=False,
        ))
    return callbacks


def tracking_uri(cfg: LoggingConfig) -> str:
    if cfg.tracking_uri:
        return cfg.tracking_uri
    return f"sqlite:///{(Path(cfg.run_dir) / 'mlflow.db').resolve()}"


def build_mlflow_logger(cfg: LoggingConfig, resume: bool) -> Any:
    """MLFlowLogger for the logging section; a resumed run continues the MLflow run it started."""
    from lightning.pytorch.loggers import MLFlowLogger

    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    run_id = None
    id_file = run_dir / RUN_ID_FILE
    if resume and id_file.is_file():
        run_id = id_file.read_text().strip() or None
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
