"""Next-token and multi-token-prediction losses, computed without full float32 logits.

The output head and cross-entropy run chunk by chunk, so at most `chunk_size x vocab` logits exist
at once. Two paths compute the same function:

* reference: each chunk under activation checkpointing (its logits are recomputed in backward);
* fused (default when gradients are needed): each chunk's gradients with respect to the hidden
  states and the head weight are computed in the forward pass itself, while its logits are at
  hand, and only scaled in backward. No recomputation of the head matmul, no stored logits.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from lit_deepseek.kernels import is_dtensor
from lit_deepseek.precision import compute_dtype

IGNORE_INDEX = -100
#: switch for the fused head + cross-entropy path (False: always the checkpointed reference path)
FUSED_CROSS_ENTROPY = True
#: on CUDA, run the per-chunk softmax/gradient arithmetic through torch.compile (one fused kernel)
COMPILE_CE_CHUNK = True


@dataclass
class LossParts:
    """The total training loss and its parts (means over label tokens)."""

    total: Tensor
    main: Tensor
    mtp: Optional[Tensor] = None

    def detach(self) -> LossParts:
        return LossParts(self.total.detach(), self.main.detach(),
                         None if self.mtp is None else self.mtp.detach())

    @staticmethod
    def mean(parts: list[LossParts]) -> LossParts:
        """The mean of several micro-batches' losses: the loss of the batch they make up."""
        n = len(parts)
        mtp = None if parts[0].mtp is None else sum(p.mtp for p in parts) / n  # type: ignore[misc]
        return LossParts(sum(p.total for p in parts) / n, sum(p.main for p in parts) / n, mtp)  # type: ignore[arg-type]


def _chunk_ce_sum(h: Tensor, weight: Tensor, labels: Tensor) -> Tensor:
    logits = F.linear(h, weight).float()
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")


def _ce_sum_and_grad_eager(logits: Tensor, labels: Tensor, grad_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Summed cross-entropy of one chunk's logits and its gradient d(sum)/d(logits) in grad_dtype."""
    logits = logits.float()
    valid = labels != IGNORE_INDEX
    safe = torch.where(valid, labels, 0)
    lse = torch.logsumexp(logits, dim=-1)
    picked = logits.gather(1, safe[:, None]).squeeze(1)
    total = torch.where(valid, lse - picked, 0.0).sum()
    # softmax - onehot on valid rows, 0 on ignored ones
    grad = logits.sub_(lse[:, None]).exp_()
    grad.scatter_add_(1, safe[:, None], torch.full_like(picked[:, None], -1.0))
    grad.mul_(valid[:, None])
    return total, grad.to(grad_dtype)


def _ce_sum_and_grad_fusable(logits: Tensor, labels: Tensor, grad_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The same function written without in-place ops, for torch.compile to fuse into two passes."""
    x = logits.float()
    valid = labels != IGNORE_INDEX
    safe = torch.where(valid, labels, 0)
    lse = torch.logsumexp(x, dim=-1)
    picked = x.gather(1, safe[:, None]).squeeze(1)
    total = torch.where(valid, lse - picked, 0.0).sum()
    onehot = torch.arange(x.shape[1], device=x.device)[None, :] == safe[:, None]
    grad = torch.where(valid[:, None], torch.exp(x - lse[:, None]) - onehot.float(), 0.0)
    return total, grad.to(grad_dtype)


_COMPILED_CE: Any = None


def _ce_sum_and_grad(logits: Tensor, labels: Tensor, grad_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """On CUDA with COMPILE_CE_CHUNK, a compiled (fused) version of the eager reference above."""
    global _COMPILED_CE, COMPILE_CE_CHUNK
    if COMPILE_CE_CHUNK and logits.is_cuda and not torch.compiler.is_compiling():
        try:
            if _COMPILED_CE is None:
                _COMPILED_CE = torch.compile(_ce_sum_and_grad_fusable, dynamic=False)
            return _COMPILED_CE(logits, labels, grad_dtype)
        except Exception as exc:  # a compiler problem must not stop training: use the eager path
            warnings.warn(f"compiled cross-entropy chunk failed ({type(exc).__name__}: {exc}); using eager", stacklevel=2)
            COMPILE_CE_CHUNK = False
    return _ce_sum_and_grad_eager(logits, labels, grad_dtype)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Sum of cross-entropy of `h @ weight.T` over chunks, with the gradients made in forward."""

    @staticmethod
    def forward(ctx: Any, h: Tensor, weight: Tensor, labels: Tensor, chunk_size: int) -> Tensor:
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if ctx.needs_input_grad[1] else None
        grad_dtype = compute_dtype(h)  # bf16 logits gradients under mixed precision
        for start in range(0, h.shape[0], chunk_size):
            hc, yc = h[start:start + chunk_size], labels[start:start + chunk_size]
            chunk_sum, grad = _ce_sum_and_grad(F.linear(hc, weight), yc, grad_dtype)
            total = total + chunk_sum
            if grad_h is not None:
                grad_h[start:start + chunk_size] = grad @ weight.to(h.dtype)
            if grad_w is not None:
                grad_w.add_(grad.t() @ hc.to(grad.dtype))
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype) if grad_w is not None else None)
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Optional[Tensor], Optional[Tensor], None, None]:
        grad_h, grad_w = ctx.saved_tensors
        scale = grad_out.float()
        return (None if grad_h is None else (grad_h * scale).to(grad_h.dtype),
                None if grad_w is None else (grad_w * scale).to(grad_w.dtype), None, None)


