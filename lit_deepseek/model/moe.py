"""DeepSeekMoE: shared experts plus fine-grained routed SwiGLU experts (report, section 2.1.2).

Routing follows the report and Hugging Face's DeepseekV3 router: affinities in float32 (sigmoid or
softmax), an aux-loss-free bias added only for expert *selection* (eqs. 16), optional group-limited
routing, gate weights from the unbiased affinities, normalised and scaled by route_scale. A
sequence-wise balance loss (eqs. 17-20) is injected into the backward pass without appearing in the
forward's return value.

The routed token copies are sorted by expert, handed to an injected `TokenDispatcher`, run through
the local experts (grouped GEMM on CUDA, a plain loop as the reference) and combined back.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_deepseek.config import ModelConfig, MoEConfig
from lit_deepseek.kernels.eager import project_siblings
from lit_deepseek.kernels.swiglu import swiglu
from lit_deepseek.model.dispatch import LocalDispatcher, TokenDispatcher, is_recomputing
from lit_deepseek.precision import compute_dtype


class SwiGLU(nn.Module):
    """Dense SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, d_model: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d_model, intermediate_size, bias=False)
        self.up_proj = nn.Linear(d_model, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        # gate and up as one GEMM in eager CUDA steps (`lit_deepseek.kernels.eager.project_siblings`)
        return self.down_proj(swiglu(*project_siblings(x, self.gate_proj, self.up_proj)))


def _grouped_mm_fn() -> Any:
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


_warned_reference_experts = False


def _warn_reference_experts(dtype: torch.dtype) -> None:
    global _warned_reference_experts
    if not _warned_reference_experts:
        _warned_reference_experts = True
        warnings.warn(f"MoE experts run the per-expert reference loop on CUDA (compute dtype {dtype}; grouped GEMM "
                      "needs bf16): expect a large slowdown. Use training.precision bf16-mixed or bf16-true.",
                      stacklevel=3)


class GroupedExperts(nn.Module):
    """Routed SwiGLU experts stored as stacked weights: gate w1 and up w3 [E_local, I, D],
    down w2 [E_local, D, I]. `expert_start` is the global id of the first expert held here."""

    def __init__(self, num_experts: int, d_model: int, intermediate_size: int, expert_start: int = 0) -> None:
        super().__init__()
        self.expert_start = expert_start
        self.w1 = nn.Parameter(torch.empty(num_experts, intermediate_size, d_model))
        self.w3 = nn.Parameter(torch.empty(num_experts, intermediate_size, d_model))
        self.w2 = nn.Parameter(torch.empty(num_experts, d_model, intermediate_size))

    @property
    def num_local_experts(self) -> int:
        return self.w1.shape[0]

    def forward(self, x: Tensor, counts: Tensor, use_grouped_mm: bool | None = None) -> Tensor:
        """x [M, D] rows sorted by local expert, counts [E_local] rows per expert -> [M, D].

        The compute dtype is the autocast dtype when autocast is on (mixed precision: float32
        master weights, bf16 matmuls), else x's dtype. Grouped GEMM runs whenever that dtype is
        bf16 on CUDA; the per-expert loop is the reference path, and taking it on CUDA warns once.
        """
        dtype = compute_dtype(x)
        if use_grouped_mm is None:
            use_grouped_mm = x.is_cuda and dtype == torch.bfloat16 and _grouped_mm_fn() is not None
            if x.is_cuda and not use_grouped_mm:
                _warn_reference_experts(dtype)
        if use_grouped_mm:
            return self._grouped(x.to(dtype), counts)
        return self._reference(x, counts)

    def _grouped(self, x: Tensor, counts: Tensor) -> Tensor:
        mm = _grouped_mm_fn()
        offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
        dtype = x.dtype
        # grouped_mm has no autocast rule: cast here (under autocast these casts are the bf16 copy)
        w1, w3, w2 = (w.to(dtype) for w in (self.w1, self.w3, self.w2))
        gate = mm(x, w1.transpose(-2, -1), offs=offsets)
        up = mm(x, w3.transpose(-2, -1), offs=offsets)
        return mm(swiglu(gate, up), w2.transpose(-2, -1), offs=offsets)

    def _reference(self, x: Tensor, counts: Tensor) -> Tensor:
        out = x.new_empty(x.shape[0], self.w2.shape[1])
        start = 0
        for e, n in enumerate(counts.tolist()):
            if n:
                rows = x[start:start + n]
                h = F.silu(rows @ self.w1[e].t()) * (rows @ self.w3[e].t())
                out[start:start + n] = h @ self.w2[e].t()
            start += n
        if start < x.shape[0]:
            out[start:] = 0
        return out


class _PermuteRows(torch.autograd.Function):
    """out = x[perm] for a permutation `perm` with inverse `inv`; backward is the gather grad[inv]
    (no scatter, no atomics, deterministic)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, perm: Tensor, inv: Tensor) -> Tensor:
        ctx.save_for_backward(inv)
        return x[perm]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        (inv,) = ctx.saved_tensors
        return grad[inv], None, None


class _ExpandRows(torch.autograd.Function):
    """x_sorted = x[order // k] where `order` is a permutation of the n*k token copies: each token
    appears k times. Backward sums each token's k copies, found through the inverse permutation."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, order: Tensor, inv: Tensor, k: int) -> Tensor:
        ctx.save_for_backward(inv)
        ctx.k = k
        return x[order // k]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        (inv,) = ctx.saved_tensors
        k = ctx.k
        return grad[inv].view(-1, k, grad.shape[-1]).sum(dim=1), None, None, None


class _AuxLossInBackward(torch.autograd.Function):
    """Identity on the MoE output in forward; in backward, seeds the balance loss with
    d(loss)/d(loss) = scale so its gradient joins the main one without changing the forward's value."""

    @staticmethod
    def forward(ctx: Any, output: Tensor, aux_loss: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        ctx.save_for_backward(aux_loss)
        return output.view_as(output)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor, Tensor, None]:
        (aux_loss,) = ctx.saved_tensors
        return grad_output, torch.full_like(aux_loss, ctx.scale), None


class MoE(nn.Module):
    """Router + shared experts + routed experts behind a token dispatcher."""

    def __init__(self, cfg: ModelConfig, dispatcher: TokenDispatcher | None = None,
                 expert_range: tuple[int, int] | None = None) -> None:
        super().__init__()
        moe: MoEConfig = cfg.moe
        self.moe = moe
        d = cfg.mla.d_model
        self.num_experts, self.top_k = moe.num_experts, moe.num_experts_per_token
        self.dispatcher: TokenDispatcher = dispatcher if dispatcher is not None else LocalDispatcher()
        start, end = expert_range if expert_range is not None else (0, moe.num_experts)
        self.gate_weight = nn.Parameter(torch.empty(moe.num_experts, d))
        self.register_buffer("expert_bias", torch.zeros(moe.num_experts), persistent=True)
        self.experts = GroupedExperts(end - start, d, moe.expert_intermediate_size, expert_start=start)
        self.shared_experts = (SwiGLU(d, moe.num_shared_experts * moe.expert_intermediate_size)
                               if moe.num_shared_experts > 0 else None)
        self.register_buffer("expert_load", torch.zeros(moe.num_experts), persistent=False)
        self.register_buffer("routed_tokens", torch.zeros(()), persistent=False)
        self.register_buffer("dropped_tokens", torch.zeros(()), persistent=False)
        self.aux_loss_grad_scale: float = 1.0
        self.use_grouped_mm: bool | None = None  # None = automatic (CUDA + bf16)
        #: gather-based token permutation when no copy is dropped (False: index/index_add reference)
        self.fast_permute: bool = True
        self.last_aux_loss: Tensor | None = None
        self.last_drop_rate: Tensor | None = None

    # ------------------------------------------------------------------ housekeeping
    def _apply(self, fn: Any, recurse: bool = True) -> MoE:
        """Keep the router bias and load statistics in float32 when the module is cast
        (a bias step of 1e-3 would vanish in bf16)."""
        super()._apply(fn, recurse)
        for name in ("expert_bias", "expert_load", "routed_tokens", "dropped_tokens"):
            buf = getattr(self, name)
            if buf.is_floating_point() and buf.dtype != torch.float32:
                setattr(self, name, buf.float())
        return self

    def reset_stats(self) -> None:
        """Zero the accumulated expert loads and drop counters."""
        self.expert_load.zero_()
        self.routed_tokens.zero_()
        self.dropped_tokens.zero_()

    @torch.no_grad()
    def update_bias(self, load: Tensor, speed: float) -> None:
        """Aux-loss-free balancing step: raise the bias of under-loaded experts, lower over-loaded ones."""
        load = load.to(self.expert_bias.device, torch.float32)
        self.expert_bias.add_(speed * torch.sign(load.mean() - load))

    def shard_experts(self, start: int, end: int) -> None:
        """Keep only the routed experts [start, end) (global ids) of the ones held now."""
        ex = self.experts
        lo, hi = start - ex.expert_start, end - ex.expert_start
        if lo < 0 or hi > ex.num_local_experts or lo >= hi:
            raise ValueError(f"shard_experts: range [{start}, {end}) is not inside the held experts "
                             f"[{ex.expert_start}, {ex.expert_start + ex.num_local_experts})")
        for name in ("w1", "w2", "w3"):
            old = getattr(ex, name)
            setattr(ex, name, nn.Parameter(old.data[lo:hi].clone(), requires_grad=old.requires_grad))
        ex.expert_start = start

    # ------------------------------------------------------------------ routing
    def route(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x [N, D] -> (weights [N, K] float32, expert ids [N, K], affinities [N, E] float32)."""
        logits = F.linear(x.float(), self.gate_weight.float())
        scores = logits.sigmoid() if self.moe.score_function == "sigmoid" else logits.softmax(dim=-1)
        choice = scores + self.expert_bias if self.moe.use_aux_loss_free else scores
        groups = self.moe.num_expert_groups
        if groups > 1:
            grouped = choice.view(x.shape[0], groups, -1)
            if self.moe.score_function == "sigmoid":
                group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
            else:
                group_scores = grouped.amax(dim=-1)
            keep = group_scores.topk(self.moe.num_limited_groups, dim=-1, sorted=False).indices
            group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
            choice = choice.masked_fill(~group_mask.repeat_interleave(self.num_experts // groups, dim=1),
                                        float("-inf"))
        ids = choice.topk(self.top_k, dim=-1, sorted=False).indices
        weights = scores.gather(1, ids)
        if self.moe.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.moe.route_scale, ids, scores

    def balance_loss(self, scores: Tensor, ids: Tensor, batch: int) -> Tensor:
        """Sequence-wise balance loss (eqs. 17-20), averaged over the sequences of the batch."""
        e, k = self.num_experts, self.top_k
        scores = scores.view(batch, -1, e)
        t = scores.shape[1]
        normed = scores / scores.sum(dim=-1, keepdim=True)
        counts = torch.zeros(batch, e, device=scores.device).scatter_add_(
            1, ids.view(batch, -1), torch.ones(batch, t * k, device=scores.device))
        f = counts * (e / (k * t))
        p = normed.mean(dim=1)
        return self.moe.router_aux_loss_weight * (f * p).sum(dim=-1).mean()

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x_flat = x.reshape(-1, shape[-1])
        n, k, e = x_flat.shape[0], self.top_k, self.num_experts
        weights, ids, scores = self.route(x_flat)

        flat_ids = ids.reshape(-1)
        # scatter_add rather than bincount: no device-to-host sync on CUDA
        counts = torch.zeros(e, dtype=torch.long, device=x.device).scatter_add_(0, flat_ids, torch.ones_like(flat_ids))
        if not is_recomputing():
            self.expert_load += counts.to(self.expert_load.dtype)
            self.routed_tokens += n * k
        flat_weights = weights.reshape(-1)

        if self.moe.capacity_factor is None:
            order = torch.argsort(flat_ids, stable=True)
            kept_counts = counts
            self.last_drop_rate = torch.zeros((), device=x.device)
        else:
            order, kept_counts = self._capacity_order(flat_ids, flat_weights, counts)
            dropped = (counts - kept_counts).sum()
            self.last_drop_rate = (dropped.float() / (n * k)).detach()
            if not is_recomputing():
                self.dropped_tokens += dropped.to(self.dropped_tokens.dtype)
        token_of_copy = order // k
        # every copy kept: `order` is a permutation of the n*k copies and both directions are gathers
        permute = self.fast_permute and self.moe.capacity_factor is None
        if permute:
            inv = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
            x_sorted = _ExpandRows.apply(x_flat, order, inv, k)
        else:
            x_sorted = x_flat[token_of_copy]

        start, end = self.dispatcher.local_expert_range(e)
        if (start, end) != (self.experts.expert_start, self.experts.expert_start + self.experts.num_local_experts):
            raise RuntimeError(f"MoE: the dispatcher assigns experts [{start}, {end}) to this rank but the layer holds "
                               f"[{self.experts.expert_start}, {self.experts.expert_start + self.experts.num_local_experts})"
                               "; call shard_experts(start, end)")
        x_local, local_counts, handle = self.dispatcher.dispatch(x_sorted, kept_counts)
        y_local = self.experts(x_local, local_counts, self.use_grouped_mm)
        y_sorted = self.dispatcher.combine(y_local, handle)

        if permute:
            y = _PermuteRows.apply(y_sorted, inv, order).view(n, k, -1)
            out = (y * weights.to(y.dtype)[:, :, None]).sum(dim=1).to(x_flat.dtype)
        else:
            y_sorted = y_sorted * flat_weights[order].to(y_sorted.dtype)[:, None]
            out = torch.zeros_like(x_flat).index_add_(0, token_of_copy, y_sorted.to(x_flat.dtype))
        if self.shared_experts is not None:
            out = out + self.shared_experts(x_flat)
        out = out.view(shape)

        if self.training and self.moe.router_aux_loss_weight > 0 and torch.is_grad_enabled():
            aux = self.balance_loss(scores, ids, shape[0] if len(shape) == 3 else 1)
            self.last_aux_loss = aux.detach()
            out = _AuxLossInBackward.apply(out, aux, self.aux_loss_grad_scale)
        return out

    def _capacity_order(self, flat_ids: Tensor, flat_weights: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
        """Keep at most the capacity per expert, dropping the lowest-weight copies first.

        capacity = ceil(cf * global copies / E) from the counts summed over the expert-parallel
        group; each rank keeps its proportional share of an over-full expert. Returns the order of
        the kept copies (sorted by expert) and the kept counts.
        """
        e = self.num_experts
        global_counts = self.dispatcher.global_tokens_per_expert(counts)
        capacity = torch.ceil(self.moe.capacity_factor * global_counts.sum().float() / e).long()
        over = global_counts > capacity
        kept_counts = torch.where(over, counts * capacity // global_counts.clamp(min=1), counts)
        by_weight = torch.argsort(flat_weights, descending=True, stable=True)
        order = by_weight[torch.argsort(flat_ids[by_weight], stable=True)]
        starts = torch.cumsum(counts, 0) - counts
        sorted_ids = flat_ids[order]
        rank_in_expert = torch.arange(order.numel(), device=order.device) - starts[sorted_ids]
        keep = rank_in_expert < kept_counts[sorted_ids]
        return order[keep], kept_counts
