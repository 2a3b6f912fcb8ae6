"""`parallelize(model, layout, config)`: the one ordered function that applies a layout to a plain model.

In this order, each step working on what the previous ones left:

1. pipeline split (PP): this rank's stages, copies of the model holding only their layers;
2. token dispatcher and expert sharding (EP): each part keeps its EP rank's routed experts;
3. tensor parallelism (TP, optionally sequence parallel): DTensor plans on attention and FFNs;
4. activation checkpointing (``training.activation_checkpointing``);
5. FP8 (``training.use_fp8``, ``fp8_recipe``, ``fp8_expert_wgrad``, ``fp8_exclude``): linear layers (tensor-parallel
   ones shard by shard) and routed experts, except the excluded modules;
6. regional compile (``training.compile``);
7. FSDP (ZeRO-2/3): experts over ``dp``, dense modules over ``dp_ep``.

Without a layout (one process) only steps 4-6 apply. What was applied is recorded on the returned
`ParallelModel` handle, not on the modules: the model code stays single-device code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

from torch import nn

from lit_deepseek.config import DeepSeekConfig
from lit_deepseek.parallel.layout import Layout

if TYPE_CHECKING:
    from lit_deepseek.parallel.pipeline import PipelineHandle


@dataclass
class ParallelModel:
    """The handle `parallelize` returns: the parallelised model and what was done to it."""

    model: nn.Module
    """What the plan's steps are called on: the model, or `PipelineStages` under PP."""
    parts: list[nn.Module]
    """The modules holding this rank's parameters (one per pipeline stage held)."""
    pipeline: Optional[PipelineHandle] = None
    vocab_parallel: bool = False
    """The output head holds a vocabulary shard: the loss runs under `loss_parallel`."""
    tied_copies: list[set[str]] = field(default_factory=list)
    """Per part, names of parameters that copy another stage's (the last stage's embedding)."""


class PipelineStages(nn.Module):
    """This rank's pipeline stages (what `parallelize` returns as the model under PP).

    Run them through the plan (`forward_backward`, `evaluate`): a stage alone cannot compute the
    model's output.
    """

    def __init__(self, parts: list[nn.Module]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self, *args: object, **kwargs: object) -> None:
        raise RuntimeError("a pipeline-parallel model runs through its plan: plan.forward_backward / plan.evaluate")


def parallelize(model: nn.Module, layout: Optional[Layout], cfg: DeepSeekConfig) -> ParallelModel:
    """Apply `layout` (None: one process) and the training section's model transforms to `model`.

    `model` is a plain `DeepSeekV3`, materialised (every rank initialised identically) or on the
    meta device (call `init_weights` on each part afterwards: expert initialisation depends on
    global ids). Needs `layout.build_mesh` to have run.
    """
    t = cfg.training
    handle = ParallelModel(model, [model], tied_copies=[set()])

    # 1. pipeline stages
    if layout is not None and layout.pp > 1:
        from lit_deepseek.parallel.pipeline import build_pipeline

        pipeline = build_pipeline(model, layout, device=layout.device())
        parts = list(pipeline.stage_modules)
        tied = {id(q) for q in pipeline.tied_copies()}
        handle = ParallelModel(PipelineStages(parts), parts, pipeline,
                               tied_copies=[{n for n, q in part.named_parameters() if id(q) in tied} for part in parts])

    # 2. expert parallelism: the dispatcher and this rank's experts
    if layout is not None and (layout.ep > 1 or cfg.model.moe.use_deep_ep):
        from lit_deepseek.parallel.expert import make_dispatcher

        dispatcher = make_dispatcher(cfg.model, layout.submesh("ep").get_group() if layout.ep > 1 else None)
        start, end = dispatcher.local_expert_range(cfg.model.moe.num_experts)
        for part in handle.parts:
            part.set_dispatcher(dispatcher)
            for moe in part.moe_layers():
                if (moe.experts.expert_start, moe.experts.num_local_experts) != (start, end - start):
                    moe.shard_experts(start, end)
    if layout is not None and (layout.ep > 1 or layout.dp > 1):
        from lit_deepseek.parallel.expert import keep_experts_in_graph

        for part in handle.parts:
            keep_experts_in_graph(part)

    # 3. tensor parallelism
    if layout is not None and layout.tp > 1:
        from lit_deepseek.parallel.tensor import apply_tensor_parallel, is_vocab_parallel

        for part in handle.parts:
            apply_tensor_parallel(part, layout.submesh("tp"), sequence_parallel=layout.sequence_parallel)
        handle.vocab_parallel = any(is_vocab_parallel(part) for part in handle.parts)

    # 4. activation checkpointing
    if t.activation_checkpointing != "none":
        from lit_deepseek.training.checkpointing import apply_activation_checkpointing

        for part in handle.parts:
            apply_activation_checkpointing(part, t.activation_checkpointing)

    # 5. FP8
    if t.use_fp8:
        _apply_fp8(handle.parts, cfg)

    # 6. regional compile
    if t.compile:
        from lit_deepseek.kernels.compile import compile_blocks

        for part in handle.parts:
            compile_blocks(part)

    # 7. FSDP (ZeRO-2/3)
    if layout is not None and layout.zero_stage >= 2:
        from lit_deepseek.parallel.zero import apply_fsdp

        for part in handle.parts:
            apply_fsdp(part, layout.submesh("dp_ep"), layout.submesh("dp"), reshard_after_forward=layout.zero_stage == 3)
    return handle


def _apply_fp8(parts: list[nn.Module], cfg: DeepSeekConfig) -> None:
    """Convert every part with the configured recipe and exclusions (tensor-parallel layers too:
    their DTensor weights are multiplied shard by shard)."""
    from lit_deepseek.kernels.fp8 import convert_to_fp8

    for part in parts:
        convert_to_fp8(part, recipe=cfg.training.fp8_recipe, exclude=cfg.training.fp8_exclude,
                       expert_wgrad=cfg.training.fp8_expert_wgrad)


__all__ = ["ParallelModel", "PipelineStages", "parallelize"]
