"""Regional compilation: `torch.compile` applied to each transformer block in place.

Compiling blocks rather than the whole model keeps compile time to one graph per block kind (dense,
MoE) because identical blocks share the compiled code, fuses the memory-bound pieces of a block
(RMSNorm in float32, RoPE, SwiGLU, the router and the token permutation) into a few kernels, and
leaves parameter names unchanged (`nn.Module.compile` wraps the call, not the module), so state
dicts, checkpoints and the parallel plans see the same model. The uncompiled model is the
reference path.
"""

from __future__ import annotations

from typing import Any

from torch import nn


def compile_blocks(model: nn.Module, **compile_kwargs: Any) -> int:
    """Compile every `Block` of `model` (main and MTP) in place; returns how many were compiled."""
    from lit_deepseek.model.transformer import Block

    n = 0
    for module in model.modules():
        if isinstance(module, Block):
            module.compile(**compile_kwargs)
            n += 1
    return n
