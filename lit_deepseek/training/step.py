"""One training step, shipped: the plan interface and the step every engine calls.

`Plan` is the role a layout plays in a step (a typed `Protocol`): `LocalPlan` runs everything in
one process, `lit_deepseek.parallel.plan.DistributedPlan` any TP x PP x EP x DP layout. `train_step`
is the optimizer step itself (forward/backward over the micro-batches, non-finite skip, global
gradient-norm clip, optimizer and schedule); the LightningModule, the Fabric example, the
distributed parity tests and the training benchmark all call it. The aux-loss-free expert-bias
update is an optimizer step hook (`ExpertBalance`), attached by `build_optimizer`, so no loop has
to remember it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Protocol

import torch
from torch import Tensor, nn

from lit_deepseek.training.loss import LossParts, model_loss
from lit_deepseek.training.optim import release_grad_clip

if TYPE_CHECKING:
    from lit_deepseek.config import DeepSeekConfig, ModelConfig, MoEConfig, TrainingConfig

LossFn = Callable[[nn.Module, Tensor, list, Tensor], LossParts]
Backward = Callable[[Tensor], None]


class Plan(Protocol):
    """What every layout offers a training loop (`LocalPlan`, `DistributedPlan`)."""

    data_parallel_rank: int
    """This rank's slice of each global batch (index in the EP x DP ranks)."""
    data_parallel_size: int
    """Ranks reading different data (EP x DP)."""

    def parallelize(self, model: nn.Module, cfg: DeepSeekConfig) -> nn.Module:
        """Apply the layout (and activation checkpointing, FP8, compile) to a plain model; returns
        what the steps are called on."""
        ...

    def model_parts(self, model: nn.Module) -> list[nn.Module]:
        """The modules holding this rank's parameters (several under pipeline parallelism)."""
        ...

    def build_optimizer(self, parts: list[nn.Module], training: TrainingConfig) -> torch.optim.Optimizer:
        """AdamW over the parts, as this layout needs it (e.g. ZeRO-1 state sharding)."""
        ...

    def forward_backward(self, model: nn.Module, batch: dict, micro_batch_size: int, loss_fn: LossFn,
                         backward: Optional[Backward] = None) -> LossParts:
        """Forward and backward over this rank's micro-batches; the global batch's mean loss."""
        ...

    def evaluate(self, model: nn.Module, batch: dict, loss_fn: LossFn) -> LossParts:
        ...

    def clip_grad_norm(self, parameters: Iterable[Tensor], max_norm: float, optimizer: Any = None) -> Tensor:
        """Global gradient norm (each element counted once), clipping to max_norm when > 0. With
        ``optimizer`` given, the plan may fold the clip into its step (`fold_grad_clip`)."""
        ...

    def all_reduce_expert_load(self, load: Tensor) -> Tensor:
        """Per-expert loads summed over every rank routing tokens to the same experts."""
        ...

    def reduce_mean(self, value: Tensor) -> Tensor:
        """Mean over data-parallel ranks of a value computed on the last stage, on every rank."""
        ...


def split_micro_batches(batch: dict, micro_batch_size: int) -> list[dict]:
    """Cut a step batch {"input_ids": [A*micro, S], ...} into A micro-batches."""
    n = batch["input_ids"].shape[0]
    if n % micro_batch_size:
        raise ValueError(f"step batch of {n} sequences is not a multiple of micro_batch_size {micro_batch_size}")
    return [{k: v[i:i + micro_batch_size] for k, v in batch.items() if isinstance(v, Tensor)}
            for i in range(0, n, micro_batch_size)]


def set_aux_loss_grad_scale(parts: Iterable[nn.Module], scale: float) -> None:
    """The balance loss enters backward with the same scale as each micro-batch's loss."""
    for moe in moe_layers(parts):
        moe.aux_loss_grad_scale = scale


def moe_layers(parts: Iterable[nn.Module]) -> list[Any]:
    """The MoE layers of every part (each part is a `DeepSeekV3` or a pipeline stage of one)."""
    return [moe for part in parts for moe in part.moe_layers()]


def make_loss_fn(model_cfg: ModelConfig, training: TrainingConfig) -> LossFn:
    """Next-token + MTP loss through the part's output head, chunked by training.loss_chunk_size."""

    def loss_fn(part: nn.Module, h: Tensor, mtp_hiddens: list, labels: Tensor) -> LossParts:
        return model_loss(part.head.weight, h, mtp_hiddens, labels, model_cfg.mtp_loss_weight,
                          training.loss_chunk_size)

    return loss_fn


