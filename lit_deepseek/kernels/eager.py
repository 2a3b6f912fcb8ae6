"""When the eager fast paths (the Triton kernels `rms_norm`, `swiglu`, `mla_rope`, and sibling
projections run as one GEMM) replace their PyTorch references.

Outside `torch.compile`, each of these layers is a chain of small PyTorch kernels that autograd
also keeps intermediates of; inside a compiled region Inductor fuses the same chain by itself. So
the Triton kernels run for CUDA tensors outside compiled regions only, and the references
everywhere else: CPU, compiled regions, DTensors (tensor-parallel layers).

LIT_DEEPSEEK_EAGER_KERNELS: ``auto`` (default) takes the kernels where they apply, ``torch`` keeps
the references, ``triton`` takes the kernels and fails when Triton is missing. A CUDA tensor
without Triton under ``auto`` warns once per layer kind, so a slow path is never silent.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_deepseek.kernels import is_dtensor

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is a GPU extra
    HAS_TRITON = False

ENV = "LIT_DEEPSEEK_EAGER_KERNELS"
_warned: set[str] = set()


def backend() -> str:
    mode = os.environ.get(ENV, "auto") or "auto"
    if mode not in ("auto", "triton", "torch"):
        raise ValueError(f"{ENV}: must be auto, triton or torch, got {mode!r}")
    if mode == "triton" and not HAS_TRITON:
        raise RuntimeError(f"{ENV}=triton: triton is not installed")
    return mode


def triton_applies(kind: str, *tensors: Tensor) -> bool:
    """Whether the `kind` layer ("RMSNorm", "SwiGLU") takes its Triton kernels for these tensors."""
    first = tensors[0]
    if not first.is_cuda or torch.compiler.is_compiling() or any(is_dtensor(t) for t in tensors):
        return False
    if backend() == "torch":
        return False
    if not HAS_TRITON:
        if kind not in _warned:
            _warned.add(kind)
            warnings.warn(f"{kind}: triton is not installed, so eager steps run it as several PyTorch kernels "
                          "(slower, more activation memory); install triton (pip install 'lit-deepseek[gpu]')",
                          stacklevel=3)
        return False
    return True


def siblings_fuse(x: Tensor, *linears: nn.Module) -> bool:
    """Whether projections of the same input (a SwiGLU's gate and up; MLA's query and KV
    down-projections) run as one GEMM over their concatenated weights: plain bias-free
    `nn.Linear`s (not FP8 layers, which fuse their own way) of one weight dtype, a CUDA input outside
    compiled regions, no DTensors, and LIT_DEEPSEEK_EAGER_KERNELS not ``torch``.

    Under autocast with float32 activations (bf16-mixed) each projection casts its input to bf16
    again and, in backward, casts its input gradient back and adds it to the others'; one GEMM casts
    once and returns one input gradient, accumulated over all outputs in the GEMM's float32."""
    if not x.is_cuda or torch.compiler.is_compiling() or is_dtensor(x) or backend() == "torch":
        return False
    weights = [lin.weight for lin in linears if type(lin) is nn.Linear and lin.bias is None]
    return (len(weights) == len(linears) and len({w.dtype for w in weights}) == 1
            and not any(is_dtensor(w) for w in weights))


def project_siblings(x: Tensor, *linears: nn.Linear) -> tuple[Tensor, ...]:
    """The outputs of `linears` on x, as one GEMM where `siblings_fuse`, else one each."""
    if not siblings_fuse(x, *linears):
        return tuple(lin(x) for lin in linears)
    out = F.linear(x, torch.cat([lin.weight for lin in linears]))
    return out.split([lin.out_features for lin in linears], dim=-1)


def as_rows(t: Tensor) -> Tensor:
    """t as [rows, last dim] with unit stride along the last dim, the layout the kernels read: a view
    where the layout allows it (a slice of a wider projection keeps its row stride), else a copy."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


__all__ = ["ENV", "HAS_TRITON", "as_rows", "backend", "project_siblings", "siblings_fuse", "triton_applies"]
