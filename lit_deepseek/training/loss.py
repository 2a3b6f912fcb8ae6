"""Next-token and multi-token-prediction losses, computed without full float32 logits.

The output head and cross-entropy run chunk by chunk under activation checkpointing, so at most
`chunk_size x vocab` logits exist at once in forward and in backward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


@dataclass
class LossParts:
    """The total training loss and its parts (means over label tokens)."""

    total: Tensor
    main: Tensor
    mtp: Optional[Tensor] = None

    def detach(self) -> LossParts:
        return LossParts(self.total.detach(), self.main.detach(),
                         None if self.mtp is None else self.mtp.detach())


def _chunk_ce_sum(h: Tensor, weight: Tensor, labels: Tensor) -> Tensor:
    logits = F.linear(h, weight).float()
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_cross_entropy(h: Tensor, weight: Tensor, labels: Tensor, chunk_size: int = 4096) -> Tensor:
    """Mean cross-entropy of `h @ weight.T` against labels over non-ignored tokens.

    h: [N, D], weight: [V, D], labels: [N]. Each chunk's logits are recomputed in backward.
    """
    h = h.reshape(-1, h.shape[-1])
    labels = labels.reshape(-1)
    count = (labels != IGNORE_INDEX).sum().clamp(min=1)
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
