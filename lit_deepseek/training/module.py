"""The LightningModule: loss, optimiser, schedule, aux-loss-free balancing and training metrics.

One `training_step` is one optimizer step: the batch holds every micro-batch that this
data-parallel rank contributes to the step, and the plan (`LocalPlan`, or the distributed plan that
the parallel strategy provides) runs forward and backward over them. Manual optimisation keeps the
step identical under every parallel layout, pipeline schedules included.
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
from lit_deepseek.training.loss import LossParts, model_loss
from lit_deepseek.training.optim import build_optimizer, build_scheduler
from lit_deepseek.training.step import LocalPlan


class NonFiniteLossError(RuntimeError):
    """Raised after too many consecutive non-finite losses."""


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
        self.nonfinite_in_a_row = 0
        self.nonfinite_total = 0
        self.last_expert_load: Optional[Tensor] = None
        self._throughput: Optional[Throughput] = None
        self._t0: Optional[float] = None
        self._tokens_seen = 0
        self._flops_per_token = DeepSeekConfig(model=model, training=training).flops_per_token()
        # plain dicts, so checkpoints load with torch.load(weights_only=True)
        self.save_hyperparameters({"model": dataclasses.asdict(model), "training": dataclasses.asdict(training),
                                   "parallel": dataclasses.asdict(self.parallel_config)}, logger=False)

    # ------------------------------------------------------------------ setup
    @property
    def plan(self) -> Any:
        strategy = self._trainer.strategy if self._trainer is not None else None
        return getattr(strategy, "plan", None) or _LOCAL_PLAN

    def configure_model(self) -> None:
        if self.model is not None:
            return
        from lit_deepseek.model import DeepSeekV3

        _warn_decode_only_flags(self.model_config)
        # Lightning calls this hook under the strategy's device context: build on the meta device,
        # then allocate once where the weights will live and draw them there (no host copy).
        target = torch.get_default_device()
        if target.type == "meta":
            target = self.device if self.device.type != "meta" else torch.device("cpu")
        with torch.device("meta"):
            model = DeepSeekV3(self.model_config)
        model.to_empty(device=target)
        model.init_weights(seed=self.training_config.seed)
        self.model = self.plan.parallelize(model)
        if self.training_config.activation_checkpointing != "none":
            from lit_deepseek.training.checkpointing import apply_activation_checkpointing

            apply_activation_checkpointing(self.model, self.training_config.activation_checkpointing)
        parts = self.plan.model_parts(self.model)
        if self.training_config.use_fp8:
            from lit_deepseek.kernels.fp8 import convert_to_fp8

            for part in parts:
                convert_to_fp8(part)
        if self.training_config.compile:
            from lit_deepseek.kernels.compile import compile_blocks

            for part in parts:
                compile_blocks(part)

    def configure_optimizers(self) -> Any:
        parts = self.plan.model_parts(self.model)
        optimizer = build_optimizer(parts, self.training_config, self.plan)
        scheduler = build_scheduler(optimizer, self.training_config)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ loss
    def loss_fn(self, model: nn.Module, h: Tensor, mtp_hiddens: list, labels: Tensor) -> LossParts:
        head = model.head if hasattr(model, "head") else model.module.head
        return model_loss(head.weight, h, mtp_hiddens, labels, self.model_config.mtp_loss_weight,
                          self.training_config.loss_chunk_size)

    def forward(self, input_ids: Tensor, doc_ids: Optional[Tensor] = None) -> Tensor:
        return self.model(input_ids, doc_ids=doc_ids)

    # ------------------------------------------------------------------ training
    def on_train_start(self) -> None:
        world = self.trainer.world_size if self._trainer is not None else 1
        peak = self._peak_flops()
        self._throughput = Throughput(available_flops=peak, world_size=world, window_size=3)
        self._t0 = time.perf_counter()

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        t = self.training_config
        optimizer = self.optimizers()
        scheduler = self.lr_schedulers()
        parts = self.plan.forward_backward(self.model, batch, t.micro_batch_size, self.loss_fn, self.manual_backward)
        if not torch.isfinite(parts.total):
            optimizer.zero_grad(set_to_none=True)
            self._discard_expert_stats()
            skip = getattr(getattr(self._trainer, "datamodule", None), "on_step_skipped", None)
            if skip is not None:
                skip()  # the data stream still moves past this batch
            self.nonfinite_in_a_row += 1
            self.nonfinite_total += 1
            self.log("train/nonfinite_steps", float(self.nonfinite_total), on_step=True, rank_zero_only=True)
            if self.nonfinite_in_a_row >= t.max_nonfinite_steps:
                self._stop_on_nonfinite()
            return parts.total
        self.nonfinite_in_a_row = 0
        params = [p for part in self.plan.model_parts(self.model) for p in part.parameters()]
        grad_norm = self.plan.clip_grad_norm(params, t.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        self._update_experts()
        self._log_step(parts, grad_norm, batch)
        return parts.total

    def _stop_on_nonfinite(self) -> None:
        t = self.training_config
        msg = (f"training: {self.nonfinite_in_a_row} consecutive non-finite losses "
               f"(training.max_nonfinite_steps = {t.max_nonfinite_steps}); stopping")
        path = None
        if self._trainer is not None and self.trainer.checkpoint_callback is not None:
            dirpath = getattr(self.trainer.checkpoint_callback, "dirpath", None)
            if dirpath:
                path = f"{dirpath}/nonfinite-step{self.global_step}.ckpt"
                self.trainer.save_checkpoint(path)
        raise NonFiniteLossError(msg + (f"; checkpoint saved to {path}" if path else ""))

    def _moe_layers(self) -> list:
        layers = []
        for part in self.plan.model_parts(self.model):
            get = getattr(part, "moe_layers", None)
            layers.extend(get() if get else [])
        return layers

    def _discard_expert_stats(self) -> None:
        for moe in self._moe_layers():
            moe.reset_stats()

    @torch.no_grad()
    def _update_experts(self) -> None:
        moes = self._moe_layers()
        if not moes:
            return
        loads = self.plan.all_reduce_expert_load(torch.stack([m.expert_load.float() for m in moes]))
        if self.model_config.moe.use_aux_loss_free:
            for moe, load in zip(moes, loads, strict=True):
                moe.update_bias(load, self.model_config.moe.bias_update_speed)
        self.last_expert_load = loads.detach().cpu()
        dropped = sum(float(getattr(m, "dropped_tokens", 0.0)) for m in moes)
        routed = sum(float(getattr(m, "routed_tokens", 0.0)) for m in moes)
        self._drop_rate = dropped / routed if routed else 0.0
        self._aux = float(sum(float(m.last_aux_loss) for m in moes if m.last_aux_loss is not None))
        for moe in moes:
            moe.reset_stats()

    def _log_step(self, parts: LossParts, grad_norm: Tensor, batch: dict) -> None:
        t = self.training_config
        step_tokens = t.global_batch_size * batch["input_ids"].shape[1]
        self._tokens_seen += step_tokens
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
        if self.last_expert_load is not None:
            load = self.last_expert_load
            imbalance = load.max(dim=1).values / load.mean(dim=1).clamp(min=1e-9)
            metrics["moe/max_imbalance"] = float(imbalance.max())
            metrics["moe/mean_imbalance"] = float(imbalance.mean())
            for i, value in enumerate(imbalance.tolist()):
                metrics[f"moe/imbalance_layer{i}"] = value
            metrics["moe/drop_rate"] = self._drop_rate
            metrics["train/balance_loss"] = self._aux
            biases = torch.stack([m.expert_bias.detach().float().cpu() for m in self._moe_layers()])
            metrics["moe/bias_abs_mean"] = float(biases.abs().mean())
            metrics["moe/bias_max"] = float(biases.max())
            metrics["moe/bias_min"] = float(biases.min())
        if self._throughput is not None and self._t0 is not None:
            elapsed = time.perf_counter() - self._t0
            step = self.global_step
            world = max(1, self.trainer.world_size)
            self._throughput.update(time=elapsed, batches=step, samples=step * t.global_batch_size // world,
                                    lengths=self._tokens_seen // world,
                                    flops=step_tokens * self._flops_per_token / world)
            tp = self._throughput.compute()
            tokens_per_s = tp.get("items_per_sec", tp.get("device/items_per_sec"))  # global key only if world > 1
            if tokens_per_s is not None:
                metrics["train/tokens_per_s"] = tokens_per_s
            if "device/mfu" in tp:
                metrics["train/mfu"] = tp["device/mfu"]
        if self.device.type == "cuda":
            metrics["train/max_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        if t.compile:
            from torch._dynamo.utils import counters

            # constant after the first steps unless something recompiles
            metrics["train/compiled_graphs"] = float(counters["stats"]["unique_graphs"])
        skipped = getattr(getattr(self._trainer, "datamodule", None), "skipped_shards", None)
        if skipped is not None:
            metrics["data/skipped_shards"] = float(skipped)
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
        checkpoint["nonfinite_total"] = self.nonfinite_total
        checkpoint["tokens_seen"] = self._tokens_seen

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.nonfinite_total = checkpoint.get("nonfinite_total", 0)
        self._tokens_seen = checkpoint.get("tokens_seen", 0)
        if self.model is None:
            self.configure_model()


_LOCAL_PLAN = LocalPlan()


def _warn_decode_only_flags(cfg: ModelConfig) -> None:
    """FlashMLA and the FP8 latent cache serve decoding; say once what training does instead."""
    from lightning.pytorch.utilities import rank_zero_warn

    if cfg.mla.use_flash_mla:
        import importlib.util

        if importlib.util.find_spec("flash_mla") is None:
            rank_zero_warn("model.mla.use_flash_mla: flash_mla is not installed; decoding uses the PyTorch "
                           "latent-attention path (training always uses scaled_dot_product_attention)")
    if cfg.mla.use_fp8_kv and not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)):
        rank_zero_warn("model.mla.use_fp8_kv: no FP8-capable GPU; the decoding latent cache stays in the model dtype")
