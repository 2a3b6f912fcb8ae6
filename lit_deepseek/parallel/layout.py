"""The resolved parallel layout: one frozen object, built once from the config and the world size.

`resolve_layout(cfg, world_size)` is the one place that resolves ``data_parallel_size: -1``,
derives the batch arithmetic (data-parallel size, accumulation steps = pipeline micro-batches)
and the pipeline's layer split, and checks every rule that joins sections, each failing with one
line naming the field. The strategy, the plan, the pipeline, the data module and the summary read
the `Layout`; none re-derives a number from the config.

Mesh axes, outer to inner: ``pp, dp, ep, tp`` (TP innermost so its heavy collectives stay on the
fastest links). Routed experts are sharded over ``ep`` and replicated over ``dp``; every other
(dense) weight is data-parallel over ``ep x dp``, the flattened axis ``dp_ep``. TP peers and PP
stages of one replica read the same batch; the data rank is the index in ``dp_ep``.
`Layout.build_mesh` creates the device mesh once (after the default process group exists) and
caches it with its sub-meshes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

from lit_deepseek.config import ConfigError, DeepSeekConfig, ParallelConfig

if TYPE_CHECKING:
    import torch
    from torch.distributed.device_mesh import DeviceMesh

MESH_DIMS = ("pp", "dp", "ep", "tp")
V_SCHEDULES = ("zbv", "dualpipev")
SINGLE_STAGE_SCHEDULES = ("gpipe", "1f1b")


def layout_degrees(parallel: ParallelConfig, world_size: Optional[int] = None) -> tuple[int, int, int, int]:
    """(TP, PP, EP, DP), DP = -1 resolved against world_size (1 when the world size is unknown)."""
    tp, pp, ep = parallel.tensor_parallel_size, parallel.pipeline_parallel_size, parallel.expert_parallel_size
    dp = parallel.data_parallel_size
    if dp == -1:
        dp = max(1, world_size // (tp * pp * ep)) if world_size is not None else 1
    return tp, pp, ep, dp


def layer_split(num_layers: int, num_stages: int, explicit: Optional[list[int]] = None) -> tuple[tuple[int, ...], ...]:
    """Global layer indices of each pipeline stage: the explicit counts, or an even split."""
    if explicit is not None:
        if len(explicit) != num_stages:
            raise ConfigError(f"parallel.pipeline_layer_split: needs {num_stages} entries (PP x virtual stages), "
                              f"got {len(explicit)}")
        if sum(explicit) != num_layers or min(explicit) < 0:
            raise ConfigError(f"parallel.pipeline_layer_split: entries must be >= 0 and sum to model.num_layers "
                              f"({num_layers}), got {list(explicit)}")
        counts = list(explicit)
    else:
        if num_layers < num_stages:
            raise ConfigError(f"parallel.pipeline_parallel_size: model.num_layers ({num_layers}) is fewer than "
                              f"PP x virtual stages ({num_stages})")
        if num_layers % num_stages:
            raise ConfigError(f"parallel.pipeline_parallel_size: model.num_layers ({num_layers}) must be divisible "
                              f"by PP x virtual stages ({num_stages}), or set parallel.pipeline_layer_split")
        counts = [num_layers // num_stages] * num_stages
    out, start = [], 0
    for n in counts:
        out.append(tuple(range(start, start + n)))
        start += n
    return tuple(out)


def accumulation_steps(global_batch_size: int, micro_batch_size: int, data_parallel_size: int) -> int:
    """Micro-batches per optimizer step on each data-parallel rank (the one global-batch rule)."""
    per_step = micro_batch_size * data_parallel_size
    if global_batch_size % per_step:
        raise ConfigError(f"training.global_batch_size: {global_batch_size} must be divisible by "
                          f"training.micro_batch_size x data-parallel ranks = {micro_batch_size} x "
                          f"{data_parallel_size} = {per_step}")
    return global_batch_size // per_step


def plain_local_weights(tp: int, pp: int, zero_stage: int) -> bool:
    """Whether every rank's weights are plain local tensors that live through the whole step: no
    tensor parallelism (DTensors), no pipeline (interleaved micro-batches) and ZeRO 0 or 1 (FSDP2 frees
    and refills unsharded parameters at stages 2 and 3). FP8 weight reuse across micro-batches
    (`lit_deepseek.kernels.fp8.micro_batch_reuse`) applies only then."""
    return tp == 1 and pp == 1 and zero_stage < 2


@dataclass(frozen=True)
class Layout:
    """Every number derived from the ``parallel`` and ``training`` sections and the world size."""

    pp: int
    dp: int
    ep: int
    tp: int
    micro_batch_size: int = 1
    global_batch_size: int = 1
    schedule: str = "1f1b"
    virtual_stages: int = 1
    sequence_parallel: bool = False
    zero_stage: int = 0
    overlap_grad_reduce: bool = True
    stage_layers: tuple[tuple[int, ...], ...] = ()
    """Global layer indices of each pipeline stage (empty without pipeline parallelism)."""
    _meshes: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    # ------------------------------------------------------------------ sizes
    @property
    def world_size(self) -> int:
        return self.pp * self.dp * self.ep * self.tp

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.pp, self.dp, self.ep, self.tp)

    @property
    def data_parallel_size(self) -> int:
        """Ranks that read different data: EP x DP."""
        return self.dp * self.ep

    @property
    def accumulation_steps(self) -> int:
        """Micro-batches per optimizer step on each data-parallel rank (the pipeline's micro-batches)."""
        return self.global_batch_size // (self.micro_batch_size * self.data_parallel_size)

    @property
    def num_stages(self) -> int:
        return self.pp * self.virtual_stages

    # ------------------------------------------------------------------ ranks
    def coordinate(self, rank: int) -> dict[str, int]:
        """Mesh coordinate of a global rank (row-major over pp, dp, ep, tp)."""
        coords: dict[str, int] = {}
        for name, size in zip(reversed(MESH_DIMS), reversed(self.shape), strict=True):
            coords[name] = rank % size
            rank //= size
        return {name: coords[name] for name in MESH_DIMS}

    def data_parallel_rank(self, rank: int) -> int:
        """Index of a global rank in the flattened dp_ep axis (which slice of the batch it reads)."""
        c = self.coordinate(rank)
        return c["dp"] * self.ep + c["ep"]

    def stage_indices(self, pp_rank: int) -> list[int]:
        """Stages held by a pipeline rank: loop order (rank r holds r, r + PP, ...) or V order."""
        if self.schedule in V_SCHEDULES:
            return [pp_rank, 2 * self.pp - 1 - pp_rank]
        return [pp_rank + v * self.pp for v in range(self.virtual_stages)]

    # ------------------------------------------------------------------ mesh
    def build_mesh(self, device_type: str = "cpu") -> DeviceMesh:
        """The 4D mesh (pp, dp, ep, tp) and the flattened ``dp_ep`` axis, built once and cached.

        Needs an initialised default process group whose size is `world_size`.
        """
        if "world" not in self._meshes:
            from torch.distributed.device_mesh import init_device_mesh

            mesh = init_device_mesh(device_type, self.shape, mesh_dim_names=MESH_DIMS)
            self._meshes["world"] = mesh
            self._meshes["dp_ep"] = mesh["dp", "ep"]._flatten("dp_ep")
            for name in MESH_DIMS:
                self._meshes[name] = mesh[name]
        return self._meshes["world"]

    @property
    def mesh(self) -> DeviceMesh:
        if "world" not in self._meshes:
            raise RuntimeError("Layout.mesh: call build_mesh(device_type) once the process group exists")
        return self._meshes["world"]

    def submesh(self, name: str) -> DeviceMesh:
        """A 1D sub-mesh: pp, dp, ep, tp or the flattened dp_ep."""
        self.mesh  # noqa: B018 - raises when no mesh was built
        return self._meshes[name]

    def device(self) -> torch.device:
        """This rank's device for the mesh's device type."""
        import torch

        kind = self.mesh.device_type
        return torch.device(kind, torch.cuda.current_device()) if kind == "cuda" else torch.device(kind)

    def local_coordinate(self) -> dict[str, int]:
        """This rank's coordinate on each axis."""
        return {name: self.mesh.get_local_rank(name) for name in MESH_DIMS}

    def local_data_parallel_rank(self) -> int:
        """This rank's index in dp_ep: which slice of every global batch it reads."""
        return self.submesh("dp_ep").get_local_rank()


def resolve_layout(cfg: DeepSeekConfig, world_size: Optional[int] = None) -> Layout:
    """The layout of `cfg` on `world_size` processes; ConfigError (one line) for any rule it breaks.

    Without a world size (a summary of a config alone), DP = -1 counts as 1 and the world-size
    rules are skipped. Needs no process group: call it before any exists.
    """
    m, p, t = cfg.model, cfg.parallel, cfg.training
    tp, pp, ep, dp = layout_degrees(p, world_size)
    heads, experts = m.mla.num_heads, m.moe.num_experts
    if heads % tp:
        raise ConfigError(f"parallel.tensor_parallel_size: model.mla.num_heads ({heads}) must be divisible by TP ({tp})")
    if tp > 1 and p.sequence_parallel and t.seq_length % tp:
        raise ConfigError(f"training.seq_length: {t.seq_length} must be divisible by TP ({tp}) under "
                          f"parallel.sequence_parallel")
    if experts % ep:
        raise ConfigError(f"parallel.expert_parallel_size: model.moe.num_experts ({experts}) must be divisible by EP ({ep})")
    schedule, vpp = p.pipeline_schedule, p.virtual_pipeline_stages
    if schedule in V_SCHEDULES and vpp != 2:
        raise ConfigError(f"parallel.virtual_pipeline_stages: schedule {schedule} needs exactly 2 stages per rank, got {vpp}")
    if schedule == "interleaved_1f1b" and vpp < 2:
        raise ConfigError(f"parallel.virtual_pipeline_stages: interleaved_1f1b needs >= 2 stages per rank, got {vpp}")
    if schedule in SINGLE_STAGE_SCHEDULES and vpp != 1:
        raise ConfigError(f"parallel.virtual_pipeline_stages: schedule {schedule} takes 1 stage per rank, got {vpp}")
    stage_layers: tuple[tuple[int, ...], ...] = ()
    if pp > 1 or p.pipeline_layer_split is not None:
        stage_layers = layer_split(m.num_layers, pp * vpp, p.pipeline_layer_split)
    if world_size is not None:
        mp = tp * pp * ep
        if p.data_parallel_size == -1 and world_size % mp:
            raise ConfigError(f"parallel: world size {world_size} is not divisible by TP x PP x EP = "
                              f"{tp} x {pp} x {ep} = {mp}")
        if mp * dp != world_size:
            raise ConfigError(f"parallel: TP x PP x EP x DP = {tp} x {pp} x {ep} x {dp} = {mp * dp} "
                              f"but the world size is {world_size} (trainer.devices x trainer.num_nodes)")
    n_micro = accumulation_steps(t.global_batch_size, t.micro_batch_size, dp * ep)
    if pp > 1 and schedule != "gpipe" and n_micro < pp:
        raise ConfigError(f"training.global_batch_size: pipeline schedule {schedule} needs at least PP ({pp}) "
                          f"micro-batches per step on each data-parallel rank, got {n_micro}")
    if pp > 1 and schedule == "interleaved_1f1b" and n_micro % pp:
        raise ConfigError(f"training.global_batch_size: interleaved_1f1b needs the micro-batch count ({n_micro}) "
                          f"to be a multiple of PP ({pp})")
    if pp > 1:
        from lit_deepseek.parallel.pipeline import available_schedules

        if schedule not in available_schedules():
            import torch

            raise ConfigError(f"parallel.pipeline_schedule: {schedule!r} is not provided by torch {torch.__version__} "
                              f"(available: {', '.join(available_schedules())})")
    return Layout(pp=pp, dp=dp, ep=ep, tp=tp, micro_batch_size=t.micro_batch_size,
                  global_batch_size=t.global_batch_size, schedule=schedule, virtual_stages=vpp,
                  sequence_parallel=p.sequence_parallel and tp > 1, zero_stage=p.zero_stage,
                  overlap_grad_reduce=p.overlap_grad_reduce, stage_layers=stage_layers)


__all__ = ["MESH_DIMS", "Layout", "accumulation_steps", "layer_split", "layout_degrees", "resolve_layout"]
