"""The one place that turns `parallel:` into a device mesh.

Axes, outer to inner: ``pp, dp, ep, tp`` (TP innermost so its heavy collectives stay on the
fastest links). Routed experts are sharded over ``ep`` and replicated over ``dp``; every other
(dense) weight is data-parallel over ``ep x dp``, exposed as the flattened axis ``dp_ep``. TP peers
and PP stages of one replica read the same batch; the data rank is the index in ``dp_ep``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from lit_deepseek.config import ConfigError, DeepSeekConfig, ParallelConfig, validate_config

MESH_DIMS = ("pp", "dp", "ep", "tp")


@dataclass(frozen=True)
class Layout:
    """Resolved parallel degrees (no process group needed)."""

    pp: int
    dp: int
    ep: int
    tp: int

    @property
    def world_size(self) -> int:
        return self.pp * self.dp * self.ep * self.tp

    @property
    def data_parallel_size(self) -> int:
        """Ranks that read different data: EP x DP."""
        return self.dp * self.ep

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.pp, self.dp, self.ep, self.tp)

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


def resolve_layout(parallel: ParallelConfig, world_size: int) -> Layout:
    """Resolve ``data_parallel_size: -1`` and check the product against the world size."""
    mp = parallel.model_parallel_size()
    if parallel.data_parallel_size == -1:
        if world_size % mp:
            raise ConfigError(
                f"parallel: world size {world_size} is not divisible by TP x PP x EP = {parallel.tensor_parallel_size} x "
                f"{parallel.pipeline_parallel_size} x {parallel.expert_parallel_size} = {mp}")
        dp = world_size // mp
    else:
        dp = parallel.data_parallel_size
    layout = Layout(pp=parallel.pipeline_parallel_size, dp=dp, ep=parallel.expert_parallel_size,
                    tp=parallel.tensor_parallel_size)
    if layout.world_size != world_size:
        raise ConfigError(
            f"parallel: TP x PP x EP x DP = {layout.tp} x {layout.pp} x {layout.ep} x {layout.dp} = {layout.world_size} "
            f"but the world size is {world_size} (trainer.devices x trainer.num_nodes)")
    return layout


def validate_layout(cfg: DeepSeekConfig, world_size: int) -> Layout:
    """Check every layout rule before any process group exists; returns the resolved layout.

    DeepEP requests that cannot work are not errors: the dispatcher falls back with one warning
    (see `lit_deepseek.parallel.expert.make_dispatcher`).
    """
    validate_config(cfg, world_size)
    return resolve_layout(cfg.parallel, world_size)


def build_mesh(parallel: ParallelConfig, world_size: int, device_type: str = "cpu") -> DeviceMesh:
    """The 4D mesh (pp, dp, ep, tp) plus the flattened ``dp_ep`` axis.

    Needs an initialised default process group. Sub-meshes: ``mesh["tp"]``, ``mesh["ep"]``,
    ``mesh["dp"]``, ``mesh["pp"]`` and ``submesh(mesh, "dp_ep")`` (dense data parallelism).
    """
    layout = resolve_layout(parallel, world_size)
    mesh = init_device_mesh(device_type, layout.shape, mesh_dim_names=MESH_DIMS)
    _FLATTENED[id(mesh)] = mesh["dp", "ep"]._flatten("dp_ep")
    return mesh


_FLATTENED: dict[int, DeviceMesh] = {}


def submesh(mesh: DeviceMesh, name: str) -> DeviceMesh:
    """A named 1D sub-mesh of a `build_mesh` mesh: pp, dp, ep, tp or the flattened dp_ep."""
    if name == "dp_ep" and id(mesh) in _FLATTENED:
        return _FLATTENED[id(mesh)]
    return mesh[name]


def mesh_layout(mesh: DeviceMesh) -> Layout:
    """The degrees of a mesh built by `build_mesh`."""
    sizes = dict(zip(mesh.mesh_dim_names or (), mesh.shape, strict=True))
    return Layout(pp=sizes["pp"], dp=sizes["dp"], ep=sizes["ep"], tp=sizes["tp"])


def local_coordinate(mesh: DeviceMesh) -> dict[str, int]:
    """This rank's coordinate on each axis."""
    return {name: mesh.get_local_rank(name) for name in MESH_DIMS}