def fused_linear_cross_entropy_sum(h: Tensor, weight: Tensor, labels: Tensor, chunk_size: int = 4096) -> Tensor:
    """Summed cross-entropy of `h @ weight.T` (h [N, D], labels [N]) with gradients made in forward.

    Same value and gradients as `_chunk_ce_sum` over all chunks under checkpointing (up to
    rounding): the reference path in `chunked_cross_entropy(..., fused=False)`.
    """
    return _FusedLinearCrossEntropy.apply(h, weight, labels, chunk_size)


def chunked_cross_entropy(h: Tensor, weight: Tensor, labels: Tensor, chunk_size: int = 4096,
                          fused: Optional[bool] = None) -> Tensor:
    """Mean cross-entropy of `h @ weight.T` against labels over non-ignored tokens.

    h: [N, D], weight: [V, D], labels: [N]. fused=None picks the fused path whenever gradients
    are needed and the tensors are not DTensors (tensor-parallel heads keep the reference path).
    """
    h = h.reshape(-1, h.shape[-1])
    labels = labels.reshape(-1)
    count = (labels != IGNORE_INDEX).sum().clamp(min=1)
    needs_grad = h.requires_grad or weight.requires_grad
    if fused is None:
        fused = FUSED_CROSS_ENTROPY and not is_dtensor(h) and not is_dtensor(weight)
    if fused and needs_grad:
        return fused_linear_cross_entropy_sum(h, weight, labels, chunk_size) / count
    total = h.new_zeros((), dtype=torch.float32)
    for start in range(0, h.shape[0], chunk_size):
        sl = slice(start, start + chunk_size)
        if h.requires_grad or weight.requires_grad:
            total = total + checkpoint(_chunk_ce_sum, h[sl], weight, labels[sl], use_reentrant=False)
        else:
            total = total + _chunk_ce_sum(h[sl], weight, labels[sl])
    return total / count


def shift_labels(labels: Tensor, k: int) -> Tensor:
    """Targets of MTP depth k: position i predicts the token that `labels` has at i + k."""
    if k == 0:
        return labels
    tail = labels.new_full((*labels.shape[:-1], k), IGNORE_INDEX)
    return torch.cat([labels[..., k:], tail], dim=-1)


def model_loss(head_weight: Tensor, h: Tensor, mtp_hiddens: list[Tensor], labels: Tensor,
               mtp_loss_weight: float, chunk_size: int = 4096) -> LossParts:
    """Main next-token loss plus mtp_loss_weight x the mean MTP loss over depths."""
    main = chunked_cross_entropy(h, head_weight, labels, chunk_size)
    if not mtp_hiddens:
        return LossParts(main, main, None)
    mtp = torch.stack([chunked_cross_entropy(hk, head_weight, shift_labels(labels, k + 1), chunk_size)
                       for k, hk in enumerate(mtp_hiddens)]).mean()
    return LossParts(main + mtp_loss_weight * mtp, main, mtp)
