"""The LightningModule: the shipped training step under Lightning, plus training metrics.

One `training_step` is one optimizer step, `lit_deepseek.training.step.train_step`: the batch holds
every micro-batch that this data-parallel rank contributes to the step, and the plan (`LocalPlan`,
or the `DistributedPlan` of the parallel strategy) runs forward and backward over them. Manual
optimisation keeps the step identical under every parallel layout, pipeline schedules included.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Optional

import lightning as L
import torch
from lightning.fabric.utilities.throughput import Throughput
from torch import Tensor, nn
from torchmetrics.aggregation import MeanMetric

from lit_deepseek.config import DeepSeekConfig, ModelConfig, ParallelConfig, TrainingConfig
from lit_deepseek.data.datamodule import DeepSeekDataModule
from lit_deepseek.training.loss import LossParts
from lit_deepseek.training.optim import build_scheduler
from lit_deepseek.training.step import (
    ExpertBalance,
    LocalPlan,
    Plan,
    StepResult,
    build_optimizer,
    make_loss_fn,
    train_step,
)


class TrainingStopped(RuntimeError):
    """The run stopped on purpose; the message is one line for the user (exit status 1)."""


class NonFiniteLossError(TrainingStopped):
    """Raised after too many consecutive non-finite losses or gradient norms."""


class NonFiniteCheckpointError(TrainingStopped):
    """Raised instead of writing a checkpoint whose weights or optimizer state are not finite."""


class DeepSeekLightningModule(L.LightningModule):
    """Trains `lit_deepseek.model.DeepSeekV3` with next-token, MTP and balance losses."""

    def __init__(self, model: ModelConfig, training: TrainingConfig,
                 parallel: Optional[ParallelConfig] = None, peak_tflops: Optional[float] = None) -> None:
        super().__init__()
        self.model_config = model
        self.training_config = training
        self.parallel_config = parallel or ParallelConfig()
        self.peak_tflops = peak_tflops
        self.automatic_optimization = False
        # every rank already holds the data-parallel mean of each batch, so no further sync is needed
        self.val_loss = MeanMetric(sync_on_compute=False)
        self.test_loss = MeanMetric(sync_on_compute=False)
        self.model: Optional[nn.Module] = None
        self.run_config = DeepSeekConfig(model=model, training=training, parallel=self.parallel_config)
        self._loss = make_loss_fn(model, training)
        self._local_plan = LocalPlan(cuda_graphs=training.cuda_graphs, weight_copy=training.bf16_weight_copy)
        self.expert_balance: Optional[ExpertBalance] = None
        self.nonfinite_in_a_row = 0
        self.nonfinite_total = 0
        self._throughput: Optional[Throughput] = None
        self._t0: Optional[float] = None
        self._tokens_seen = 0
        self._flops_per_token = self.run_config.flops_per_token()
        # plain dicts, so checkpoints load with torch.load(weights_only=True)
        self.save_hyperparameters({"model": dataclasses.asdict(model), "training": dataclasses.asdict(training),
                                   "parallel": dataclasses.asdict(self.parallel_config)}, logger=False)

    # ------------------------------------------------------------------ setup
    @property
    def plan(self) -> Plan:
        """The parallel strategy's plan, or the single-process one."""
        from lit_deepseek.parallel.strategy import DeepSeekStrategy

        strategy = self._trainer.strategy if self._trainer is not None else None
        if isinstance(strategy, DeepSeekStrategy) and strategy.plan is not None:
            return strategy.plan
        return self._local_plan

    @property
    def datamodule(self) -> Optional[DeepSeekDataModule]:
        datamodule = self._trainer.datamodule if self._trainer is not None else None
        return datamodule if isinstance(datamodule, DeepSeekDataModule) else None

    def configure_model(self) -> None:
        if self.model is not None:
            return
        from lit_deepseek.model import DeepSeekV3

        # Lightning calls this hook under the strategy's device context: build on the meta device,
        # then allocate once where the weights will live and draw them there (no host copy).
        target = torch.get_default_device()
        if target.type == "meta":
            target = self.device if self.device.type != "meta" else torch.device("cpu")
        with torch.device("meta"):
            model = DeepSeekV3(self.model_config)
        model.to_empty(device=target)
        model.init_weights(seed=self.training_config.seed)
        self.model = self.plan.parallelize(model, self.run_config)

    def configure_optimizers(self) -> Any:
        assert self.model is not None
        optimizer, self.expert_balance = build_optimizer(self.plan, self.model, self.run_config)
        scheduler = build_scheduler(optimizer, self.training_config)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def loss_fn(self, part: nn.Module, h: Tensor, mtp_hiddens: list, labels: Tensor) -> LossParts:
        """Next-token + MTP loss of one micro-batch (`make_loss_fn`); override to change it."""
        return self._loss(part, h, mtp_hiddens, labels)

    def forward(self, input_ids: Tensor, doc_ids: Optional[Tensor] = None) -> Tensor:
        return self.model(input_ids, doc_ids=doc_ids)

    # ------------------------------------------------------------------ training
    def on_train_start(self) -> None:
        world = self.trainer.world_size if self._trainer is not None else 1
        peak = self._peak_flops()
        self._throughput = Throughput(available_flops=peak, world_size=world, window_size=3)
        self._t0 = time.perf_counter()
        if self.training_config.cuda_graphs and self.device.type == "cuda" and self.plan is not self._local_plan:
            import warnings

            warnings.warn("training.cuda_graphs: the parallel strategy's steps run without CUDA graphs (they cover "
                          "single-process steps)", stacklevel=1)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        t = self.training_config
        assert self.model is not None
        result = train_step(self.plan, self.model, batch, self.optimizers(), t, self.loss_fn,
                            self.manual_backward, self.lr_schedulers())
        if result.skipped:
            if self.datamodule is not None:
                self.datamodule.on_step_skipped()  # the data stream still moves past this batch
            self.nonfinite_in_a_row += 1
            self.nonfinite_total += 1
            self.log("train/nonfinite_steps", float(self.nonfinite_total), on_step=True, rank_zero_only=True)
            if self.nonfinite_in_a_row >= t.max_nonfinite_steps:
                self._stop_on_nonfinite()
            return result.loss.total
        self.nonfinite_in_a_row = 0
        self._log_step(result, batch)
        return result.loss.total

    def _logs_this_step(self) -> bool:
        """Whether Lightning will write this step's metrics (so reading them off the device is worth
        a host sync; other steps leave the device queue running ahead)."""
        if self._trainer is None:
            return True
        return self.global_step % max(1, self.trainer.log_every_n_steps) == 0 or self.trainer.should_stop \
            or self.global_step >= self.trainer.max_steps > 0

    def _stop_on_nonfinite(self) -> None:
        t = self.training_config
        msg = (f"training: {self.nonfinite_in_a_row} consecutive non-finite losses or gradient norms "
               f"(training.max_nonfinite_steps = {t.max_nonfinite_steps}); stopping")
        path = None
        if self._trainer is not None and self.trainer.checkpoint_callback is not None:
            dirpath = getattr(self.trainer.checkpoint_callback, "dirpath", None)
            if dirpath:
                path = f"{dirpath}/nonfinite-step{self.global_step}.ckpt"
                self.trainer.save_checkpoint(path)
        raise NonFiniteLossError(msg + (f"; checkpoint saved to {path}" if path else ""))

    @property
    def last_expert_load(self) -> Optional[Tensor]:
        """Per-layer, per-expert token counts of the last optimizer step (all ranks summed)."""
        return self.expert_balance.last_load if self.expert_balance is not None else None

    def _log_step(self, result: StepResult, batch: dict) -> None:
        t = self.training_config
        parts, grad_norm = result.loss, result.grad_norm
        step_tokens = t.global_batch_size * batch["input_ids"].shape[1]
        self._tokens_seen += step_tokens
        if self._throughput is not None and self._t0 is not None:
            world = max(1, self.trainer.world_size)
            step = self.global_step
            self._throughput.update(time=time.perf_counter() - self._t0, batches=step,
                                    samples=step * t.global_batch_size // world,
                                    lengths=self._tokens_seen // world, flops=step_tokens * self._flops_per_token / world)
        if not self._logs_this_step():
            return
        metrics: dict[str, float] = {
            "train/loss": float(parts.main),
            "train/total_loss": float(parts.total),
            "train/perplexity": math.exp(min(float(parts.main), 50.0)),
            "train/grad_norm": float(grad_norm),
            "train/lr": float(self.optimizers().param_groups[0]["lr"]),
            "train/tokens": float(self._tokens_seen),
            "train/nonfinite_steps": float(self.nonfinite_total),
        }
        if parts.mtp is not None:
            metrics["train/mtp_loss"] = float(parts.mtp)
        balance = self.expert_balance
        if balance is not None and balance.last_load is not None:
            load = balance.last_load.cpu()
            imbalance = load.max(dim=1).values / load.mean(dim=1).clamp(min=1e-9)
            metrics["moe/max_imbalance"] = float(imbalance.max())
            metrics["moe/mean_imbalance"] = float(imbalance.mean())
            for i, value in enumerate(imbalance.tolist()):
                metrics[f"moe/imbalance_layer{i}"] = value
            metrics["moe/drop_rate"] = balance.drop_rate
            metrics["train/balance_loss"] = balance.balance_loss
            biases = balance.biases()
            metrics["moe/bias_abs_mean"] = float(biases.abs().mean())
            metrics["moe/bias_max"] = float(biases.max())
            metrics["moe/bias_min"] = float(biases.min())
        if self._throughput is not None and self._t0 is not None:
            tp = self._throughput.compute()
            tokens_per_s = tp.get("items_per_sec", tp.get("device/items_per_sec"))  # global key only if world > 1
            if tokens_per_s is not None:
                metrics["train/tokens_per_s"] = tokens_per_s
            if "device/mfu" in tp:
                metrics["train/mfu"] = tp["device/mfu"]
        if self.device.type == "cuda":
            metrics["train/max_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            graphs = self._local_plan._graphs if self.plan is self._local_plan else None
            # micro-batch graphs in use: 0 during the eager warm-up steps or when they are off
            metrics["train/cuda_graphs"] = float(graphs.captured if graphs is not None and graphs.off is None else 0)
        if t.use_fp8:
            from lit_deepseek.kernels.fp8 import fp8_kernel_checks, fp8_weight_cache_info

            # the weight reuse across micro-batches: bytes of the kept blocks, and the later micro-batches'
            # lookups that found them (counted where Python runs: eager steps and graph captures, not replays)
            kept = fp8_weight_cache_info()
            metrics["fp8/kept_weight_gib"] = kept["bytes"] / 2**30
            metrics["fp8/weight_reuse_hits"] = float(kept["reused"])
            # signatures at which a Triton FP8 kernel gave other bits than its reference (run by the reference since)
            checks = fp8_kernel_checks()
            metrics["fp8/kernel_checks"] = float(checks["checked"])
            metrics["fp8/kernel_mismatches"] = float(checks["mismatched"])
        if t.compile:
            from torch._dynamo.utils import counters

            # constant after the first steps unless something recompiles
            metrics["train/compiled_graphs"] = float(counters["stats"]["unique_graphs"])
        if self.datamodule is not None:
            metrics["data/skipped_shards"] = float(self.datamodule.skipped_shards)
        self.log_dict(metrics, on_step=True, on_epoch=False, prog_bar=False, rank_zero_only=True)
        self.log("loss", float(parts.main), prog_bar=True, on_step=True, logger=False, rank_zero_only=True)

    def _peak_flops(self) -> Optional[float]:
        if self.peak_tflops:
            return self.peak_tflops * 1e12
        if self.device.type == "cuda":
            name = torch.cuda.get_device_name(self.device)
            if "H100" in name or "H200" in name:
                return 989e12
            from lightning.fabric.utilities.throughput import get_available_flops

            return get_available_flops(self.device, torch.bfloat16)
        return None

    # ------------------------------------------------------------------ validation
    def validation_step(self, batch: dict, batch_idx: int) -> Tensor:
        return self._eval_step(batch, self.val_loss)

    def test_step(self, batch: dict, batch_idx: int) -> Tensor:
        return self._eval_step(batch, self.test_loss)

    def _eval_step(self, batch: dict, metric: MeanMetric) -> Tensor:
        parts = self.plan.evaluate(self.model, batch, self.loss_fn)
        loss = self.plan.reduce_mean(parts.main)  # already the mean over data-parallel ranks
        metric.update(loss.detach().float())
        return loss

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val", self.val_loss)

    def on_test_epoch_end(self) -> None:
        self._log_eval("test", self.test_loss)

    def _log_eval(self, prefix: str, metric: MeanMetric) -> None:
        """Mean loss over the evaluation batches and the perplexity of that mean."""
        if not metric.update_called:
            return
        mean = metric.compute()
        metric.reset()
        self.log(f"{prefix}/loss", mean, prog_bar=True, sync_dist=False)
        self.log(f"{prefix}/perplexity", torch.exp(mean.clamp(max=50)), sync_dist=False)

    # ------------------------------------------------------------------ checkpoint state
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        bad = self.first_nonfinite_state()
        if bad is not None:
            last = _newest_checkpoint(self._trainer)
            raise NonFiniteCheckpointError(
                f"training: {bad} is not finite at step {self.global_step}; the run diverged and no checkpoint is "
                f"written (the last finite one is {last or 'none'}); resume from it with a lower "
                f"training.learning_rate")
        checkpoint["nonfinite_total"] = self.nonfinite_total
        checkpoint["tokens_seen"] = self._tokens_seen

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.nonfinite_total = checkpoint.get("nonfinite_total", 0)
        self._tokens_seen = checkpoint.get("tokens_seen", 0)
        if self.model is None:
            self.configure_model()


    @torch.no_grad()
    def first_nonfinite_state(self) -> Optional[str]:
        """Name of the first parameter or optimizer-state tensor holding NaN/Inf (agreed over all ranks), else None."""
        if self.model is None:
            return None
        named: list[tuple[str, Tensor]] = []
        for part in self.plan.model_parts(self.model):
            named.extend((name, p) for name, p in part.named_parameters())
        names = {id(p): name for name, p in named}
        if self._trainer is not None and self.trainer.optimizers:
            opt = getattr(self.trainer.optimizers[0], "optimizer", self.trainer.optimizers[0])
            for param, state in opt.state.items():
                for key, value in state.items():
                    if isinstance(value, Tensor) and value.is_floating_point():
                        named.append((f"optimizer state {key} of {names.get(id(param), 'a parameter')}", value))
        named = [(n, t.to_local() if hasattr(t, "to_local") else t) for n, t in named]
        named = [(n, t) for n, t in named if t.numel() and t.is_floating_point()]
        tensors = [t for _, t in named]
        flags = torch.stack([torch.isfinite(t).all() for t in tensors]) if tensors else torch.ones(1, dtype=torch.bool)
        ok = flags.all().to(device=self.device, dtype=torch.int32)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
        if bool(ok):
            return None
        bad = [i for i, f in enumerate(flags.tolist()) if not f]
        return named[bad[0]][0] if bad else "a tensor on another rank"


def _newest_checkpoint(trainer: Any) -> Optional[str]:
    from lit_deepseek.training.run_guard import step_checkpoints

    callback = getattr(trainer, "checkpoint_callback", None) if trainer is not None else None
    saved = getattr(callback, "_last_checkpoint_saved", None)
    if saved:
        return saved
    found = step_checkpoints(getattr(callback, "dirpath", None) or "")
    return str(found[0]) if found else None


