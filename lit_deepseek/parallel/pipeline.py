"""Pipeline parallelism with `torch.distributed.pipelining`, from an unmodified `DeepSeekV3`.

Stages are deep copies of the model with the `layers` entries of other stages deleted (names
kept, so checkpoints and optimizer states use single-process names). The first stage holds the
embedding; the last the final norm, the head and the MTP modules.

MTP on the last stage embeds the token ids shifted by k, so the last stage keeps a copy of the
embedding (Megatron's choice for tied weights across stages). Both copies start equal (copied
from one model, or initialised by parameter name) and their gradients are summed after every
backward (`sync_tied_grads`), so they stay equal under any optimizer: the result is the single-
process gradient. Gradient norms and checkpoints count it once: the handle names it
(`PipelineHandle.tied_copies`). A tied head
(`tie_word_embeddings`) is the same copy. Token ids and document ids reach every stage as
keyword arguments of the schedule, so no extra activations travel between stages. The layer split,
the stages each rank holds and the micro-batch count come from the resolved `Layout`.

Loss scaling: the schedule's loss of a micro-batch is its mean loss x `scale` (1 / micro-batches
in the global batch) with `scale_grads=False`, and the MoE balance loss is injected with the same
scale, exactly the gradient-accumulation semantics of `LocalPlan`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lit_deepseek.parallel.layout import SINGLE_STAGE_SCHEDULES, Layout
from lit_deepseek.parallel.zero import local_tensor
from lit_deepseek.training.loss import LossParts
from lit_deepseek.training.step import LossFn, set_aux_loss_grad_scale

#: schedule name -> torch.distributed.pipelining.schedules class name
SCHEDULES = {
    "gpipe": "ScheduleGPipe",
    "1f1b": "Schedule1F1B",
    "interleaved_1f1b": "ScheduleInterleaved1F1B",
    "zbv": "ScheduleZBVZeroBubble",
    "dualpipev": "ScheduleDualPipeV",
}


def available_schedules() -> list[str]:
    """Schedule names this torch provides."""
    from torch.distributed.pipelining import schedules

    return [name for name, cls in SCHEDULES.items() if hasattr(schedules, cls)]


def split_model(model: nn.Module, stage: int, num_stages: int, layers: Sequence[int]) -> nn.Module:
    """A deep copy of `model` holding only what `stage` needs (parameter names unchanged)."""
    part = copy.deepcopy(model)
    keep = {str(i) for i in layers}
    for key in list(part.layers.keys()):
        if key not in keep:
            del part.layers[key]
    is_first, is_last = stage == 0, stage == num_stages - 1
    needs_embed_copy = is_last and (len(part.mtp) > 0 or part.cfg.tie_word_embeddings)
    if not is_first and not needs_embed_copy:
        part.embed = None
    if not is_last:
        part.norm = None
        part.head = None
        part.mtp = nn.ModuleList()
    return part


def _stage_pre_hook(is_first: bool, is_last: bool) -> Callable:
    """Turn the schedule's (activation, token_ids=..., doc_ids=...) into this stage's model call."""

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        token_ids = kwargs.pop("token_ids")
        kwargs["return_hidden"] = is_last
        if is_first:
            return (token_ids,), kwargs
        (hidden,) = args
        kwargs["hidden_states"] = hidden
        return (token_ids,), kwargs

    return hook


def _last_stage_output_hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> tuple:
    h, mtp_hiddens = output
    return (h, *mtp_hiddens)


@dataclass
class PipelineHandle:
    """This rank's pipeline stages and the schedule that runs them."""

    stage_modules: list[nn.Module]
    stage_ids: list[int]
    layout: Layout
    device: torch.device
    tied_group: Any = None
    has_tied_embedding: bool = False
    activation_dtype: Optional[torch.dtype] = None
    _stages: dict = field(default_factory=dict)
    _schedules: dict = field(default_factory=dict)
    _tied_pairs: list = field(default_factory=list)

    # ------------------------------------------------------------------ layout
    @property
    def model_parts(self) -> list[nn.Module]:
        return self.stage_modules

    @property
    def num_stages(self) -> int:
        return self.layout.num_stages

    @property
    def has_first_stage(self) -> bool:
        return 0 in self.stage_ids

    @property
    def has_last_stage(self) -> bool:
        return self.num_stages - 1 in self.stage_ids

    @property
    def last_part(self) -> Optional[nn.Module]:
        return self.stage_modules[self.stage_ids.index(self.num_stages - 1)] if self.has_last_stage else None

    def tied_copies(self) -> list[nn.Parameter]:
        """Parameters that duplicate another stage's (count them once in norms and checkpoints)."""
        if not self.has_tied_embedding or not self.has_last_stage:
            return []
        return list(self.last_part.embed.parameters())  # the last stage is never the first

    # ------------------------------------------------------------------ schedule
    def _stage_objects(self, micro_rows: int, seq_len: int) -> list:
        """PipelineStages for one micro-batch shape, with static shapes: no inference pass runs
        the model (which would also count expert loads and call the loss on placeholder data)."""
        from torch.distributed.pipelining import PipelineStage

        key = (micro_rows, seq_len)
        if key not in self._stages:
            pp_mesh = self.layout.submesh("pp")
            group = pp_mesh.get_group()
            stages = []
            for part, sid in zip(self.stage_modules, self.stage_ids, strict=True):
                is_first, is_last = sid == 0, sid == self.num_stages - 1
                dtype = self.activation_dtype or next(p.dtype for p in part.parameters() if p.is_floating_point())
                local_s = seq_len // self.layout.tp if self.layout.sequence_parallel else seq_len
                hidden = torch.empty(micro_rows, local_s, part.cfg.mla.d_model, dtype=dtype, device="meta",
                                     requires_grad=True)
                inputs = (torch.empty(micro_rows, seq_len, dtype=torch.long, device="meta"),) if is_first else (hidden,)
                outputs = (hidden,) * (1 + len(part.mtp)) if is_last else (hidden,)
                stage = PipelineStage(part, sid, self.num_stages, self.device, input_args=inputs,
                                      output_args=outputs, group=group)
                _skip_self_warmup_p2p(stage, pp_mesh.get_local_rank())
                stages.append(stage)
            self._stages[key] = stages
        return self._stages[key]

    def _schedule(self, n_microbatches: int, micro_rows: int, seq_len: int, with_loss: bool = True) -> Any:
        from torch.distributed.pipelining import schedules

        key = (n_microbatches, micro_rows, seq_len, with_loss)
        if key not in self._schedules:
            stages = self._stage_objects(micro_rows, seq_len)
            name = self.layout.schedule if with_loss else ("gpipe" if len(stages) == 1 else "interleaved_1f1b")
            cls = getattr(schedules, SCHEDULES[name])
            loss = self._schedule_loss if with_loss else None
            target = stages[0] if name in SINGLE_STAGE_SCHEDULES else stages
            self._schedules[key] = cls(target, n_microbatches, loss_fn=loss, scale_grads=False)
        return self._schedules[key]

    def _schedule_loss(self, output: tuple, labels: Tensor) -> Tensor:
        h, *mtp_hiddens = output
        parts = self._active_loss_fn(self.last_part, h, list(mtp_hiddens), labels)
        self._collected.append(parts.detach())
        return parts.total * self._scale

    # ------------------------------------------------------------------ steps
    def forward_backward(self, micro_batches: list[dict], loss_fn: LossFn, scale: float) -> Optional[LossParts]:
        """Run the schedule over this step's micro-batches (forward and backward).

        Each micro-batch's loss is scaled by `scale` before backward (and the MoE balance loss
        injected with the same scale). Returns the mean LossParts over the micro-batches on the
        rank holding the last stage, None elsewhere. The schedule runs the backward passes itself.
        """
        n = len(micro_batches)
        set_aux_loss_grad_scale(self.stage_modules, scale)
        batch = {k: torch.cat([mb[k] for mb in micro_batches]) for k in micro_batches[0]}
        rows, seq_len = micro_batches[0]["input_ids"].shape
        self._active_loss_fn, self._scale, self._collected = loss_fn, scale, []
        schedule = self._schedule(n, rows, seq_len)
        args, kwargs = self._inputs(batch)
        target = batch["labels"] if self.has_last_stage else None
        with self._loss_context():
            schedule.step(*args, target=target, return_outputs=False, **kwargs)
        self.sync_tied_grads()
        collected, self._collected = self._collected, []
        if not self.has_last_stage:
            return None
        if len(collected) != n:
            raise RuntimeError(f"pipeline: expected {n} micro-batch losses on the last stage, got {len(collected)}")
        return LossParts.mean(collected)

    def _inputs(self, batch: dict) -> tuple[tuple, dict]:
        kwargs: dict[str, Tensor] = {"token_ids": batch["input_ids"]}
        if batch.get("doc_ids") is not None:
            kwargs["doc_ids"] = batch["doc_ids"]
        args = (batch["input_ids"],) if self.has_first_stage else ()
        return args, kwargs

    @torch.no_grad()
    def evaluate(self, batch: dict, loss_fn: LossFn) -> Optional[LossParts]:
        """Forward-only loss of one batch (one micro-batch through the stages); last stage only."""
        rows, seq_len = batch["input_ids"].shape
        schedule = self._schedule(1, rows, seq_len, with_loss=False)
        args, kwargs = self._inputs(batch)
        with self._loss_context():
            output = schedule.step(*args, **kwargs)
            if not self.has_last_stage:
                return None
            h, *mtp_hiddens = output
            return loss_fn(self.last_part, h, list(mtp_hiddens), batch["labels"]).detach()

    def _loss_context(self) -> Any:
        from lit_deepseek.parallel.tensor import loss_parallel_context

        last = self.last_part
        return loss_parallel_context(last) if last is not None else loss_parallel_context(None, enabled=False)

    # ------------------------------------------------------------------ tied embedding
    @torch.no_grad()
    def sync_tied_grads(self) -> None:
        """Sum the gradients of the first stage's embedding and the last stage's copy."""
        pairs = self._tied_params()
        if not pairs:
            return
        for first, last in pairs:
            if first is not None and last is not None:  # both stages on this rank (V schedules)
                total = local_tensor(first.grad) + local_tensor(last.grad)
                local_tensor(first.grad).copy_(total)
                local_tensor(last.grad).copy_(total)
            else:
                p = first if first is not None else last
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(local_tensor(p.grad), group=self.tied_group)

    def _tied_params(self) -> list[tuple[Optional[nn.Parameter], Optional[nn.Parameter]]]:
        if not self._tied_pairs and self.has_tied_embedding:
            first = self.stage_modules[self.stage_ids.index(0)] if self.has_first_stage else None
            last = self.last_part
            firsts = list(first.embed.parameters()) if first is not None else []
            lasts = list(last.embed.parameters()) if last is not None else []
            count = max(len(firsts), len(lasts))
            self._tied_pairs = [(firsts[i] if firsts else None, lasts[i] if lasts else None) for i in range(count)]
        return self._tied_pairs


