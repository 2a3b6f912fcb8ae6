"""Distributed checkpoints that any layout can load.

Every tensor is stored under its single-process name (``layers.3.attn.kv_b_proj.weight``) with
its full logical shape; each rank writes only the pieces it holds, through
`torch.distributed.checkpoint` (DCP):

- TP and FSDP parameters are DTensors already: DCP records their shards,
- routed experts, which each EP rank holds a slice of, are presented as a DTensor sharded over
  the ``ep`` axis (gathered over ``dp`` first when FSDP shards them further),
- pipeline stages simply contribute the layers they hold.

Loading builds the same view for the *current* layout and lets DCP read the overlapping pieces,
so a checkpoint saved under TP2 x PP2 resumes under EP2 x DP2 or on one process. AdamW state
(``exp_avg``, ``exp_avg_sq``, ``step``) is stored the same way under ``optim.<name>.<key>``;
under ZeRO-1 only each parameter's owner writes and reads it.

Saving is atomic: everything goes to ``<dir>.tmp`` and is renamed when complete, so a crash
never damages the last good checkpoint.
"""

from __future__ import annotations

import os
import pickle
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Shard

from lit_deepseek.parallel.plan import DistributedPlan
from lit_deepseek.parallel.zero import is_expert_param

_ADAM_KEYS = ("exp_avg", "exp_avg_sq")
EXTRA_KEY = "extra"
GROUPS_KEY = "optim_param_groups"


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def _is_rank_zero() -> bool:
    return not _distributed() or dist.get_rank() == 0


class _Entry:
    """One named tensor: the checkpoint view and how to write loaded values back."""

    def __init__(self, name: str, target: Tensor, plan: Any) -> None:
        self.name = name
        self.target = target
        self.aliases: list[Tensor] = []
        self.expert = is_expert_param(name) and isinstance(plan, DistributedPlan) and plan.layout.ep > 1
        self.fsdp_expert = is_expert_param(name) and isinstance(target, DTensor)
        self.plan = plan

    def view(self) -> Tensor:
        """The tensor as the checkpoint stores it (full logical shape, this rank's pieces)."""
        t = self.target.detach()
        if not (self.expert or self.fsdp_expert):
            return t
        local = t.full_tensor() if isinstance(t, DTensor) else t  # gather the FSDP shards over dp
        if self.expert:
            return DTensor.from_local(local.contiguous(), self.plan.layout.submesh("ep"), [Shard(0)], run_check=False)
        return local

    @torch.no_grad()
    def write_back(self, loaded: Tensor) -> None:
        """Copy a loaded view into the live tensor (and its aliases)."""
        if self.expert or self.fsdp_expert:
            full = loaded.to_local() if isinstance(loaded, DTensor) else loaded
            if isinstance(self.target, DTensor):  # FSDP: keep this rank's rows of the expert slice
                mesh = self.target.device_mesh
                shard = full.chunk(mesh.size(), dim=0)[mesh.get_local_rank()]
                self.target.to_local().copy_(shard)
            else:
                self.target.copy_(full)
        elif loaded is not self.target:
            self.target.copy_(loaded)
        for alias in self.aliases:
            alias.copy_(self.target)


def _model_entries(parts: Iterable[nn.Module], plan: Any) -> dict[str, _Entry]:
    entries: dict[str, _Entry] = {}
    for part in parts:
        for name, tensor in part.state_dict(keep_vars=True).items():
            if name in entries:  # a stage's copy of another stage's weight (pipeline-tied embedding)
                entries[name].aliases.append(tensor.detach())
            else:
                entries[name] = _Entry(name, tensor, plan)
    return entries


def _param_names(parts: Iterable[nn.Module]) -> list[tuple[str, nn.Parameter]]:
    seen: set[str] = set()
    out = []
    for part in parts:
        for name, p in part.named_parameters():
            if name not in seen:
                seen.add(name)
                out.append((name, p))
    return out


