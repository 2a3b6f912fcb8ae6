"""Run a function in N real processes joined by a gloo process group on CPU.

Every test that needs torch.distributed uses `run_distributed`: a free TCP port, one process per
rank, a hard timeout (a hung collective fails the test instead of hanging the suite), and each
rank's return value handed back to the test.
"""

from __future__ import annotations

import faulthandler
import multiprocessing
import os
import pickle
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor

_PRELOAD = ["torch", "torch.distributed", "torch.distributed.fsdp", "torch.distributed.tensor",
            "lit_deepseek.model", "lit_deepseek.parallel.plan", "lit_deepseek.training.loss", "dist_utils"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, fn: Callable, world_size: int, port: int, out_dir: str, args: tuple, init_pg: bool,
            timeout_s: float) -> None:
    faulthandler.dump_traceback_later(max(1.0, timeout_s - 5), exit=False)  # a hang shows where it is
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    result: Any
    try:
        if init_pg:
            dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = ("ok", fn(rank, world_size, *args))
        if dist.is_initialized():
            dist.barrier()  # rank 0 hosts the store: it must not leave while others still use it
    except BaseException:  # noqa: B036 - report every failure to the parent
        result = ("error", traceback.format_exc())
    finally:
        if init_pg and dist.is_initialized():
            dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)


def run_distributed(fn: Callable, world_size: int, *args: Any, timeout_s: float = 120.0,
                    init_process_group: bool = True) -> list[Any]:
    """Call ``fn(rank, world_size, *args)`` on `world_size` gloo ranks; return the results by rank.

    `fn` must be importable (a module-level function). Raises with the first rank's traceback when
    any rank fails, and kills all ranks when the timeout passes.
    """
    port = free_port()
    # A fork server that has imported torch and the package once starts every rank in a fraction
    # of the time a fresh interpreter needs (and, unlike plain fork, from a single-threaded parent).
    multiprocessing.set_forkserver_preload(_PRELOAD)
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(_worker, args=(fn, world_size, port, out_dir, args, init_process_group, timeout_s),
                                 nprocs=world_size, join=False, start_method="forkserver")
        deadline = time.monotonic() + timeout_s
        try:
            while not ctx.join(timeout=max(0.1, min(1.0, deadline - time.monotonic()))):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"distributed run of {fn.__name__} on {world_size} ranks exceeded {timeout_s} s")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
                    p.join()
        results = []
        for rank in range(world_size):
            path = os.path.join(out_dir, f"rank{rank}.pkl")
            if not os.path.exists(path):
                raise RuntimeError(f"rank {rank} of {fn.__name__} produced no result")
            with open(path, "rb") as f:
                status, value = pickle.load(f)
            if status == "error":
                raise RuntimeError(f"rank {rank} of {fn.__name__} failed:\n{value}")
            results.append(value)
    return results


# --------------------------------------------------------------------------------------------
# A few training steps under a layout, and the same steps on one process (the reference)
# --------------------------------------------------------------------------------------------


def tiny_run_config(parallel: dict | None = None, model: dict | None = None, steps_batch: int = 8,
                    micro_batch_size: int = 1, seq_length: int = 16) -> Any:
    """A DeepSeekConfig for a tiny model that trains in well under a second per step on CPU."""
    from conftest import tiny_model_config

    from lit_deepseek.config import DeepSeekConfig, ParallelConfig, TrainingConfig

    # a bias step large enough that the aux-loss-free update changes routing within a few steps
    mcfg = tiny_model_config(**{"moe.bias_update_speed": 0.01, **(model or {})})
    tcfg = TrainingConfig(global_batch_size=steps_batch, micro_batch_size=micro_batch_size, learning_rate=1e-3,
                          min_learning_rate=1e-3, lr_warmup_steps=0, lr_schedule="constant", grad_clip=0.5,
                          weight_decay=0.1, seq_length=seq_length, precision="32-true", loss_chunk_size=24)
    return DeepSeekConfig(model=mcfg, parallel=ParallelConfig(**(parallel or {})), training=tcfg)


def step_batches(cfg: Any, steps: int, seed: int = 0) -> list[dict]:
    """The global batch of each step (the same for every layout)."""
    g = torch.Generator().manual_seed(seed)
    t, v = cfg.training, cfg.model.vocab_size
    out = []
    for _ in range(steps):
        ids = torch.randint(0, v, (t.global_batch_size, t.seq_length + 1), generator=g)
        out.append({"input_ids": ids[:, :-1].contiguous(), "labels": ids[:, 1:].contiguous()})
    return out


def train_steps(cfg: Any, plan: Any, steps: int, first_step: int = 0, load_from: str | None = None,
                save_to: str | None = None) -> tuple[list, Any]:
    """The shipped training step (`lit_deepseek.training.step.train_step`) over the fixed batches.

    Runs steps [first_step, steps) of the fixed batch sequence on this rank's data slice, optionally
    resuming from and/or saving a distributed checkpoint. Returns (per-step [total, main, mtp,
    grad_norm], the model).
    """
    from lit_deepseek.model import DeepSeekV3
    from lit_deepseek.parallel.checkpoint import load_checkpoint, save_checkpoint
    from lit_deepseek.training.step import build_optimizer, make_loss_fn, train_step

    torch.manual_seed(0)
    model = DeepSeekV3(cfg.model)
    model.init_weights(seed=cfg.training.seed)
    model = plan.parallelize(model, cfg)
    parts = plan.model_parts(model)
    optimizer, _ = build_optimizer(plan, model, cfg)
    loss_fn = make_loss_fn(cfg.model, cfg.training)
    if load_from:
        extra = load_checkpoint(load_from, parts, optimizer, plan)
        assert extra == {"step": first_step}, extra
    history = []
    rank, size = plan.data_parallel_rank, plan.data_parallel_size
    for batch in step_batches(cfg, steps)[first_step:]:
        rows = batch["input_ids"].shape[0] // size
        local = {k: v[rank * rows:(rank + 1) * rows] for k, v in batch.items()}
        result = train_step(plan, model, local, optimizer, cfg.training, loss_fn)
        out = result.loss
        history.append([float(out.total), float(out.main), float(out.mtp or 0.0), float(result.grad_norm)])
    if save_to:
        save_checkpoint(save_to, parts, optimizer, plan, extra={"step": steps})
    return history, model


