"""A micro-batch's forward, loss and backward captured as one CUDA graph and replayed.

Under regional compile a micro-batch still costs the host tens of milliseconds of launches (every
block's compiled graphs and their autograd wrappers, the MoE's routing and grouped products, the
head and cross-entropy chunks); with small micro-batches or FP8 that host time, not the device,
sets the step time. `MicroBatchGraphs` runs the first `warmup_steps` optimizer steps eagerly (they
compile and autotune), then captures:

* graph A, the first micro-batch of a step: its backward *writes* each parameter's gradient into a
  tensor of the graph's memory (the gradients are None when it is captured, as after
  ``zero_grad(set_to_none=True)``), and those tensors become ``param.grad`` after every replay;
* graph B, any later micro-batch: its backward *adds* into those same tensors (gradient
  accumulation inside the graph).

Both graphs share one memory pool, so activations are held once. Each micro-batch is then a copy
of its token ids into static inputs, one replay and a copy of its losses out. The eager step is the
reference path (`training.cuda_graphs: false`); `tests/test_cuda_graphs.py` compares the two on a
GPU. The steps before capture, the capture and every replay run on one side stream under autocast
without its weight cache, so the compiled blocks see one global state throughout.

What the graphs rely on (guaranteed by `lit_deepseek.training.step.train_step`): gradients are
zero or None when a step starts; every micro-batch of a run has the same shapes; nothing in the
forward or backward waits on the host (the MoE routes without a device-to-host sync; expert
capacity does sync, so `moe.capacity_factor` turns the graphs off, as do activation checkpointing,
fp16 loss scaling and 32-true, whose float32 experts take the reference loop). Hooks on the engine's backward (Lightning's ``on_before_backward`` /
``on_after_backward``) run when a graph is captured, not on its replays. A layout or shape the graphs
do not cover runs eagerly with a one-time warning, never silently.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from lit_deepseek.config import DeepSeekConfig
    from lit_deepseek.training.loss import LossParts

MicroStep = Callable[[dict], "LossParts"]

_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=3)


def graph_blockers(cfg: DeepSeekConfig) -> list[str]:
    """The settings of `cfg` under which a training step cannot be one CUDA graph per micro-batch."""
    t, moe = cfg.training, cfg.model.moe
    blockers = []
    if t.activation_checkpointing != "none":
        blockers.append(f"training.activation_checkpointing is {t.activation_checkpointing!r} (recomputation "
                        "stashes RNG state on the host)")
    if moe.capacity_factor is not None:
        blockers.append("model.moe.capacity_factor is set (dropping over-capacity tokens sizes tensors on the host)")
    if t.precision == "16-mixed":
        blockers.append("training.precision is 16-mixed (the loss scaler checks for overflow on the host)")
    if t.precision == "32-true":
        blockers.append("training.precision is 32-true (float32 experts take the per-expert reference loop, which "
                        "sizes each expert's rows on the host)")
    if moe.use_deep_ep:
        blockers.append("model.moe.use_deep_ep is on")
    return blockers


class _Graph:
    """One captured micro-batch: static inputs, the graph, its (detached) losses."""

    def __init__(self, graph: torch.cuda.CUDAGraph, inputs: dict[str, Tensor], losses: LossParts) -> None:
        self.graph, self.inputs, self.losses = graph, inputs, losses

    def replay(self, mb: dict) -> LossParts:
        for name, static in self.inputs.items():
            static.copy_(mb[name], non_blocking=True)
        self.graph.replay()
        out = self.losses
        return type(out)(out.total.clone(), out.main.clone(), None if out.mtp is None else out.mtp.clone())


class MicroBatchGraphs:
    """Replays a model's training micro-batches as CUDA graphs (see the module docstring)."""

    def __init__(self, model: nn.Module, warmup_steps: int = 2, blockers: Optional[list[str]] = None) -> None:
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.warmup_steps = warmup_steps
        self.steps = 0
        self.off: Optional[str] = None  # why the graphs are off (then every step runs eagerly)
        if blockers:
            self.off = "; ".join(blockers)
        elif torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            self.off = "more than one process (the graphs cover single-process steps)"
        self.stream = torch.cuda.Stream()
        self.pool: Any = None
        self.signature: Optional[tuple] = None
        self.first: Optional[_Graph] = None
        self.rest: Optional[_Graph] = None
        self.grads: Optional[list[Optional[Tensor]]] = None
        if self.off:
            _warn_once("off:" + self.off, f"training.cuda_graphs: steps run without CUDA graphs because {self.off}")

    @property
    def captured(self) -> int:
        """How many graphs are captured (0 during warm-up or when off)."""
        return int(self.first is not None) + int(self.rest is not None)

    @staticmethod
    def _signature(micro_batches: list[dict]) -> tuple:
        mb = micro_batches[0]
        return (len(micro_batches),) + tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(mb.items()))

    def run(self, micro_step: MicroStep, micro_batches: list[dict]) -> list[LossParts]:
        """Each micro-batch's detached losses, its gradients accumulated into ``param.grad``."""
        current = torch.cuda.current_stream()
        self.stream.wait_stream(current)
        autocast: Any = contextlib.nullcontext()
        if torch.is_autocast_enabled("cuda"):
            autocast = torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False)
        signature = self._signature(micro_batches)
        use_graphs = self.off is None and self.steps >= self.warmup_steps
        if use_graphs and self.signature is not None and signature != self.signature:
            _warn_once("shape", f"training.cuda_graphs: a step of shapes {signature} differs from the captured "
                                f"{self.signature}; it runs without CUDA graphs")
            use_graphs = False
        losses: list[LossParts] = []
        with torch.cuda.stream(self.stream), autocast:
            for i, mb in enumerate(micro_batches):
                if use_graphs and self.off is None:
                    out = self._graphed(i == 0, micro_step, mb, signature)
                    if out is not None:
                        losses.append(out)
                        continue
                losses.append(micro_step(mb))
        current.wait_stream(self.stream)
        for parts in losses:  # made on the side stream, read and freed on the current one
            for t in (parts.total, parts.main, parts.mtp):
                if t is not None:
                    t.record_stream(current)
        self.steps += 1
        return losses

    # ------------------------------------------------------------------ capture and replay
    def _graphed(self, first: bool, micro_step: MicroStep, mb: dict, signature: tuple) -> Optional[LossParts]:
        graph = self.first if first else self.rest
        if graph is None:
            graph = self._capture(first, micro_step, mb, signature)
            if graph is None:
                return None
        grads = self.grads
        assert grads is not None  # set with the first graph
        if first and any(p.grad is not None and p.grad is not g for p, g in zip(self.params, grads, strict=True)):
            # gradients the first graph does not own (a loop that did not zero them to None): keep them
            self.off = "the gradients were not None at the start of a step"
            _warn_once("grads", "training.cuda_graphs: " + self.off + "; steps run without CUDA graphs")
            return None
        out = graph.replay(mb)
        if first:
            for p, g in zip(self.params, grads, strict=True):
                if p.grad is not g:
                    p.grad = g
        return out

    def _capture(self, first: bool, micro_step: MicroStep, mb: dict, signature: tuple) -> Optional[_Graph]:
        if first:
            stale = [p.grad for p in self.params]
            if any(g is not None for g in stale):
                self.off = "the gradients were not None at the start of a step"
                _warn_once("grads", "training.cuda_graphs: " + self.off + "; steps run without CUDA graphs")
                return None
            # the eager steps' activations are free but cached: hand them back before the pool grows
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            self.pool = torch.cuda.graph_pool_handle()
            inputs = {k: torch.empty_like(v) for k, v in mb.items()}
        else:
            if self.first is None:
                return None
            inputs = self.first.inputs
        for name, static in inputs.items():
            static.copy_(mb[name])
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool, stream=self.stream, capture_error_mode="thread_local"):
                losses = micro_step(inputs)
        except Exception as exc:  # an op that waits on the host, or that cannot be captured
            if first:
                for p in self.params:
                    p.grad = None
            self.off = f"capturing the step failed ({type(exc).__name__}: {str(exc).splitlines()[0][:240]})"
            _warn_once("capture", f"training.cuda_graphs: {self.off}; steps run without CUDA graphs")
            return None
        captured = _Graph(graph, inputs, losses)
        if first:
            self.grads = [p.grad for p in self.params]
            self.first, self.signature = captured, signature
        else:
            self.rest = captured
        return captured


__all__ = ["MicroBatchGraphs", "graph_blockers"]
