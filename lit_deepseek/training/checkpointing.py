"""Activation checkpointing per block, applied without renaming any parameter.

`full` recomputes whole transformer blocks (main and MTP) in backward; `selective` recomputes only
the routed experts, whose SwiGLU hidden states are the largest activations of an MoE block. The
forward of each chosen module is replaced on the instance, so state-dict keys stay the same as in
an unwrapped model (checkpoints and Hugging Face conversion are unaffected).
"""

from __future__ import annotations

import functools
from typing import Any

from torch import nn
from torch.utils.checkpoint import checkpoint


def _checkpointed(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    # the class's forward looked up at call time: a later class swap (FP8 conversion) still applies
    return checkpoint(type(module).forward, module, *args, use_reentrant=False, **kwargs)


def _wrap(module: nn.Module) -> None:
    if getattr(module, "_activation_checkpointed", False):
        return
    module.forward = functools.partial(_checkpointed, module)  # type: ignore[method-assign]
    module._activation_checkpointed = True  # type: ignore[assignment]


def apply_activation_checkpointing(model: nn.Module, mode: str) -> int:
    """Wrap blocks ("full") or routed experts ("selective"); returns how many modules were wrapped."""
    from lit_deepseek.model.moe import GroupedExperts
    from lit_deepseek.model.transformer import Block

    if mode == "none":
        return 0
    if mode not in ("full", "selective"):
        raise ValueError(f"training.activation_checkpointing: must be none, full or selective, got {mode!r}")
    target = Block if mode == "full" else GroupedExperts
    wrapped = 0
    for module in model.modules():
        if isinstance(module, target):
            _wrap(module)
            wrapped += 1
    return wrapped
