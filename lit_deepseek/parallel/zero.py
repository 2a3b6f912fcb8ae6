"""Data parallelism with ZeRO stages 0-3 over the two data-parallel groups.

Dense weights are replicated over ``dp_ep`` (every rank reading different data); routed expert
weights over ``dp`` only (EP peers hold different experts). Every reduction here is a SUM: the
plan scales each rank's loss by 1 / (micro-batches in the whole global batch), so summed gradients
are exactly the gradients of the global-batch mean.

- stage 0: replicated parameters and optimizer state; `GradientSync` all-reduces gradients in
  buckets, launched from post-accumulate-grad hooks during the last micro-batch's backward when
  ``overlap_grad_reduce`` is on.
- stage 1: as 0, plus `shard_optimizer_state`: each parameter has one owner rank in its group that
  keeps its optimizer state and updates it, then broadcasts the new values.
- stages 2 and 3: FSDP2 ``fully_shard`` (experts on ``dp``, dense modules on ``dp_ep``),
  resharding after forward only for stage 3.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Replicate, Shard

_BUCKET_BYTES = 25 * 1024 * 1024


def is_expert_param(name: str) -> bool:
    """Routed expert weights (sharded over EP); every other parameter is dense."""
    return ".experts." in f".{name}"


def local_tensor(t: Tensor) -> Tensor:
    """The data this rank holds (the local shard of a DTensor; differentiable, the same storage)."""
    return t.to_local() if isinstance(t, DTensor) else t


# --------------------------------------------------------------------------------------------
# Stage 0 / 1: bucketed gradient all-reduce
# --------------------------------------------------------------------------------------------


@dataclass
class _Bucket:
    params: list[nn.Parameter]
    ready: int = 0
    work: Any = None
    flat: Optional[Tensor] = None


@dataclass
class _GroupSync:
    group: dist.ProcessGroup
    buckets: list[_Bucket] = field(default_factory=list)
    launched: int = 0


class GradientSync:
    """Sum gradients over their data-parallel group: dense over dp_ep, experts over dp.

    Buckets are fixed at construction (parameters in reverse registration order, roughly the order
    backward produces them) and launched strictly in order, so every rank issues the same sequence
    of collectives. With `overlap` the hooks launch each bucket asynchronously as soon as all its
    gradients of the last micro-batch are accumulated; `finish` launches the rest and waits.
    """

    def __init__(self, named_params: Iterable[tuple[str, nn.Parameter]], dense_group: dist.ProcessGroup,
                 expert_group: dist.ProcessGroup, overlap: bool = True, bucket_bytes: int = _BUCKET_BYTES) -> None:
        self.overlap = overlap
        self.armed = False
        self.syncs: list[_GroupSync] = []
        self._where: dict[int, tuple[_GroupSync, _Bucket]] = {}
        params = [(n, p) for n, p in named_params if p.requires_grad]
        for group, select in ((dense_group, False), (expert_group, True)):
            chosen = [p for n, p in reversed(params) if is_expert_param(n) == select]
            if not chosen or dist.get_world_size(group) == 1:
                continue
            sync = _GroupSync(group)
            bucket: list[nn.Parameter] = []
            size = 0
            for p in chosen:
                bucket.append(p)
                size += local_tensor(p).numel() * local_tensor(p).element_size()
                if size >= bucket_bytes:
                    sync.buckets.append(_Bucket(bucket))
                    bucket, size = [], 0
            if bucket:
                sync.buckets.append(_Bucket(bucket))
            for b in sync.buckets:
                for p in b.params:
                    self._where[id(p)] = (sync, b)
            self.syncs.append(sync)
        if overlap:
            for sync in self.syncs:
                for b in sync.buckets:
                    for p in b.params:
                        p.register_post_accumulate_grad_hook(self._on_grad)

    def arm(self) -> None:
        """Call before the last micro-batch's backward: its gradients are final once accumulated."""
        self.armed = True
        for sync in self.syncs:
            sync.launched = 0
            for b in sync.buckets:
                b.ready, b.work, b.flat = 0, None, None

    def _on_grad(self, param: nn.Parameter) -> None:
        if not self.armed:
            return
        sync, bucket = self._where[id(param)]
        bucket.ready += 1
        self._launch_ready(sync)

    def _launch_ready(self, sync: _GroupSync, force: bool = False) -> None:
        while sync.launched < len(sync.buckets):
            b = sync.buckets[sync.launched]
            if not force and b.ready < len(b.params):
                return
            grads = []
            for p in b.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                grads.append(local_tensor(p.grad).reshape(-1))
            b.flat = torch.cat(grads)
            b.work = dist.all_reduce(b.flat, group=sync.group, async_op=True)
            sync.launched += 1

    def finish(self) -> None:
        """Launch what is left, wait for every bucket and write the summed gradients back."""
        if not self.armed:  # no overlap: nothing launched yet
            self.arm()
        for sync in self.syncs:
            self._launch_ready(sync, force=True)
            for b in sync.buckets:
                b.work.wait()
                offset = 0
                for p in b.params:
                    g = local_tensor(p.grad)
                    g.copy_(b.flat[offset:offset + g.numel()].view_as(g))
                    offset += g.numel()
                b.flat, b.work = None, None
        self.armed = False