def _skip_self_warmup_p2p(stage: Any, group_rank: int) -> None:
    """torch <= 2.11 opens a V schedule with a warm-up send/recv to every neighbouring stage,
    including the one on this same rank: a send to oneself, which gloo rejects. Such a message
    carries nothing (same-rank stages hand activations over in memory), so drop it."""
    original = getattr(stage, "_get_init_p2p_neighbors_ops", None)
    if original is None:
        return

    def ops() -> list:
        me = dist.get_rank()
        return [op for op in original()
                if getattr(op, "group_peer", None) != group_rank and getattr(op, "peer", None) != me]

    stage._get_init_p2p_neighbors_ops = ops


def build_pipeline(model: nn.Module, layout: Layout, device: Optional[torch.device] = None,
                   activation_dtype: Optional[torch.dtype] = None) -> PipelineHandle:
    """Split `model` into this rank's pipeline stages and prepare the layout's schedule.

    Call on the unsharded model (before tensor parallelism / ZeRO, which are then applied to each
    of `handle.stage_modules`), after `layout.build_mesh`. `activation_dtype` is the dtype of the
    hidden states sent between stages (default: the parameters' dtype).
    """
    pp_mesh = layout.submesh("pp")
    num_stages = layout.num_stages
    rank = pp_mesh.get_local_rank()
    ids = sorted(layout.stage_indices(rank))
    parts = [split_model(model, s, num_stages, layout.stage_layers[s]) for s in ids]
    for part, sid in zip(parts, ids, strict=True):
        part.register_forward_pre_hook(_stage_pre_hook(sid == 0, sid == num_stages - 1), with_kwargs=True)
        if sid == num_stages - 1:
            part.register_forward_hook(_last_stage_output_hook, with_kwargs=True)
    if device is None:
        device = torch.device(pp_mesh.device_type, torch.cuda.current_device()) if pp_mesh.device_type == "cuda" \
            else torch.device(pp_mesh.device_type)
    needs_tie = len(model.mtp) > 0 or model.cfg.tie_word_embeddings
    handle = PipelineHandle(parts, ids, layout, device, has_tied_embedding=needs_tie, activation_dtype=activation_dtype)
    # the ranks of this pipeline holding the first and the last stage share the embedding
    first_rank = 0
    last_rank = next(r for r in range(layout.pp) if num_stages - 1 in layout.stage_indices(r))
    if needs_tie and first_rank != last_rank and rank in (first_rank, last_rank):
        members = pp_mesh.mesh.flatten().tolist()
        pair = sorted({members[first_rank], members[last_rank]})
        handle.tied_group = dist.new_group(pair, use_local_synchronization=True)
    return handle


__all__ = ["PipelineHandle", "SCHEDULES", "available_schedules", "build_pipeline", "split_model"]
