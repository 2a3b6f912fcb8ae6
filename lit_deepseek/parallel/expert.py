"""Expert parallelism: token dispatchers that move routed token copies across the EP group.

Backends (all implement `lit_deepseek.model.dispatch.TokenDispatcher`):

- `LocalDispatcher` (EP = 1, from the model package),
- `AllToAllDispatcher`: two ``all_to_all_single`` calls per direction (a tiny one for the counts,
  one for the rows), differentiable, works on gloo and NCCL,
- `DeepEPDispatcher`: DeepEP's NVLink/RDMA kernels (CUDA only, optional FP8 dispatch).

`make_dispatcher` picks one; when DeepEP is asked for but cannot work it warns once and falls
back to the all-to-all path.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lit_deepseek.config import ModelConfig
from lit_deepseek.kernels.fp8 import dequantize_1x128, quantize_1x128
from lit_deepseek.model.dispatch import LocalDispatcher, TokenDispatcher


class _AllToAll(torch.autograd.Function):
    """Differentiable ``all_to_all_single`` on rows; backward sends gradients the reverse way."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, output_splits: list[int], input_splits: list[int],
                group: dist.ProcessGroup) -> Tensor:
        ctx.group, ctx.output_splits, ctx.input_splits = group, output_splits, input_splits
        return _all_to_all_rows(x, output_splits, input_splits, group)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], None, None, None]:
        return _all_to_all_rows(grad, ctx.input_splits, ctx.output_splits, ctx.group), None, None, None