# --------------------------------------------------------------------------------------------
# Stage 1: optimizer state sharded by parameter owner
# --------------------------------------------------------------------------------------------


def assign_owners(params: list[nn.Parameter], group_size: int) -> list[int]:
    """Greedy balance by size; the same order on every rank of the group gives the same owners.

    Sizes are global (DTensor) sizes, so TP peers, whose shards may differ by a row, choose the
    same owners and run the same collectives inside the optimizer step."""
    loads = [0] * group_size
    owners = []
    for p in params:
        rank = min(range(group_size), key=lambda r: (loads[r], r))
        owners.append(rank)
        loads[rank] += p.numel()
    return owners


class OptimizerStateSharding:
    """ZeRO-1 on an ordinary optimizer: only the owner of a parameter steps it (so only it creates
    optimizer state); the owner then broadcasts the new values to its group."""

    def __init__(self, optimizer: torch.optim.Optimizer, named_params: Iterable[tuple[str, nn.Parameter]],
                 dense_group: dist.ProcessGroup, expert_group: dist.ProcessGroup) -> None:
        self.optimizer = optimizer
        named = [(n, p) for n, p in named_params if p.requires_grad]
        self.groups: list[tuple[dist.ProcessGroup, list[nn.Parameter], list[int]]] = []
        self.owned: set[int] = set()
        for group, select in ((dense_group, False), (expert_group, True)):
            params = [p for n, p in named if is_expert_param(n) == select]
            size, me = dist.get_world_size(group), dist.get_rank(group)
            owners = assign_owners(params, size)
            self.owned.update(id(p) for p, o in zip(params, owners, strict=True) if o == me)
            if size > 1:
                self.groups.append((group, params, owners))
        self._stashed: list[tuple[nn.Parameter, Tensor]] = []
        optimizer.register_step_pre_hook(self._before_step)
        optimizer.register_step_post_hook(self._after_step)

    def owns(self, param: nn.Parameter) -> bool:
        return id(param) in self.owned

    def _before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._stashed = []
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None and not self.owns(p):
                    self._stashed.append((p, p.grad))
                    p.grad = None

    @torch.no_grad()
    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for p, g in self._stashed:
            p.grad = g
        self._stashed = []
        for group, params, owners in self.groups:
            for owner in range(dist.get_world_size(group)):
                mine = [local_tensor(p) for p, o in zip(params, owners, strict=True) if o == owner]
                if not mine:
                    continue
                flat = torch.cat([t.reshape(-1) for t in mine])
                dist.broadcast(flat, src=dist.get_global_rank(group, owner), group=group)
                offset = 0
                for t in mine:
                    t.copy_(flat[offset:offset + t.numel()].view_as(t))
                    offset += t.numel()


# --------------------------------------------------------------------------------------------
# Stages 2 / 3: FSDP2
# --------------------------------------------------------------------------------------------