class LocalPlan:
    """Everything on one process: gradient accumulation over the step's micro-batches.

    With ``cuda_graphs`` (``training.cuda_graphs``, on by default) and the model on a GPU, each
    micro-batch's forward, loss and backward is replayed as a CUDA graph after the first steps
    (`lit_deepseek.training.cuda_graphs`); otherwise, and on CPU, the steps run eagerly. With
    ``weight_copy`` (``training.bf16_weight_copy``, on by default) and a step of several
    micro-batches under bf16 autocast, the matmul weights are cast to bf16 once per step
    (`lit_deepseek.training.weight_copy`) instead of once per micro-batch. Likewise, blockwise FP8
    layers quantize their weights in the first micro-batch of such a step and reuse the blocks in
    the others (`lit_deepseek.kernels.fp8.fp8_weight_reuse`).
    """

    data_parallel_rank: int = 0
    data_parallel_size: int = 1

    def __init__(self, cuda_graphs: bool = False, weight_copy: bool = False) -> None:
        self.cuda_graphs = cuda_graphs
        self.weight_copy = weight_copy
        self._graph_blockers: list[str] = []
        self._graphs: Any = None
        self._copy: Any = None

    def parallelize(self, model: nn.Module, cfg: DeepSeekConfig) -> nn.Module:
        from lit_deepseek.parallel.parallelize import parallelize
        from lit_deepseek.training.cuda_graphs import graph_blockers

        self._graph_blockers = graph_blockers(cfg)
        return parallelize(model, None, cfg).model

    def graphs(self, model: nn.Module) -> Any:
        """The model's `MicroBatchGraphs` when graphs are asked for and the model is on a GPU, else None."""
        if not self.cuda_graphs:
            return None
        if self._graphs is None or self._graphs.model is not model:
            param = next(model.parameters(), None)
            if param is None or param.device.type != "cuda":
                return None
            from lit_deepseek.training.cuda_graphs import MicroBatchGraphs

            self._graphs = MicroBatchGraphs(model, blockers=self._graph_blockers)
        return self._graphs

    def weight_copies(self, model: nn.Module) -> Any:
        """The model's `Bf16WeightCopy` when asked for and the step runs under bf16 autocast, else None."""
        from lit_deepseek.training.weight_copy import Bf16WeightCopy, weight_copy_applies

        if not self.weight_copy or not weight_copy_applies(model):
            return None
        if self._copy is None or self._copy.model is not model:
            self._copy = Bf16WeightCopy(model)
        return self._copy if len(self._copy) else None  # e.g. every matmul already FP8

    def model_parts(self, model: nn.Module) -> list[nn.Module]:
        return [model]

    def build_optimizer(self, parts: list[nn.Module], training: TrainingConfig) -> torch.optim.Optimizer:
        from lit_deepseek.training.optim import build_adamw

        return build_adamw(parts, training)

    def forward_backward(self, model: nn.Module, batch: dict, micro_batch_size: int, loss_fn: LossFn,
                         backward: Optional[Backward] = None) -> LossParts:
        micro_batches = split_micro_batches(batch, micro_batch_size)
        n = len(micro_batches)
        set_aux_loss_grad_scale([model], 1.0 / n)
        backward = backward or (lambda loss: loss.backward())

        from lit_deepseek.kernels.fp8 import micro_batch_reuse

        position = 0  # of the next micro_step call within this step

        def micro_step(mb: dict) -> LossParts:
            # FP8 weight reuse (lit_deepseek.kernels.fp8): the first micro-batch of a step of several
            # quantizes the blockwise weights and keeps the blocks, the later ones reuse them. The phase
            # follows the call's position, so under CUDA graphs the first micro-batch's graph is
            # captured in "fill" (its replays rewrite the kept blocks in place) and the later ones' in
            # "reuse" (their replays read them).
            nonlocal position
            reuse = micro_batch_reuse(position, n)
            position += 1
            with reuse:
                h, mtp = model(mb["input_ids"], doc_ids=mb.get("doc_ids"), return_hidden=True)
                parts = loss_fn(model, h, mtp, mb["labels"])
                backward(parts.total / n)
            return parts.detach()

        graphs = self.graphs(model)  # made before the copies are swapped in: it holds the masters
        # one micro-batch casts each weight once anyway, in the compiled blocks, where the cast fuses
        copies = self.weight_copies(model) if n > 1 else None
        if copies is not None:
            copies.refresh()
        with copies.swapped() if copies is not None else contextlib.nullcontext():
            if graphs is not None and graphs.off is None:
                return LossParts.mean(graphs.run(micro_step, micro_batches))
            return LossParts.mean([micro_step(mb) for mb in micro_batches])

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batch: dict, loss_fn: LossFn) -> LossParts:
        h, mtp = model(batch["input_ids"], doc_ids=batch.get("doc_ids"), return_hidden=True)
        return loss_fn(model, h, mtp, batch["labels"]).detach()

    def clip_grad_norm(self, parameters: Iterable[Tensor], max_norm: float, optimizer: Any = None) -> Tensor:
        """A fused AdamW (plain CUDA parameters) takes the clip inside its step: one pass over the
        gradients (the norm) instead of two (norm and scale); any other optimizer gets them scaled."""
        from lit_deepseek.training.optim import clip_coefficient, fold_grad_clip

        params = [p for p in parameters if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if max_norm > 0 and not (optimizer is not None and fold_grad_clip(optimizer, clip_coefficient(norm, max_norm))):
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        return norm

    def all_reduce_expert_load(self, load: Tensor) -> Tensor:
        return load

    def reduce_mean(self, value: Tensor) -> Tensor:
        return value


class ExpertBalance:
    """Aux-loss-free balancing (report, section 2.1.2) as an optimizer step hook.

    After every optimizer step: the per-expert loads of the step, summed over the ranks routing to
    the same experts, move each expert's bias by ``bias_update_speed`` towards balance (when
    ``use_aux_loss_free``); the step's loads, drop rate and balance loss stay readable for logging.
    """

    def __init__(self, plan: Plan, parts: list[nn.Module], moe: MoEConfig) -> None:
        self.plan, self.parts, self.moe = plan, parts, moe
        self.last_load: Optional[Tensor] = None
        self._drop_rate: Optional[Tensor] = None
        self._balance_loss: Optional[Tensor] = None

    def attach(self, optimizer: torch.optim.Optimizer) -> ExpertBalance:
        optimizer.register_step_post_hook(lambda opt, args, kwargs: self.update())
        return self

    @torch.no_grad()
    def update(self) -> None:
        """Runs on the device without a host sync, so the next step can be queued behind it."""
        layers = moe_layers(self.parts)
        if not layers:
            return
        loads = self.plan.all_reduce_expert_load(torch.stack([m.expert_load.float() for m in layers]))
        if self.moe.use_aux_loss_free:
            for layer, load in zip(layers, loads, strict=True):
                layer.update_bias(load, self.moe.bias_update_speed)
        self.last_load = loads.detach()
        routed = torch.stack([m.routed_tokens.float() for m in layers]).sum()
        dropped = torch.stack([m.dropped_tokens.float() for m in layers]).sum()
        self._drop_rate = dropped / routed.clamp(min=1)
        aux = [m.last_aux_loss.float() for m in layers if m.last_aux_loss is not None]
        self._balance_loss = torch.stack(aux).sum() if aux else None
        for layer in layers:
            layer.reset_stats()

    @property
    def drop_rate(self) -> float:
        """Share of routed token copies dropped by expert capacity in the last step."""
        return float(self._drop_rate) if self._drop_rate is not None else 0.0

    @property
    def balance_loss(self) -> float:
        """Sequence-wise balance loss of the last step, summed over the MoE layers."""
        return float(self._balance_loss) if self._balance_loss is not None else 0.0

    def biases(self) -> Tensor:
        return torch.stack([m.expert_bias.detach().float().cpu() for m in moe_layers(self.parts)])


def build_optimizer(plan: Plan, model: nn.Module, cfg: DeepSeekConfig) -> tuple[torch.optim.Optimizer, ExpertBalance]:
    """The plan's optimizer over the model's parts, with the expert-bias update hooked to its step."""
    parts = plan.model_parts(model)
    optimizer = plan.build_optimizer(parts, cfg.training)
    return optimizer, ExpertBalance(plan, parts, cfg.model.moe).attach(optimizer)


@dataclass
class StepResult:
    """What one optimizer step reports: the global batch's mean loss and the gradient norm."""

    loss: LossParts
    grad_norm: Optional[Tensor]
    """None when the loss was not finite and the step was skipped."""

    @property
    def skipped(self) -> bool:
        return self.grad_norm is None


def train_step(plan: Plan, model: nn.Module, batch: dict, optimizer: Any, training: TrainingConfig,
               loss_fn: LossFn, backward: Optional[Backward] = None, scheduler: Optional[Any] = None) -> StepResult:
    """One optimizer step over this rank's share of a global batch.

    ``batch`` holds this data-parallel rank's micro-batches of the step (``[A*micro, S]``). A
    non-finite loss or gradient norm skips the step (gradients and expert statistics dropped). ``optimizer`` may be
    a Lightning or Fabric wrapper of the one `build_optimizer` made; ``backward`` the engine's
    backward (e.g. ``fabric.backward``).
    """
    parts = plan.model_parts(model)
    loss = plan.forward_backward(model, batch, training.micro_batch_size, loss_fn, backward)
    # The norm and the clip are queued behind the backward whatever the loss, so the step waits for
    # the device once, on the finiteness of both (and every rank joins the norm's collectives). A
    # finite loss can still come with an overflowing gradient; stepping on either would poison the
    # weights.
    # (Under 16-mixed a GradScaler owns the optimizer's grad_scale hook, so the clip is not folded.)
    fold = optimizer if training.precision != "16-mixed" else None
    grad_norm = plan.clip_grad_norm([p for part in parts for p in part.parameters()], training.grad_clip, fold)
    if not bool(torch.isfinite(loss.total) & torch.isfinite(grad_norm)):
        release_grad_clip(optimizer)
        optimizer.zero_grad(set_to_none=True)
        for layer in moe_layers(parts):
            layer.reset_stats()
        return StepResult(loss, None)
    optimizer.step()  # ExpertBalance.update runs as its post-step hook
    release_grad_clip(optimizer)
    optimizer.zero_grad(set_to_none=True)
    if scheduler is not None:
        scheduler.step()
    return StepResult(loss, grad_norm)


__all__ = ["Backward", "ExpertBalance", "LocalPlan", "LossFn", "Plan", "StepResult", "build_optimizer",
           "make_loss_fn", "moe_layers", "set_aux_loss_grad_scale", "split_micro_batches", "train_step"]
