"""A bf16 working copy of the matmul weights, cast once per optimizer step (`training.bf16_weight_copy`).

Under ``bf16-mixed`` the parameters are float32 masters and autocast casts each weight to bf16 where
a matmul uses it. Inside compiled blocks and CUDA graphs autocast has no weight cache, so with
gradient accumulation every micro-batch casts every weight again, and its backward turns every
bf16 weight gradient into a new float32 tensor before adding it to ``param.grad``: about 24 bytes
of memory traffic per parameter per micro-batch, against about 10 with a working copy.

`Bf16WeightCopy` holds one bf16 leaf per weight that is only ever consumed by a bf16 matmul under
autocast (``nn.Linear`` weights and the routed experts' stacked weights; not the output head, whose
fused cross-entropy accumulates its gradient in float32, nor embeddings, norms, the router or FP8
layers, which quantize the masters themselves). ``refresh`` casts the masters into the copies (one
pass, at the start of a step); inside ``swapped`` the modules see the copies, and a hook adds each
copy's gradient into its master's float32 ``.grad`` as soon as autograd has it (``.grad`` written
by the first micro-batch, added to by later ones), then drops the bf16 gradient.

`LocalPlan` uses it for steps of several micro-batches; a step of one micro-batch casts each weight
once anyway, inside the compiled blocks where the cast fuses (measured faster there).

The numbers are the autocast path's: the same round-to-nearest casts, the same bf16 weight
gradients, the same float32 accumulation (``tests/test_weight_copy.py`` compares the two bit for
bit on CPU). Outside a training step the modules hold their float32 masters, so checkpoints,
validation and the optimizer never see the copies.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn


def _weight_slots(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(module, parameter name) of every float32 weight consumed only by a bf16 matmul under autocast."""
    from lit_deepseek.model.moe import GroupedExperts

    head = getattr(model, "head", None)
    slots = []
    for module in model.modules():
        if module is head:
            continue
        # exact types: an FP8 layer (`convert_to_fp8` swaps in a subclass) quantizes its master itself
        if type(module) is nn.Linear:
            names = ["weight"] + (["bias"] if module.bias is not None else [])
        elif type(module) is GroupedExperts:
            names = ["w1", "w3", "w2"]
        else:
            continue
        for pname in names:
            p = module._parameters.get(pname)
            if p is not None and p.requires_grad and p.dtype == torch.float32 and type(p) is nn.Parameter:
                slots.append((module, pname))
    return slots


class Bf16WeightCopy:
    """bf16 working copies of a model's matmul weights (see the module docstring)."""

    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> None:
        self.model = model
        self.slots = _weight_slots(model)
        self.masters: list[nn.Parameter] = [m._parameters[n] for m, n in self.slots]  # type: ignore[misc]
        self.copies: list[nn.Parameter] = []
        for master in self.masters:
            copy = nn.Parameter(torch.empty_like(master, dtype=dtype), requires_grad=True)
            copy.register_post_accumulate_grad_hook(self._hook(master))
            self.copies.append(copy)

    @staticmethod
    def _hook(master: nn.Parameter):  # noqa: ANN205
        def accumulate(copy: Tensor) -> None:
            grad = copy.grad
            if grad is None:
                return
            if master.grad is None:
                master.grad = grad.to(master.dtype)
            else:
                master.grad.add_(grad)
            copy.grad = None

        return accumulate

    def __len__(self) -> int:
        return len(self.copies)

    @torch.no_grad()
    def refresh(self) -> None:
        """Cast the float32 masters into the copies (after every optimizer step, before the next forward)."""
        if self.copies:
            torch._foreach_copy_(self.copies, self.masters)

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """The modules use the bf16 copies inside; their masters are back on exit, whatever happens."""
        for (module, name), copy in zip(self.slots, self.copies, strict=True):
            module._parameters[name] = copy
        try:
            yield
        finally:
            for (module, name), master in zip(self.slots, self.masters, strict=True):
                module._parameters[name] = master


def weight_copy_applies(model: nn.Module) -> bool:
    """Whether a step of `model` runs under bf16 autocast on its own device with float32 weights."""
    param = next(model.parameters(), None)
    if param is None or param.dtype != torch.float32:
        return False
    device = param.device.type
    return torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.bfloat16


__all__ = ["Bf16WeightCopy", "weight_copy_applies"]
