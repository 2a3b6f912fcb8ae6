"""Token dispatch: the one service the MoE layer needs from the parallel layer.

The MoE layer sorts its routed token copies by global expert id, then asks a dispatcher to move
them to the ranks that hold those experts and, after the experts ran, to bring the results back
in the original order. The model only knows this interface; `LocalDispatcher` (all experts on
this rank) is its default, and `lit_deepseek.parallel.expert` provides the all-to-all and DeepEP
backends for expert parallelism.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class TokenDispatcher:
    """Interface for moving expert-sorted token copies to their experts and back."""

    #: ranks sharing the routed experts (expert-parallel group size) and this rank's place in it
    ep_size: int = 1
    ep_rank: int = 0

    def local_expert_range(self, num_experts: int) -> tuple[int, int]:
        """[start, end) of the global expert ids held on this rank."""
        per_rank = num_experts // self.ep_size
        return self.ep_rank * per_rank, (self.ep_rank + 1) * per_rank

    def dispatch(self, x_sorted: Tensor, tokens_per_expert: Tensor) -> tuple[Tensor, Tensor, Any]:
        """Send token copies to their experts.

        x_sorted: [N, D] token copies sorted by global expert id.
        tokens_per_expert: [num_experts] int64 counts of x_sorted's rows per global expert.
        Returns (x_local [M, D] sorted by local expert, counts [num_local_experts] int64, handle).
        """
        raise NotImplementedError

    def combine(self, y_local: Tensor, handle: Any) -> Tensor:
        """Inverse of dispatch: [M, D] expert outputs back to [N, D] in x_sorted's order."""
        raise NotImplementedError

    def global_tokens_per_expert(self, tokens_per_expert: Tensor) -> Tensor:
        """Counts per expert summed over the expert-parallel group (for capacity limits)."""
        return tokens_per_expert


class LocalDispatcher(TokenDispatcher):
    """All experts live on this rank: dispatch and combine are identities."""

    def dispatch(self, x_sorted: Tensor, tokens_per_expert: Tensor) -> tuple[Tensor, Tensor, Any]:
        return x_sorted, tokens_per_expert, None

    def combine(self, y_local: Tensor, handle: Any) -> Tensor:
        return y_local


def is_recomputing() -> bool:
    """True while autograd runs a backward pass, i.e. during activation-checkpoint recomputation.

    Statistics gathered in forward (expert loads, drop counts) are skipped then so that they are
    never counted twice.
    """
    if torch.compiler.is_compiling():
        # a compiled region's recomputation happens inside its compiled backward graph, which never
        # runs this Python again; the traced forward runs once per real forward
        return False
    return torch._C._current_graph_task_id() != -1
