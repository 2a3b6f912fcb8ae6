"""Tensor parallelism: DTensor plans applied from outside to an unmodified `DeepSeekV3`.

Layout over the ``tp`` mesh axis (Megatron-style, expressed with `parallelize_module`):

* MLA: the query up-projection (``q_b_proj``, or ``q_proj`` without a query latent) and the KV
  up-projection ``kv_b_proj`` are column-parallel, so each rank holds whole heads; ``o_proj`` is
  row-parallel. The latent down-projections (``q_a_proj``, ``kv_a_proj_with_mqa`` with the shared
  rotary key) and their norms see the full input and stay plain, identical on every TP rank.
* Dense SwiGLU and the shared experts: gate/up column-parallel, down row-parallel.
* Routed experts and the router are not TP-sharded: every TP rank routes the full token set of its
  sequence and runs its (EP-local) experts; expert parallelism shards them.
* Embedding: vocabulary-parallel (row-wise); head: column-wise with vocabulary-sharded logits, so
  the cross-entropy runs on the shards under `loss_parallel` (see `vocab_parallel_loss`).
* Sequence parallelism (optional): norms run on sequence shards; the residual stream between
  blocks is a local tensor holding this rank's S/TP positions. Attention, the dense FFN and the MoE
  gather the sequence on entry; row-parallel outputs are reduce-scattered back to shards. The MoE
  gathers the whole sequence because its sequence-wise balance loss needs every position.

Parameters left as plain tensors (router, routed experts, latent projections and, without sequence
parallelism, the norms) hold the same values and receive the same gradients on every TP rank: a
global gradient norm counts them once per TP group, DTensor parameters through DTensor semantics.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
    loss_parallel,
    parallelize_module,
)
from torch.distributed.tensor.parallel.style import ParallelStyle
from torch.distributed.tensor.placement_types import Placement

from lit_deepseek.parallel.zero import local_tensor
from lit_deepseek.training.loss import LossParts
from lit_deepseek.training.step import LossFn


class ReplicateParallel(ParallelStyle):
    """Parameters replicated as DTensors; the (first) input arrives with `input_layout` and is
    computed on replicated, the output handed on with `output_layout` (as a local tensor).

    Used where a plain layer sits between sequence-sharded tensors (the MTP concatenation
    projection under sequence parallelism): gathering the sequence first keeps every rank's
    weight gradient complete and identical.
    """

    def __init__(self, input_layout: Optional[Placement] = None, output_layout: Optional[Placement] = None,
                 use_local_output: bool = True) -> None:
        super().__init__()
        self.input_layout = input_layout if input_layout is not None else Replicate()
        self.output_layout = output_layout if output_layout is not None else Replicate()
        self.use_local_output = use_local_output

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        in_layout, out_layout, use_local = self.input_layout, self.output_layout, self.use_local_output

        def partition(name: str, mod: nn.Module, mesh: DeviceMesh) -> None:
            for pname, param in list(mod.named_parameters(recurse=False)):
                dist_param = nn.Parameter(distribute_tensor(param, mesh, [Replicate()]),
                                          requires_grad=param.requires_grad)
                mod.register_parameter(pname, dist_param)

        def input_fn(mod: nn.Module, inputs: tuple, mesh: DeviceMesh) -> tuple:
            first, *rest = inputs
            if not isinstance(first, DTensor):
                first = DTensor.from_local(first, mesh, [in_layout], run_check=False)
            return (first.redistribute(placements=[Replicate()]), *rest)

        def output_fn(mod: nn.Module, outputs: Any, mesh: DeviceMesh) -> Any:
            if isinstance(outputs, DTensor):
                outputs = outputs.redistribute(placements=[out_layout])
                return outputs.to_local() if use_local else outputs
            return outputs

        return distribute_module(module, device_mesh, partition, input_fn, output_fn)  # type: ignore[arg-type]


class _AllReduceGradColumns(torch.autograd.Function):
    """Identity in forward; in backward, sums the gradient of columns [start:] over a group."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, start: int, group: Any) -> Tensor:
        ctx.start, ctx.group = start, group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        grad = grad.clone()
        part = grad[..., ctx.start:].contiguous()
        dist.all_reduce(part, group=ctx.group)
        grad[..., ctx.start:] = part
        return grad, None, None


