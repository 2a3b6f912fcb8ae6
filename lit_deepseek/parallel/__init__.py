"""Parallelism applied from outside the model: mesh, TP, PP, EP, ZeRO, strategies, checkpoints.

Heavy modules (Lightning strategies, pipelining) are imported where used; import them from their
submodules, e.g. ``from lit_deepseek.parallel.strategy import DeepSeekStrategy``.
"""

from lit_deepseek.parallel.mesh import MESH_DIMS, Layout, build_mesh, resolve_layout, submesh, validate_layout

__all__ = ["MESH_DIMS", "Layout", "build_mesh", "resolve_layout", "submesh", "validate_layout"]