def full_weights(plan: Any, model: Any) -> dict[str, Tensor]:
    """Every parameter and buffer this rank holds, as full tensors under single-process names.

    DTensors are gathered; routed experts are gathered over the EP group to all E experts.
    """
    from torch.distributed.tensor import DTensor

    from lit_deepseek.parallel.plan import DistributedPlan

    parts = plan.model_parts(model)
    out: dict[str, Tensor] = {}
    for part in parts:
        for name, t in list(part.named_parameters()) + list(part.named_buffers()):
            if name.endswith(("expert_load", "routed_tokens", "dropped_tokens")) or ".rope." in f".{name}":
                continue
            full = t.full_tensor() if isinstance(t, DTensor) else t
            full = full.detach().clone()
            if ".experts." in f".{name}" and isinstance(plan, DistributedPlan) and plan.layout.ep > 1:
                pieces = [torch.empty_like(full) for _ in range(plan.layout.ep)]
                dist.all_gather(pieces, full.contiguous(), group=plan.ep_group)
                full = torch.cat(pieces)
            out[name] = full
    return out


def reference_run(cfg: Any, steps: int, **kwargs: Any) -> tuple[list, dict[str, Tensor]]:
    """The single-process run: LocalPlan, gradient accumulation over the whole global batch."""
    from lit_deepseek.training.step import LocalPlan

    plan = LocalPlan()
    history, model = train_steps(cfg, plan, steps, **kwargs)
    weights = {n: t.detach().clone() for n, t in list(model.named_parameters()) + list(model.named_buffers())
               if not n.endswith(("expert_load", "routed_tokens", "dropped_tokens")) and ".rope." not in f".{n}"}
    return history, weights


def distributed_run(rank: int, world_size: int, cfg: Any, steps: int, kwargs: dict | None = None
                    ) -> tuple[list, dict[str, Tensor], dict]:
    """One rank of a layout run: returns (history, full weights held here, mesh coordinate)."""
    from lit_deepseek.parallel.plan import DistributedPlan

    layout = cfg.validate(world_size)
    layout.build_mesh("cpu")
    plan = DistributedPlan(layout)
    history, model = train_steps(cfg, plan, steps, **(kwargs or {}))
    return history, full_weights(plan, model), plan.coordinate


def fp8_reuse_run(rank: int, world_size: int, cfg: Any, steps: int, reuse: bool) -> tuple[list, dict, dict, dict]:
    """`distributed_run` with the FP8 weight reuse across micro-batches on or off
    (LIT_DEEPSEEK_FP8_WEIGHT_CACHE, set in the rank itself), plus the rank's reuse counters."""
    os.environ["LIT_DEEPSEEK_FP8_WEIGHT_CACHE"] = "1" if reuse else "0"
    from lit_deepseek.kernels import fp8

    fp8.clear_fp8_weight_cache()
    history, weights, coordinate = distributed_run(rank, world_size, cfg, steps)
    return history, weights, coordinate, fp8.fp8_weight_cache_info()


def weight_difference(ref_w: dict[str, Tensor], weights_by_rank: list[dict[str, Tensor]]) -> float:
    """Max over tensors of ||w - ref|| / ||ref||; every reference tensor must be held by some rank."""
    weight_diff, worst = 0.0, ""
    seen: set[str] = set()
    for weights in weights_by_rank:
        for name, w in weights.items():
            ref = ref_w[name]
            assert ref.shape == w.shape, f"{name}: {tuple(w.shape)} vs reference {tuple(ref.shape)}"
            denom = ref.float().norm().item() or 1.0
            diff = (w.float() - ref.float()).norm().item() / denom
            if diff > weight_diff:
                weight_diff, worst = diff, name
            seen.add(name)
    if os.environ.get("LIT_DEEPSEEK_SHOW_WORST") and weight_diff:
        print(f"largest weight difference: {worst} {weight_diff:.2e}")
    missing = set(ref_w) - seen
    assert not missing, f"no rank holds {sorted(missing)[:5]}"
    return weight_diff


def history_difference(ref_hist: list, hist: list) -> tuple[float, float]:
    """Max relative differences of the losses and of the gradient norms, step by step."""
    loss_diff = norm_diff = 0.0
    for ref_step, step in zip(ref_hist, hist, strict=True):
        for a, b in zip(ref_step[:3], step[:3], strict=True):
            loss_diff = max(loss_diff, abs(a - b) / max(abs(a), 1e-12))
        norm_diff = max(norm_diff, abs(ref_step[3] - step[3]) / max(abs(ref_step[3]), 1e-12))
    return loss_diff, norm_diff


def compare(reference: tuple[list, dict], results: list) -> tuple[float, float, float]:
    """Max relative differences (losses, gradient norms, weights) over steps, ranks and tensors."""
    ref_hist, ref_w = reference
    diffs = [history_difference(ref_hist, hist) for hist, _, _ in results]
    return (max(d[0] for d in diffs), max(d[1] for d in diffs),
            weight_difference(ref_w, [weights for _, weights, _ in results]))