class RotaryKeyGradSum(ParallelStyle):
    """For `kv_a_proj_with_mqa`: its output's last columns are the rotary key shared by all heads.

    Each TP rank uses it for its own heads only, so its gradient is a partial sum per rank (the
    latent columns are already complete: they pass through the column-parallel `kv_b_proj`,
    whose input gradient is all-reduced). Summing those columns over TP keeps the replicated
    down-projection and everything upstream exact.
    """

    def __init__(self, start: int) -> None:
        super().__init__()
        self.start = start

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        group, start = device_mesh.get_group(), self.start
        module.register_forward_hook(lambda mod, inputs, out: _AllReduceGradColumns.apply(out, start, group))
        return module


def _block_plan(block: nn.Module, sequence_parallel: bool) -> dict[str, ParallelStyle]:
    from lit_deepseek.model.moe import MoE

    seq = Shard(1) if sequence_parallel else Replicate()
    plan: dict[str, ParallelStyle] = {}
    attn = block.attn
    if sequence_parallel:
        plan["attn_norm"] = SequenceParallel()
        plan["ffn_norm"] = SequenceParallel()
        # attn(x, cos, sin, mask): gather the sequence of x, leave the rest alone
        plan["attn"] = PrepareModuleInput(input_layouts=(Shard(1), None, None, None),
                                          desired_input_layouts=(Replicate(), None, None, None),
                                          use_local_output=True)
        plan["ffn"] = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),),
                                         use_local_output=True)
    plan["attn.q_b_proj" if hasattr(attn, "q_b_proj") else "attn.q_proj"] = ColwiseParallel()
    plan["attn.kv_b_proj"] = ColwiseParallel()
    plan["attn.kv_a_proj_with_mqa"] = RotaryKeyGradSum(start=attn.d_latent)
    plan["attn.o_proj"] = RowwiseParallel(output_layouts=seq)
    if isinstance(block.ffn, MoE):
        if block.ffn.shared_experts is not None:
            plan["ffn.shared_experts.gate_proj"] = ColwiseParallel()
            plan["ffn.shared_experts.up_proj"] = ColwiseParallel()
            plan["ffn.shared_experts.down_proj"] = RowwiseParallel(output_layouts=Replicate())
        if sequence_parallel:
            # the MoE output is full and identical on every TP rank: keep this rank's positions
            plan["ffn"] = _Sequential(plan["ffn"], PrepareModuleOutput(
                output_layouts=(Replicate(),), desired_output_layouts=(Shard(1),), use_local_output=True))
    else:
        plan["ffn.gate_proj"] = ColwiseParallel()
        plan["ffn.up_proj"] = ColwiseParallel()
        plan["ffn.down_proj"] = RowwiseParallel(output_layouts=seq)
    return plan