def apply_fsdp(part: Any, dense_mesh: Any, expert_mesh: Any, reshard_after_forward: bool) -> nn.Module:
    """fully_shard the routed experts of a `DeepSeekV3` (or a stage of one) on `expert_mesh`, each
    block / MTP module and the root on `dense_mesh`. Reductions are sums (divide factor 1): the loss is already scaled."""
    from torch.distributed.fsdp import fully_shard

    units: list[nn.Module] = []
    for moe in part.moe_layers():
        if any(True for _ in moe.experts.parameters()):
            units.append(fully_shard(moe.experts, mesh=expert_mesh, reshard_after_forward=reshard_after_forward))
    for block in [*part.layers.values(), *part.mtp]:
        units.append(fully_shard(block, mesh=dense_mesh, reshard_after_forward=reshard_after_forward))
    # the root (embedding, final norm, head) stays gathered after forward: the loss applies the
    # head outside the model's forward, and backward needs these weights right away
    units.append(fully_shard(part, mesh=dense_mesh, reshard_after_forward=False))
    for unit in units:
        _sum_reduction(unit)
    return part


def _sum_reduction(module: Any) -> None:
    if hasattr(module, "set_gradient_divide_factor"):
        module.set_gradient_divide_factor(1.0)
    else:  # older FSDP2 spelling
        module.set_reduce_scatter_divide_factor(1.0)
    if hasattr(module, "set_force_sum_reduction_for_comms"):
        module.set_force_sum_reduction_for_comms(True)  # plain SUM collectives (gloo has no PREMUL_SUM)


# --------------------------------------------------------------------------------------------
# Global gradient norm
# --------------------------------------------------------------------------------------------


def replicated_dims(name: str, param: Tensor, mesh_dims: dict[str, tuple[str, ...]]) -> set[str]:
    """World-mesh axes over which this rank's piece of `param` is a copy of another rank's.

    Dense weights are copies over dp, ep and tp, routed experts over dp and tp, minus the axes
    their DTensor shards over (``mesh_dims`` maps flattened names such as dp_ep to their axes).
    Pipeline stages always hold different parameters.
    """
    dims = {"dp", "tp"} if is_expert_param(name) else {"dp", "ep", "tp"}
    if isinstance(param, DTensor):
        names = param.device_mesh.mesh_dim_names or ()
        for mesh_name, placement in zip(names, param.placements, strict=True):
            if isinstance(placement, Shard):
                dims -= set(mesh_dims.get(mesh_name, (mesh_name,)))
            elif not isinstance(placement, Replicate):
                raise RuntimeError(f"{name}: unexpected placement {placement} when computing the gradient norm")
    return dims


def global_grad_norm(named_params: Iterable[tuple[str, nn.Parameter]], coordinate: dict[str, int],
                     mesh_dims: dict[str, tuple[str, ...]], group: Optional[dist.ProcessGroup] = None,
                     norm_type: float = 2.0, device: Optional[torch.device] = None) -> Tensor:
    """L2 norm of all gradients of the whole model, over every stage and shard, each element once.

    Each rank sums the squares of the gradient pieces it holds, skipping a piece when it is a copy
    and this rank is not the first (coordinate 0) on the copying axes; one all-reduce adds it up.
    """
    if norm_type != 2.0:
        raise ValueError(f"only the L2 gradient norm is supported, got norm_type={norm_type}")
    total: Optional[Tensor] = None
    for name, p in named_params:
        if p.grad is None:
            continue
        grad = p.grad
        if isinstance(grad, DTensor) and any(not isinstance(pl, (Shard, Replicate)) for pl in grad.placements):
            grad = grad.redistribute(grad.device_mesh, [Replicate() if not isinstance(pl, Shard) else pl
                                                        for pl in grad.placements])
        dims = replicated_dims(name, grad if isinstance(grad, DTensor) else p, mesh_dims)
        if any(coordinate.get(d, 0) != 0 for d in dims):
            continue
        sq = local_tensor(grad).detach().float().pow(2).sum()
        total = sq if total is None else total + sq
    if total is None:
        total = torch.zeros((), dtype=torch.float32, device=device)
    if dist.is_initialized():
        dist.all_reduce(total, group=group)
    return total.sqrt()


@torch.no_grad()
def clip_grads_(params: Iterable[Tensor], max_norm: float, total_norm: Tensor) -> None:
    """Scale gradients in place so that their global norm is at most max_norm."""
    from lit_deepseek.training.optim import clip_coefficient

    coef = clip_coefficient(total_norm, max_norm)
    for p in params:
        if p.grad is not None:
            local_tensor(p.grad).mul_(coef.to(local_tensor(p.grad).device))
