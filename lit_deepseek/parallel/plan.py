"""`DistributedPlan`: the `LocalPlan` interface for any TP x PP x EP x DP layout.

The LightningModule calls the same methods under every layout; this class decides what they mean
on the mesh: which experts this rank keeps, which collectives sum which gradients, how the loss of
the global batch is reported, and how the gradient norm counts every element once.

Exactness: every rank scales its micro-batch losses by 1 / (micro-batches in the global batch)
and all gradient reductions are sums, so the summed gradients equal those of the single-process
run that accumulates the whole global batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh

from lit_deepseek.config import DeepSeekConfig
from lit_deepseek.parallel.expert import keep_experts_in_graph, make_dispatcher
from lit_deepseek.parallel.mesh import local_coordinate, mesh_layout, submesh
from lit_deepseek.parallel.zero import (
    GradientSync,
    OptimizerStateSharding,
    apply_fsdp,
    clip_grads_,
    global_grad_norm,
)
from lit_deepseek.training.loss import LossParts
from lit_deepseek.training.step import LocalPlan, LossFn, set_aux_loss_grad_scale, split_micro_batches

MESH_ALIASES = {"dp_ep": ("dp", "ep")}


class DistributedPlan(LocalPlan):
    """Parallelises a `DeepSeekV3` over a mesh from `build_mesh` and runs its steps exactly."""

    def __init__(self, cfg: DeepSeekConfig, mesh: DeviceMesh) -> None:
        self.cfg = cfg
        self.mesh = mesh
        self.layout = mesh_layout(mesh)
        self.coordinate = local_coordinate(mesh)
        self.dense_group = submesh(mesh, "dp_ep").get_group()
        self.expert_group = mesh["dp"].get_group()
        self.ep_group = mesh["ep"].get_group()
        self.data_parallel_rank = submesh(mesh, "dp_ep").get_local_rank()
        self.data_parallel_size = self.layout.data_parallel_size
        self.zero_stage = cfg.parallel.zero_stage
        self.grad_sync: Optional[GradientSync] = None
        self.optimizer_sharding: Optional[OptimizerStateSharding] = None
        self.pipeline: Any = None
        self._parts: list[nn.Module] = []
        self._names: dict[int, str] = {}
        self._duplicates: set[int] = set()
        self._vocab_parallel = False

    # ------------------------------------------------------------------ layout
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

    def parallelize(self, model: nn.Module) -> nn.Module:
        """Pipeline stages, experts sharded over EP, TP plans, then ZeRO on each part.

        Works on a materialised model (every rank initialised identically) or on the meta device
        (call `init_weights` on each part afterwards; expert initialisation depends on global ids).
        """
        p = self.cfg.parallel
        if self.layout.pp > 1:
            from lit_deepseek.parallel.pipeline import build_pipeline

            self.pipeline = build_pipeline(model, self.cfg, self.mesh["pp"], device=self._device())
            parts = list(self.pipeline.stage_modules)
            tied = {id(q) for q in self.pipeline.tied_copies()}
            tied_names = [{n for n, q in part.named_parameters() if id(q) in tied} for part in parts]
            model = PipelineStages(parts)
        else:
            parts, tied_names = [model], [set()]
        if self.layout.ep > 1 or self.cfg.model.moe.use_deep_ep:
            dispatcher = make_dispatcher(self.cfg.model, self.ep_group if self.layout.ep > 1 else None)
            start, end = dispatcher.local_expert_range(self.cfg.model.moe.num_experts)
            for part in parts:
                part.set_dispatcher(dispatcher)
                for moe in part.moe_layers():
                    if (moe.experts.expert_start, moe.experts.num_local_experts) != (start, end - start):
                        moe.shard_experts(start, end)
        if self.layout.ep > 1 or self.layout.dp > 1:
            for part in parts:
                keep_experts_in_graph(part)
        if self.layout.tp > 1:
            from lit_deepseek.parallel.tensor import apply_tensor_parallel

            for part in parts:
                apply_tensor_parallel(part, self.mesh["tp"], sequence_parallel=p.sequence_parallel)
        if self.layout.tp > 1:
            from lit_deepseek.parallel.tensor import is_vocab_parallel

            self._vocab_parallel = any(is_vocab_parallel(part) for part in parts)
        if self.zero_stage >= 2:
            for part in parts:
                apply_fsdp(part, submesh(self.mesh, "dp_ep"), self.mesh["dp"],
                           reshard_after_forward=self.zero_stage == 3)
        self._parts = parts
        named = self.named_parameters()
        self._names = {id(q): n for n, q in named}
        # copies of another stage's weights (the last stage's embedding for MTP) count once
        self._duplicates = {id(part.get_parameter(n)) for part, names in zip(parts, tied_names, strict=True)
                            for n in names}
        if self.zero_stage < 2:
            self.grad_sync = GradientSync(named, self.dense_group, self.expert_group, overlap=p.overlap_grad_reduce)
        return model

    def model_parts(self, model: nn.Module) -> list[nn.Module]:
        return self._parts or [model]

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) of every part; names are the single-process FQNs."""
        return [(n, q) for part in self._parts for n, q in part.named_parameters()]

    # ------------------------------------------------------------------ step
    def forward_backward(self, model: nn.Module, batch: dict, micro_batch_size: int, loss_fn: LossFn,
                         backward: Optional[Callable[[Tensor], None]] = None) -> LossParts:
        """Forward/backward over this rank's micro-batches; returns the global-batch mean loss."""
        backward = backward or (lambda loss: loss.backward())
        loss_fn = self._loss_fn(loss_fn)
        micro_batches = split_micro_batches(batch, micro_batch_size)
        n = len(micro_batches)
        scale = 1.0 / (n * self.data_parallel_size)
        self._gather_sharded_head()
        if self.pipeline is not None:
            local = self.pipeline.forward_backward(micro_batches, loss_fn, scale, backward,
                                                   before_last=self._arm_grad_sync)
        else:
            for part in self._parts:
                set_aux_loss_grad_scale(part, scale)
            local = None
            for i, mb in enumerate(micro_batches):
                if i == n - 1:
                    self._arm_grad_sync()
                with self._loss_context(model):
                    h, mtp = model(mb["input_ids"], doc_ids=mb.get("doc_ids"), return_hidden=True)
                    parts = loss_fn(model, h, mtp, mb["labels"])
                    backward(parts.total * scale)
                local = _add(local, parts.detach(), 1.0 / n)
        if self.grad_sync is not None:
            self.grad_sync.finish()
        return self._global_mean(local)

    def _gather_sharded_head(self) -> None:
        """Under TP with ZeRO 2/3, gather the part holding the head before the step, so that the
        head shows its vocabulary-parallel (TP) layout when the loss context is chosen."""
        if self.layout.tp == 1 or self.zero_stage < 2:
            return
        for part in self._parts:
            if getattr(part, "head", None) is not None and hasattr(part, "unshard"):
                part.unshard()

    def _arm_grad_sync(self) -> None:
        if self.grad_sync is not None and self.grad_sync.overlap:
            self.grad_sync.arm()

    def _loss_fn(self, loss_fn: LossFn) -> LossFn:
        if self.layout.tp == 1:
            return loss_fn
        from lit_deepseek.parallel.tensor import vocab_parallel_loss

        return vocab_parallel_loss(loss_fn)

    def _loss_context(self, model: nn.Module) -> Any:
        if self.layout.tp == 1:
            import contextlib

            return contextlib.nullcontext()
        from lit_deepseek.parallel.tensor import loss_parallel_context

        return loss_parallel_context(None, enabled=self._vocab_parallel)

    def _global_mean(self, local: Optional[LossParts]) -> LossParts:
        """Mean over the global batch, identical on every rank (PP: the last stage's value)."""
        has_mtp = self.cfg.model.mtp_depth > 0
        values = torch.zeros(3, dtype=torch.float32, device=self._device())
        if local is not None and self.reports_loss:
            values[0], values[1] = local.total.float(), local.main.float()
            if local.mtp is not None:
                values[2] = local.mtp.float()
            values /= self.data_parallel_size
        dist.all_reduce(values)
        return LossParts(values[0], values[1], values[2] if has_mtp else None)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batch: dict, loss_fn: LossFn) -> LossParts:
        loss_fn = self._loss_fn(loss_fn)
        self._gather_sharded_head()
        if self.pipeline is not None:
            parts = self.pipeline.evaluate(batch, loss_fn)
            if parts is None:  # not the last stage: reduce_mean takes the last stage's value
                zero = torch.zeros((), device=self._device())
                parts = LossParts(zero, zero, zero if self.cfg.model.mtp_depth > 0 else None)
            return parts
        with self._loss_context(model):
            h, mtp = model(batch["input_ids"], doc_ids=batch.get("doc_ids"), return_hidden=True)
            return loss_fn(model, h, mtp, batch["labels"]).detach()

    def reduce_mean(self, value: Tensor) -> Tensor:
        """Mean over data-parallel ranks of a value computed on the last stage, on every rank."""
        out = torch.zeros((), dtype=torch.float32, device=self._device())
        if self.reports_loss:
            out += value.detach().float() / self.data_parallel_size
        dist.all_reduce(out)
        return out

    # ------------------------------------------------------------------ gradients
    def clip_grad_norm(self, parameters: Iterable[Tensor], max_norm: float) -> Tensor:
        params = list(parameters)
        named = [(self._names.get(id(p), ""), p) for p in params if id(p) not in self._duplicates]
        norm = global_grad_norm(named, self.coordinate, MESH_ALIASES, device=self._device())
        if max_norm > 0:
            clip_grads_(params, max_norm, norm)
        return norm

    def all_reduce_expert_load(self, load: Tensor) -> Tensor:
        """Sum over the EP x DP ranks (TP peers route the same tokens and are not added)."""
        load = load.detach().clone()
        dist.all_reduce(load, group=self.dense_group)
        return load

    # ------------------------------------------------------------------ optimizer
    def build_optimizer(self, groups: list[dict[str, Any]], **kwargs: Any) -> torch.optim.Optimizer:
        """AdamW; ZeRO-1 shards its state by parameter owner."""
        if self.zero_stage >= 2 and self.layout.ep > 1:
            kwargs.setdefault("foreach", False)  # experts and dense weights live on different meshes
        optimizer = torch.optim.AdamW(groups, **kwargs)
        if self.zero_stage == 1:
            self.optimizer_sharding = OptimizerStateSharding(optimizer, self.named_parameters(),
                                                             self.dense_group, self.expert_group)
        return optimizer

    def _device(self) -> torch.device:
        return torch.device(self.mesh.device_type, torch.cuda.current_device()) if self.mesh.device_type == "cuda" \
            else torch.device(self.mesh.device_type)


class PipelineStages(nn.Module):
    """This rank's pipeline stages (what `parallelize` returns under PP).

    Run them through the plan (`forward_backward`, `evaluate`): a stage alone cannot compute the
    model's output.
    """

    def __init__(self, parts: list[nn.Module]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a pipeline-parallel model runs through its plan: plan.forward_backward / plan.evaluate")


def _add(acc: Optional[LossParts], parts: LossParts, weight: float) -> LossParts:
    mtp = None if parts.mtp is None else parts.mtp * weight
    if acc is None:
        return LossParts(parts.total * weight, parts.main * weight, mtp)
    return LossParts(acc.total + parts.total * weight, acc.main + parts.main * weight,
                     None if acc.mtp is None or mtp is None else acc.mtp + mtp)