def _has_optimizer_state(p: nn.Parameter, plan: Any) -> bool:
    sharding = plan.optimizer_sharding if isinstance(plan, DistributedPlan) else None
    return sharding is None or sharding.owns(p)


def _optimizer_entries(optimizer: torch.optim.Optimizer, parts: list[nn.Module], plan: Any,
                       create: bool) -> dict[str, _Entry]:
    """AdamW state per parameter name; with `create`, fresh zero state where the layout needs it."""
    entries: dict[str, _Entry] = {}
    for name, p in _param_names(parts):
        if not _has_optimizer_state(p, plan):
            continue
        state = optimizer.state.get(p)
        if not state:
            if not create:
                continue
            state = {"step": torch.zeros((), dtype=torch.float32),
                     **{k: torch.zeros_like(p, memory_format=torch.preserve_format) for k in _ADAM_KEYS}}
            optimizer.state[p] = state
        for key, value in state.items():
            if isinstance(value, Tensor):
                entries[f"optim.{name}.{key}"] = _Entry(name, value, plan) if key != "step" else \
                    _Entry(f"optim.{name}.step", value, None)
    return entries


def _state(entries: dict[str, _Entry]) -> dict[str, Any]:
    return {key: entry.view() for key, entry in entries.items()}


def save_checkpoint(path: Union[str, os.PathLike], model_parts: list[nn.Module],
                    optimizer: Optional[torch.optim.Optimizer] = None, plan: Any = None,
                    extra: Optional[dict] = None) -> Path:
    """Write a layout-independent checkpoint folder (atomically: ``<path>.tmp``, then renamed)."""
    final = Path(path)
    tmp = final.with_name(final.name + ".tmp")
    if _is_rank_zero():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
    _barrier()
    state = _state(_model_entries(model_parts, plan))
    if optimizer is not None:
        state.update(_state(_optimizer_entries(optimizer, model_parts, plan, create=False)))
        groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.state_dict()["param_groups"]]
        state[GROUPS_KEY] = pickle.dumps(groups)
    state[EXTRA_KEY] = pickle.dumps(dict(extra or {}))  # opaque bytes: DCP would flatten a dict
    dcp.save(state, checkpoint_id=str(tmp))
    _barrier()
    if _is_rank_zero():
        old = final.with_name(final.name + ".old")
        if final.exists():  # a folder, or a file left by a single-process run in the same directory
            remove_path(old)
            final.rename(old)
        tmp.rename(final)
        remove_path(old)
    _barrier()
    return final


def remove_path(path: Path) -> None:
    """Delete a checkpoint, whether a folder (distributed) or a file (single process); missing is fine."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def load_checkpoint(path: Union[str, os.PathLike], model_parts: list[nn.Module],
                    optimizer: Optional[torch.optim.Optimizer] = None, plan: Any = None) -> dict:
    """Load a checkpoint written under any layout into this rank's parts (and optimizer).

    Returns the ``extra`` dict given to `save_checkpoint`.
    """
    path = Path(path)
    if not (path / ".metadata").is_file():
        raise FileNotFoundError(f"checkpoint: {path} is not a distributed checkpoint folder (no .metadata)")
    entries = _model_entries(model_parts, plan)
    if optimizer is not None:
        entries.update(_optimizer_entries(optimizer, model_parts, plan, create=True))
    state = _state(entries)
    state[EXTRA_KEY] = b""
    if optimizer is not None:
        state[GROUPS_KEY] = b""
    dcp.load(state, checkpoint_id=str(path))
    for key, entry in entries.items():
        entry.write_back(state[key])
    if optimizer is not None:
        for group, saved in zip(optimizer.param_groups, _unpickle(state[GROUPS_KEY]), strict=False):
            group.update(saved)
    return _unpickle(state[EXTRA_KEY])


def _unpickle(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):
        return pickle.loads(value)
    if hasattr(value, "getvalue"):  # BytesIO
        return pickle.loads(value.getvalue())
    return value
