"""The single-process training plan: how one optimizer step's micro-batches become gradients.

`LocalPlan` defines the interface that `lit_deepseek.parallel.plan.DistributedPlan` implements for
every parallel layout, so the LightningModule is the same code under any layout.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Optional

import torch
from torch import Tensor, nn

from lit_deepseek.training.loss import LossParts

LossFn = Callable[[nn.Module, Tensor, list, Tensor], LossParts]


def split_micro_batches(batch: dict, micro_batch_size: int) -> list[dict]:
    """Cut a step batch {"input_ids": [A*micro, S], ...} into A micro-batches."""
    n = batch["input_ids"].shape[0]
    if n % micro_batch_size:
        raise ValueError(f"step batch of {n} sequences is not a multiple of micro_batch_size {micro_batch_size}")
    return [{k: v[i:i + micro_batch_size] for k, v in batch.items() if isinstance(v, Tensor)}
            for i in range(0, n, micro_batch_size)]


class LocalPlan:
    """Everything on one process: gradient accumulation over the step's micro-batches."""

    data_parallel_rank: int = 0
    data_parallel_size: int = 1

    def parallelize(self, model: nn.Module) -> nn.Module:
        return model

    def model_parts(self, model: nn.Module) -> list[nn.Module]:
        """The modules holding this rank's parameters (several under pipeline parallelism)."""
        return [model]

    def forward_backward(self, model: nn.Module, batch: dict, micro_batch_size: int, loss_fn: LossFn,
                         backward: Optional[Callable[[Tensor], None]] = None) -> LossParts:
        """Forward and backward over all micro-batches; returns the mean loss of the global batch."""
        micro_batches = split_micro_batches(batch, micro_batch_size)
        n = len(micro_batches)
        set_aux_loss_grad_scale(model, 1.0 / n)
        backward = backward or (lambda loss: loss.backward())
        acc: Optional[LossParts] = None
        for mb in micro_batches:
            h, mtp = model(mb["input_ids"], doc_ids=mb.get("doc_ids"), return_hidden=True)
            parts = loss_fn(model, h, mtp, mb["labels"])
            backward(parts.total / n)
            acc = _accumulate(acc, parts.detach(), n)
        assert acc is not None
        return acc

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batch: dict, loss_fn: LossFn) -> LossParts:
        h, mtp = model(batch["input_ids"], doc_ids=batch.get("doc_ids"), return_hidden=True)
        return loss_fn(model, h, mtp, batch["labels"]).detach()

    def clip_grad_norm(self, parameters: Iterable[Tensor], max_norm: float) -> Tensor:
        """Global gradient norm, clipping to max_norm when it is > 0."""
        params = [p for p in parameters if p.grad is not None]
        if max_norm > 0:
            return torch.nn.utils.clip_grad_norm_(params, max_norm)
        return torch.nn.utils.get_total_norm([p.grad for p in params])

    def all_reduce_expert_load(self, load: Tensor) -> Tensor:
        """Per-expert loads summed over every rank routing tokens to the same experts."""
        return load

    def reduce_mean(self, value: Tensor) -> Tensor:
        """Mean of a scalar over data-parallel ranks (identity here)."""
        return value


def set_aux_loss_grad_scale(model: nn.Module, scale: float) -> None:
    moe_layers = getattr(model, "moe_layers", None)
    for moe in moe_layers() if moe_layers else []:
        moe.aux_loss_grad_scale = scale


def _accumulate(acc: Optional[LossParts], parts: LossParts, n: int) -> LossParts:
    scaled = LossParts(parts.total / n, parts.main / n, None if parts.mtp is None else parts.mtp / n)
    if acc is None:
        return scaled
    return LossParts(acc.total + scaled.total, acc.main + scaled.main,
                     None if acc.mtp is None else acc.mtp + scaled.mtp)
