"""`DistributedPlan`: the training-step `Plan` for any TP x PP x EP x DP layout.

`lit_deepseek.training.step.train_step` calls the same methods under every layout; this class
decides what they mean on the layout's mesh: which experts this rank keeps, which collectives sum which gradients, how the loss of
the global batch is reported, and how the gradient norm counts every element once.

Exactness: every rank scales its micro-batch losses by 1 / (micro-batches in the global batch)
and all gradient reductions are sums, so the summed gradients equal those of the single-process
run that accumulates the whole global batch.

FP8 weight reuse across micro-batches (`lit_deepseek.kernels.fp8.micro_batch_reuse`, as in
`LocalPlan`) applies to layouts whose weights are plain local tensors: TP 1, no pipeline, ZeRO 0 or 1
(expert parallelism keeps each rank's experts as plain tensors). Under TP the weights are DTensors,
which are never kept; under ZeRO 2/3 FSDP2 frees and refills the unsharded parameters around each
pass, and pipeline schedules interleave the micro-batches' passes, so those layouts quantize every
weight in every micro-batch.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lit_deepseek.config import DeepSeekConfig, TrainingConfig
from lit_deepseek.parallel.layout import Layout, plain_local_weights
from lit_deepseek.parallel.parallelize import ParallelModel, parallelize
from lit_deepseek.parallel.zero import (
    GradientSync,
    OptimizerStateSharding,
    clip_grads_,
    global_grad_norm,
)
from lit_deepseek.training.loss import LossParts
from lit_deepseek.training.step import Backward, LossFn, set_aux_loss_grad_scale, split_micro_batches

MESH_ALIASES = {"dp_ep": ("dp", "ep")}


class DistributedPlan:
    """The `lit_deepseek.training.step.Plan` of a layout on its mesh (after `layout.build_mesh`)."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.coordinate = layout.local_coordinate()
        self.dense_group = layout.submesh("dp_ep").get_group()
        self.expert_group = layout.submesh("dp").get_group()
        self.ep_group = layout.submesh("ep").get_group()
        self.data_parallel_rank = layout.local_data_parallel_rank()
        self.data_parallel_size = layout.data_parallel_size
        self.grad_sync: Optional[GradientSync] = None
        self.optimizer_sharding: Optional[OptimizerStateSharding] = None
        self.handle: Optional[ParallelModel] = None
        self._names: dict[int, str] = {}
        self._duplicates: set[int] = set()
        self._has_mtp = False

    # ------------------------------------------------------------------ layout
    @property
    def pipeline(self) -> Any:
        return self.handle.pipeline if self.handle is not None else None

    @property
    def is_last_stage(self) -> bool:
        """Whether this rank holds the last pipeline stage (pp rank 0 under the V schedules)."""
        if self.pipeline is not None:
            return self.pipeline.has_last_stage
        return self.coordinate["pp"] == self.layout.pp - 1

    @property
    def reports_loss(self) -> bool:
        """One rank per data-parallel replica contributes the loss: tp 0 on the last stage."""
        return self.is_last_stage and self.coordinate["tp"] == 0

    def parallelize(self, model: nn.Module, cfg: DeepSeekConfig) -> nn.Module:
        """`lit_deepseek.parallel.parallelize.parallelize` on this layout, then the gradient sync."""
        self.handle = handle = parallelize(model, self.layout, cfg)
        self._has_mtp = cfg.model.mtp_depth > 0
        named = self.named_parameters()
        self._names = {id(q): n for n, q in named}
        # copies of another stage's weights (the last stage's embedding for MTP) count once
        self._duplicates = {id(part.get_parameter(n)) for part, names in zip(handle.parts, handle.tied_copies, strict=True)
                            for n in names}
        if self.layout.zero_stage < 2:
            self.grad_sync = GradientSync(named, self.dense_group, self.expert_group,
                                          overlap=self.layout.overlap_grad_reduce)
        return handle.model

    def model_parts(self, model: nn.Module) -> list[nn.Module]:
        return self.handle.parts if self.handle is not None else [model]

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) of every part; names are the single-process FQNs."""
        assert self.handle is not None
        return [(n, q) for part in self.handle.parts for n, q in part.named_parameters()]

    # ------------------------------------------------------------------ step
    def forward_backward(self, model: nn.Module, batch: dict, micro_batch_size: int, loss_fn: LossFn,
                         backward: Optional[Backward] = None) -> LossParts:
        """Forward/backward over this rank's micro-batches; returns the global-batch mean loss."""
        backward = backward or (lambda loss: loss.backward())
        loss_fn = self._loss_fn(loss_fn)
        micro_batches = split_micro_batches(batch, micro_batch_size)
        n = len(micro_batches)
        scale = 1.0 / (n * self.data_parallel_size)
        self._gather_sharded_head()
        if self.pipeline is not None:
            local = self.pipeline.forward_backward(micro_batches, loss_fn, scale)
        else:
            from lit_deepseek.kernels.fp8 import fp8_weight_reuse, micro_batch_reuse

            set_aux_loss_grad_scale(self.model_parts(model), scale)
            plain = plain_local_weights(self.layout.tp, self.layout.pp, self.layout.zero_stage)
            losses = []
            for i, mb in enumerate(micro_batches):
                if i == n - 1:
                    self._arm_grad_sync()
                with self._loss_context(), micro_batch_reuse(i, n) if plain else fp8_weight_reuse("off"):
                    h, mtp = model(mb["input_ids"], doc_ids=mb.get("doc_ids"), return_hidden=True)
                    parts = loss_fn(model, h, mtp, mb["labels"])
                    backward(parts.total * scale)
                losses.append(parts.detach())
            local = LossParts.mean(losses)
        if self.grad_sync is not None:
            self.grad_sync.finish()
        return self._global_mean(local)

    def _gather_sharded_head(self) -> None:
        """Under TP with ZeRO 2/3, gather the part holding the head before the step, so that the
        head shows its vocabulary-parallel (TP) layout when the loss context is chosen."""
        if self.layout.tp == 1 or self.layout.zero_stage < 2:
            return
        assert self.handle is not None
        for part in self.handle.parts:
            if part.head is not None:
                part.unshard()  # FSDPModule

    def _arm_grad_sync(self) -> None:
        if self.grad_sync is not None and self.grad_sync.overlap:
            self.grad_sync.arm()

    def _loss_fn(self, loss_fn: LossFn) -> LossFn:
        if self.layout.tp == 1:
            return loss_fn
        from lit_deepseek.parallel.tensor import vocab_parallel_loss

        return vocab_parallel_loss(loss_fn)

    def _loss_context(self) -> Any:
        from lit_deepseek.parallel.tensor import loss_parallel_context

        return loss_parallel_context(None, enabled=self.handle is not None and self.handle.vocab_parallel)

    def _global_mean(self, local: Optional[LossParts]) -> LossParts:
        """Mean over the global batch, identical on every rank (PP: the last stage's value)."""
        values = torch.zeros(3, dtype=torch.float32, device=self.layout.device())
        if local is not None and self.reports_loss:
            values[0], values[1] = local.total.float(), local.main.float()
            if local.mtp is not None:
                values[2] = local.mtp.float()
            values /= self.data_parallel_size
        dist.all_reduce(values)
        return LossParts(values[0], values[1], values[2] if self._has_mtp else None)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batch: dict, loss_fn: LossFn) -> LossParts:
        loss_fn = self._loss_fn(loss_fn)
        self._gather_sharded_head()
        if self.pipeline is not None:
            parts = self.pipeline.evaluate(batch, loss_fn)
            if parts is None:  # not the last stage: reduce_mean takes the last stage's value
                zero = torch.zeros((), device=self.layout.device())
                parts = LossParts(zero, zero, zero if self._has_mtp else None)
            return parts
        with self._loss_context():
            h, mtp = model(batch["input_ids"], doc_ids=batch.get("doc_ids"), return_hidden=True)
            return loss_fn(model, h, mtp, batch["labels"]).detach()

    def reduce_mean(self, value: Tensor) -> Tensor:
        """Mean over data-parallel ranks of a value computed on the last stage, on every rank."""
        out = torch.zeros((), dtype=torch.float32, device=self.layout.device())
        if self.reports_loss:
            out += value.detach().float() / self.data_parallel_size
        dist.all_reduce(out)
        return out

    # ------------------------------------------------------------------ gradients
    def clip_grad_norm(self, parameters: Iterable[Tensor], max_norm: float, optimizer: Any = None) -> Tensor:
        """The clip scales the gradients (DTensor parameters take the foreach AdamW, which has no
        grad_scale hook), so ``optimizer`` is not used."""
        params = list(parameters)
        named = [(self._names.get(id(p), ""), p) for p in params if id(p) not in self._duplicates]
        norm = global_grad_norm(named, self.coordinate, MESH_ALIASES, device=self.layout.device())
        if max_norm > 0:
            clip_grads_(params, max_norm, norm)
        return norm

    def all_reduce_expert_load(self, load: Tensor) -> Tensor:
        """Sum over the EP x DP ranks (TP peers route the same tokens and are not added)."""
        load = load.detach().clone()
        dist.all_reduce(load, group=self.dense_group)
        return load

    # ------------------------------------------------------------------ optimizer
    def build_optimizer(self, parts: list[nn.Module], training: TrainingConfig) -> torch.optim.Optimizer:
        """AdamW; ZeRO-1 shards its state by parameter owner."""
        from lit_deepseek.training.optim import build_adamw

        # under ZeRO-2/3 with EP, experts and dense weights live on different meshes
        foreach = False if self.layout.zero_stage >= 2 and self.layout.ep > 1 else None
        optimizer = build_adamw(parts, training, foreach=foreach)
        if self.layout.zero_stage == 1:
            self.optimizer_sharding = OptimizerStateSharding(optimizer, self.named_parameters(),
                                                             self.dense_group, self.expert_group)
        return optimizer
