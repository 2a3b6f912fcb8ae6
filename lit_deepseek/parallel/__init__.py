"""Parallelism applied from outside the model: layout, parallelize, TP, PP, EP, ZeRO, strategies, checkpoints.

`layout.resolve_layout` turns the config and the world size into the one `Layout`;
`parallelize.parallelize` applies it to a plain model in one documented order; `plan.DistributedPlan`
runs the shipped training step on it. Heavy modules (Lightning strategies, pipelining) are imported
where used; import them from their submodules, e.g. ``from lit_deepseek.parallel.strategy import
DeepSeekStrategy``.
"""

from lit_deepseek.parallel.layout import MESH_DIMS, Layout, resolve_layout

__all__ = ["MESH_DIMS", "Layout", "resolve_layout"]