class _Sequential(ParallelStyle):
    """Apply several styles to one module (input preparation plus output preparation)."""

    def __init__(self, *styles: ParallelStyle) -> None:
        super().__init__()
        self.styles = styles

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        for style in self.styles:
            module = style._apply(module, device_mesh)
        return module


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh, sequence_parallel: bool = True,
                          loss_parallel: bool = True) -> nn.Module:
    """Shard a `DeepSeekV3` (or a pipeline stage of one) over `tp_mesh` in place; returns it.

    Needs num_heads divisible by the TP degree and, with sequence parallelism, sequences whose
    length is divisible by it. Absorbed-form decoding (`absorb=True`, KV caches) is not supported
    on a TP-sharded model.
    """
    tp = tp_mesh.size()
    if tp == 1:
        return model
    heads = model.cfg.mla.num_heads
    if heads % tp:
        raise ValueError(f"parallel.tensor_parallel_size: model.mla.num_heads ({heads}) must be divisible by TP ({tp})")
    seq = Shard(1) if sequence_parallel else Replicate()
    tied = model.cfg.tie_word_embeddings

    top: dict[str, ParallelStyle] = {}
    if model.embed is not None:
        top["embed"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=seq)
    if model.norm is not None and sequence_parallel:
        top["norm"] = SequenceParallel()
    if model.head is not None:
        top["head"] = ColwiseParallel(input_layouts=seq, output_layouts=Shard(-1) if loss_parallel else Replicate(),
                                      use_local_output=not loss_parallel)
    parallelize_module(model, tp_mesh, top)
    if tied and model.embed is not None and model.head is not None:
        model.head.weight = model.embed.weight  # both are vocabulary shards of one matrix

    for block in _blocks(model):
        parallelize_module(block, tp_mesh, _block_plan(block, sequence_parallel))
    if sequence_parallel:
        for mtp in model.mtp:
            parallelize_module(mtp, tp_mesh, {"enorm": SequenceParallel(), "hnorm": SequenceParallel(),
                                              "norm": SequenceParallel(),
                                              "eh_proj": ReplicateParallel(input_layout=Shard(1), output_layout=Shard(1))})
    return model


def _blocks(model: nn.Module) -> Iterator[nn.Module]:
    yield from model.layers.values()
    for mtp in model.mtp:
        yield mtp.block


def is_vocab_parallel(model: nn.Module) -> bool:
    """True when the model's head holds a vocabulary shard (loss needs `loss_parallel_context`)."""
    head = model.head
    return head is not None and isinstance(head.weight, DTensor) and head.weight.placements == (Shard(0),)


def loss_parallel_context(model: nn.Module | None = None, enabled: Optional[bool] = None) -> contextlib.AbstractContextManager:
    """`loss_parallel()` when the head is vocabulary-parallel, else a no-op.

    Forward *and* backward of a `vocab_parallel_loss` must run inside it (the chunked loss
    recomputes its logits in backward). Do not nest it.
    """
    if enabled is None:
        enabled = model is not None and is_vocab_parallel(model)
    return loss_parallel() if enabled else contextlib.nullcontext()


def _replicated(h: Tensor, mesh: DeviceMesh) -> DTensor:
    if isinstance(h, DTensor):
        return h.redistribute(placements=[Replicate()])
    return DTensor.from_local(h, mesh, [Replicate()], run_check=False)


def vocab_parallel_loss(loss_fn: LossFn) -> LossFn:
    """Wrap a `(model, h, mtp_hiddens, labels) -> LossParts` loss for a vocabulary-parallel head.

    The hidden states are made replicated DTensors (gathering sequence shards) so `h @ head.T`
    gives vocabulary-sharded logits; the cross-entropy then reduces over the shards without ever
    gathering the logits. Returns plain (replicated) tensors. Call inside `loss_parallel_context`.
    """

    def wrapped(model: nn.Module, h: Tensor, mtp_hiddens: list, labels: Tensor) -> LossParts:
        if not is_vocab_parallel(model):
            return loss_fn(model, h, mtp_hiddens, labels)
        mesh = model.head.weight.device_mesh
        parts = loss_fn(model, _replicated(h, mesh), [_replicated(x, mesh) for x in mtp_hiddens], labels)
        mtp = None if parts.mtp is None else local_tensor(parts.mtp)
        return LossParts(local_tensor(parts.total), local_tensor(parts.main), mtp)

    return wrapped


def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Parameters with DTensors gathered to full tensors (for comparisons and export)."""
    out = {}
    for name, param in model.named_parameters():
        out[name] = param.full_tensor().detach() if isinstance(param, DTensor) else param.detach()
    return out


__all__ = ["ReplicateParallel", "apply_tensor_parallel", "full_state_dict", "is_vocab_parallel",
           "loss_parallel_context", "vocab_parallel_loss"]

