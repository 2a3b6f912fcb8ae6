"""AdamW with decoupled weight decay on matrices only, and the learning-rate schedules."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from lit_deepseek.config import TrainingConfig


def param_groups(parts: list[nn.Module], weight_decay: float) -> list[dict[str, Any]]:
    """Decay on weight matrices; none on norms, biases and any vector (the router bias is a buffer)."""
    decay, no_decay = [], []
    seen: set[int] = set()
    for part in parts:
        for name, p in part.named_parameters():
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            if p.ndim < 2 or "norm" in name or name.endswith(".bias"):
                no_decay.append(p)
            else:
                decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_adamw(parts: list[nn.Module], cfg: TrainingConfig, **overrides: Any) -> torch.optim.AdamW:
    """AdamW over the model parts with the training section's settings (plans add their own options).

    Plain CUDA parameters get the fused kernel (one pass instead of foreach's several)."""
    groups = param_groups(parts, cfg.weight_decay)
    kwargs: dict[str, Any] = dict(lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)
    params = [p for group in groups for p in group["params"]]
    if params and all(p.is_cuda and type(p) is nn.Parameter for p in params):
        kwargs["fused"] = True
    return torch.optim.AdamW(groups, **{**kwargs, **overrides})


def clip_coefficient(total_norm: Tensor, max_norm: float) -> Tensor:
    """The factor that brings gradients of global norm `total_norm` to at most max_norm (1 when
    they are within it), as `torch.nn.utils.clip_grad_norm_` computes it."""
    return (max_norm / (total_norm + 1e-6)).clamp(max=1.0)


def _unwrapped(optimizer: Any) -> Any:
    """The torch optimizer inside Lightning's or Fabric's wrapper."""
    while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def fold_grad_clip(optimizer: Any, coef: Tensor) -> bool:
    """Hand a clip coefficient to a fused Adam/AdamW instead of scaling every gradient: its one
    kernel divides each gradient by ``grad_scale`` (the hook AMP's unscaling uses), so the clip
    costs no pass over the gradients. The result equals clipping first up to float32 rounding
    (x / (1 / c) for x * c). False, and nothing set, for any other optimizer. `release_grad_clip`
    after the step."""
    inner = _unwrapped(optimizer)
    if not isinstance(inner, torch.optim.Adam) or not all(g.get("fused") for g in inner.param_groups):
        return False
    if getattr(inner, "grad_scale", None) is not None:  # someone else (a GradScaler) owns the hook
        return False
    inner.grad_scale = coef.reciprocal().float()
    inner._lit_deepseek_clip = True
    return True


def release_grad_clip(optimizer: Any) -> None:
    """Undo `fold_grad_clip` once the optimizer has stepped (or the step was skipped)."""
    inner = _unwrapped(optimizer)
    if getattr(inner, "_lit_deepseek_clip", False):
        inner.grad_scale = None
        inner._lit_deepseek_clip = False


def lr_multiplier(step: int, cfg: TrainingConfig) -> float:
    """Learning rate at `step` as a fraction of the peak: linear warmup, then cosine / WSD / constant."""
    floor = cfg.min_learning_rate / cfg.learning_rate if cfg.learning_rate else 0.0
    if cfg.lr_warmup_steps and step < cfg.lr_warmup_steps:
        return (step + 1) / cfg.lr_warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    decay_steps = max(1, cfg.max_steps - cfg.lr_warmup_steps)
    progress = min(1.0, (step - cfg.lr_warmup_steps) / decay_steps)
    if cfg.lr_schedule == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    # warmup-stable-decay: constant, then a linear decay over the last lr_decay_fraction of training
    decay_start = 1.0 - cfg.lr_decay_fraction
    if progress <= decay_start:
        return 1.0
    return 1.0 - (1.0 - floor) * (progress - decay_start) / max(cfg.lr_decay_fraction, 1e-12)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainingConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, cfg))