def _all_to_all_rows(x: Tensor, output_splits: list[int], input_splits: list[int],
                     group: dist.ProcessGroup) -> Tensor:
    out = x.new_empty((sum(output_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), output_split_sizes=output_splits,
                           input_split_sizes=input_splits, group=group)
    return out


def all_to_all_rows(x: Tensor, output_splits: list[int], input_splits: list[int],
                    group: dist.ProcessGroup) -> Tensor:
    """Send ``input_splits[r]`` consecutive rows of x to rank r; receive ``output_splits[r]`` from r."""
    return _AllToAll.apply(x, output_splits, input_splits, group)


def _keep_in_graph(y_local: Tensor, x_local: Tensor) -> Tensor:
    """Make sure this rank takes part in both backward all-to-alls.

    A rank whose experts received no rows may produce an output outside the autograd graph;
    without backward nodes it would skip the collectives its EP peers run, and they would wait on
    it forever. A zero that depends on the received rows keeps dispatch and combine in the graph.
    """
    if torch.is_grad_enabled() and x_local.requires_grad and not y_local.requires_grad:
        return y_local + (x_local.sum() * 0).to(y_local.dtype)
    return y_local


def _experts_in_graph_hook(module: nn.Module, args: tuple, output: Tensor) -> Optional[Tensor]:
    if output.shape[0] or not torch.is_grad_enabled():
        return None
    zero = sum((p.sum() * 0 for p in module.parameters() if p.requires_grad), output.new_zeros(()))
    x = args[0]
    if x.requires_grad:
        zero = zero + x.sum() * 0
    return output + zero.to(output.dtype)


def keep_experts_in_graph(model: nn.Module) -> None:
    """Give every routed-experts module a backward even when it received no rows this step.

    Data-parallel peers route different tokens: one may send nothing to an expert shard that its
    peer uses. FSDP's per-module gradient reduction (and its backward prefetch) must then still
    run on both, in the same order, so an empty expert output is tied to the weights and inputs
    by a zero. Register before FSDP wraps the module.
    """
    for moe in model.moe_layers():
        moe.experts.register_forward_hook(_experts_in_graph_hook)


class AllToAllDispatcher(TokenDispatcher):
    """Expert parallelism over ``torch.distributed`` all-to-all.

    Rank r of the EP group holds experts ``[r*L, (r+1)*L)``. Since the routed copies arrive sorted
    by global expert id, the rows for each destination rank are contiguous. One small all-to-all
    of the per-expert counts tells every rank what it will receive (the only host sync), then the
    rows travel, and the received blocks (source rank major) are regrouped by local expert.
    """

    def __init__(self, ep_group: dist.ProcessGroup) -> None:
        self.group = ep_group
        self.ep_size = dist.get_world_size(ep_group)
        self.ep_rank = dist.get_rank(ep_group)

    def __deepcopy__(self, memo: dict) -> AllToAllDispatcher:
        return self  # a communication service, shared by copies of the model (pipeline stages)

    def dispatch(self, x_sorted: Tensor, tokens_per_expert: Tensor) -> tuple[Tensor, Tensor, Any]:
        num_experts = tokens_per_expert.numel()
        local = num_experts // self.ep_size
        send_counts = tokens_per_expert.to(torch.int64).contiguous()
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        # recv_counts[r*L + l]: rows that rank r sends to my local expert l
        counts = torch.stack([send_counts.view(self.ep_size, local).sum(1),
                              recv_counts.view(self.ep_size, local).sum(1)]).tolist()
        input_splits, output_splits = counts[0], counts[1]
        x_recv = all_to_all_rows(x_sorted, output_splits, input_splits, self.group)
        recv_by_source = recv_counts.view(self.ep_size, local)
        block = torch.repeat_interleave(torch.arange(self.ep_size * local, device=x_sorted.device),
                                        recv_counts.to(x_sorted.device))
        # block id = source * L + local expert  ->  order by (local expert, source), stable within a block
        key = (block % local) * self.ep_size + block // local
        order = torch.sort(key, stable=True).indices
        x_local = x_recv.index_select(0, order)
        return x_local, recv_by_source.sum(0), (order, input_splits, output_splits, x_local)

    def combine(self, y_local: Tensor, handle: Any) -> Tensor:
        order, input_splits, output_splits, x_local = handle
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        y_recv = _keep_in_graph(y_local, x_local).index_select(0, inverse)
        return all_to_all_rows(y_recv, input_splits, output_splits, self.group)

    def global_tokens_per_expert(self, tokens_per_expert: Tensor) -> Tensor:
        total = tokens_per_expert.detach().clone()
        dist.all_reduce(total, group=self.group)
        return total


# --------------------------------------------------------------------------------------------
# DeepEP
# --------------------------------------------------------------------------------------------

_FP8_BLOCK = 128


class _DeepEPDispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, expert_idx: Tensor, dispatcher: DeepEPDispatcher) -> tuple[Tensor, Tensor, Any]:
        buffer = dispatcher.buffer(x)
        weights = torch.ones(expert_idx.shape, dtype=torch.float32, device=x.device)
        per_rank, per_rdma_rank, per_expert, in_rank, _ = buffer.get_dispatch_layout(expert_idx, dispatcher.num_experts)
        payload: Any = quantize_1x128(x) if dispatcher.fp8 else x  # per row and 128 channels
        recv, recv_idx, _, _, handle, _ = buffer.dispatch(
            payload, topk_idx=expert_idx, topk_weights=weights, num_tokens_per_rank=per_rank,
            num_tokens_per_rdma_rank=per_rdma_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
        if dispatcher.fp8:
            recv = dequantize_1x128(recv[0], recv[1]).to(x.dtype)
        ctx.dispatcher, ctx.handle = dispatcher, handle
        ctx.mark_non_differentiable(recv_idx)
        return recv, recv_idx, handle

    @staticmethod
    def backward(ctx: Any, grad: Tensor, _idx: Any, _handle: Any) -> tuple[Tensor, None, None]:
        buffer = ctx.dispatcher.buffer(grad)
        grad_x, _, _ = buffer.combine(grad.contiguous(), ctx.handle)
        return grad_x, None, None


class _DeepEPCombine(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, y: Tensor, handle: Any, dispatcher: DeepEPDispatcher) -> Tensor:
        out, _, _ = dispatcher.buffer(y).combine(y.contiguous(), handle)
        ctx.dispatcher, ctx.handle = dispatcher, handle
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        grad_y, *_ = ctx.dispatcher.buffer(grad).dispatch(grad.contiguous(), handle=ctx.handle)
        return grad_y, None, None


class DeepEPDispatcher(TokenDispatcher):
    """DeepEP's normal (high-throughput) kernels; each routed copy is sent as a top-1 token.

    The received rows come back tagged with their local expert and are regrouped by it; combine
    undoes the regrouping and lets DeepEP return each row to its source. With ``fp8`` the rows
    travel as e4m3 with per-128-channel scales and are dequantised on arrival.
    """

    def __init__(self, ep_group: dist.ProcessGroup, num_experts: int, fp8: bool = False) -> None:
        import deep_ep  # noqa: F401 - fails early when absent

        self.group = ep_group
        self.ep_size = dist.get_world_size(ep_group)
        self.ep_rank = dist.get_rank(ep_group)
        self.num_experts = num_experts
        self.fp8 = fp8
        self._buffer: Any = None

    def __deepcopy__(self, memo: dict) -> DeepEPDispatcher:
        return self

    def buffer(self, x: Tensor) -> Any:
        from deep_ep import Buffer

        hidden_bytes = x.size(1) * max(x.element_size(), 2)
        nvl_bytes = rdma_bytes = 0
        for config in (Buffer.get_dispatch_config(self.ep_size), Buffer.get_combine_config(self.ep_size)):
            nvl_bytes = max(nvl_bytes, config.get_nvl_buffer_size_hint(hidden_bytes, self.ep_size))
            rdma_bytes = max(rdma_bytes, config.get_rdma_buffer_size_hint(hidden_bytes, self.ep_size))
        buf = self._buffer
        if buf is None or buf.num_nvl_bytes < nvl_bytes or buf.num_rdma_bytes < rdma_bytes:
            self._buffer = Buffer(self.group, nvl_bytes, rdma_bytes)
        return self._buffer

    def dispatch(self, x_sorted: Tensor, tokens_per_expert: Tensor) -> tuple[Tensor, Tensor, Any]:
        expert_of_row = torch.repeat_interleave(
            torch.arange(self.num_experts, device=x_sorted.device), tokens_per_expert.to(x_sorted.device))
        recv, recv_idx, handle = _DeepEPDispatch.apply(x_sorted, expert_of_row.view(-1, 1).to(torch.int64), self)
        local_expert = recv_idx[:, 0]
        order = torch.sort(local_expert, stable=True).indices
        per_rank = self.num_experts // self.ep_size
        counts = torch.bincount(local_expert, minlength=per_rank).to(torch.int64)
        x_local = recv.index_select(0, order)
        return x_local, counts, (order, handle, x_local)

    def combine(self, y_local: Tensor, handle: Any) -> Tensor:
        order, deep_handle, x_local = handle
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        return _DeepEPCombine.apply(_keep_in_graph(y_local, x_local).index_select(0, inverse), deep_handle, self)

    def global_tokens_per_expert(self, tokens_per_expert: Tensor) -> Tensor:
        total = tokens_per_expert.detach().clone()
        dist.all_reduce(total, group=self.group)
        return total


# --------------------------------------------------------------------------------------------
# Choice
# --------------------------------------------------------------------------------------------


def deep_ep_unusable_reason(cfg: ModelConfig, ep_group: Optional[dist.ProcessGroup]) -> Optional[str]:
    """Why DeepEP cannot serve this EP group (None when it can)."""
    if ep_group is None or dist.get_world_size(ep_group) == 1:
        return "expert_parallel_size is 1, there is nothing to dispatch"
    if not torch.cuda.is_available():
        return "it needs CUDA GPUs"
    if dist.get_backend(ep_group) != "nccl":
        return f"it needs the NCCL backend, the expert-parallel group uses {dist.get_backend(ep_group)}"
    try:
        import deep_ep  # noqa: F401
    except ImportError:
        return "the deep_ep package is not installed (build it from source, see the README)"
    size = dist.get_world_size(ep_group)
    ranks = dist.get_process_group_ranks(ep_group)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", torch.cuda.device_count()))
    nodes = {r // max(local_world, 1) for r in ranks}
    if len(nodes) == 1 and size not in (2, 4, 8):
        return f"within one NVLink node it supports 2, 4 or 8 ranks, the expert-parallel group has {size}"
    if len(nodes) > 1 and (size % 8 or local_world != 8):
        return f"across nodes (RDMA) it needs 8 GPUs per node in the group, got {size} ranks over {len(nodes)} nodes"
    if cfg.moe.deep_ep_fp8 and cfg.mla.d_model % _FP8_BLOCK:
        return f"FP8 dispatch needs model.mla.d_model divisible by {_FP8_BLOCK}, got {cfg.mla.d_model}"
    return None


_warned: set[str] = set()


def make_dispatcher(cfg: ModelConfig, ep_group: Optional[dist.ProcessGroup]) -> TokenDispatcher:
    """The token dispatcher for this rank's EP group (None or size 1 = all experts local)."""
    if cfg.moe.use_deep_ep:
        reason = deep_ep_unusable_reason(cfg, ep_group)
        if reason is None:
            assert ep_group is not None
            return DeepEPDispatcher(ep_group, cfg.moe.num_experts, fp8=cfg.moe.deep_ep_fp8)
        fallback = "local" if ep_group is None or dist.get_world_size(ep_group) == 1 else "all-to-all"
        message = f"model.moe.use_deep_ep: DeepEP is not used because {reason}; using the {fallback} dispatcher"
        if message not in _warned and (not dist.is_initialized() or dist.get_rank() == 0):
            _warned.add(message)
            warnings.warn(message, stacklevel=2)
    if ep_group is None or dist.get_world_size(ep_group) == 1:
        return LocalDispatcher()
    return AllToAllDispatcher(ep_group)
