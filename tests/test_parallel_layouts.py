"""Tensor and pipeline parallelism composed with EP and ZeRO, and checkpoints across layouts.

Every layout trains the same tiny model as one process does (losses, gradient norms and updated
weights within 1e-5 relative); a checkpoint written under one layout resumes under another and
continues exactly like the uninterrupted single-process run.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

import pytest
from dist_utils import (
    compare,
    distributed_run,
    history_difference,
    reference_run,
    run_distributed,
    tiny_run_config,
    weight_difference,
)

from lit_deepseek.parallel.pipeline import available_schedules

STEPS = 3
TOLERANCE = 1e-5
MODEL = {"num_layers": 4}  # 1 dense + 3 MoE blocks, + 1 MTP block


@functools.cache
def _reference(global_batch: int) -> tuple:
    return reference_run(tiny_run_config(steps_batch=global_batch, model=MODEL), STEPS)


def _pp(schedule: str, vpp: int = 1, **extra: object) -> dict:
    return {"pipeline_parallel_size": 2, "pipeline_schedule": schedule, "virtual_pipeline_stages": vpp, **extra}


LAYOUTS = {
    "TP2 (sequence parallel)": ({"tensor_parallel_size": 2, "zero_stage": 0}, 2, 4),
    "PP2 1f1b": (_pp("1f1b", zero_stage=1), 2, 4),
    "PP2 gpipe": (_pp("gpipe", zero_stage=0), 2, 4),
    "PP2 interleaved_1f1b": (_pp("interleaved_1f1b", 2, zero_stage=0), 2, 4),
    "PP2 zbv": (_pp("zbv", 2, zero_stage=0), 2, 4),
    "PP2 dualpipev": (_pp("dualpipev", 2, zero_stage=0), 2, 4),
    "TP2 x PP2 x EP2 zero1": ({"tensor_parallel_size": 2, "expert_parallel_size": 2, "zero_stage": 1,
                               **_pp("1f1b")}, 8, 4),
    "TP2 x PP2 x EP2 zero3": ({"tensor_parallel_size": 2, "expert_parallel_size": 2, "zero_stage": 3,
                               **_pp("1f1b")}, 8, 4),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process(name: str) -> None:
    parallel, world_size, global_batch = LAYOUTS[name]
    schedule = parallel.get("pipeline_schedule")
    if schedule and parallel.get("pipeline_parallel_size", 1) > 1 and schedule not in available_schedules():
        pytest.skip(f"torch has no {schedule} schedule")
    reference = _reference(global_batch)
    cfg = tiny_run_config(parallel=parallel, steps_batch=global_batch, model=MODEL)
    start = time.perf_counter()
    results = run_distributed(distributed_run, world_size, cfg, STEPS, timeout_s=180)
    wall = time.perf_counter() - start
    loss_diff, norm_diff, weight_diff = compare(reference, results)
    print(f"\nLAYOUT {name}: loss {loss_diff:.2e} grad-norm {norm_diff:.2e} weight {weight_diff:.2e} wall {wall:.1f}s")
    assert all(r[0] == results[0][0] for r in results)  # every rank logs the same global-batch loss
    assert max(loss_diff, norm_diff, weight_diff) < TOLERANCE, (loss_diff, norm_diff, weight_diff)


def test_checkpoint_resumes_under_other_layouts(tmp_path: Path) -> None:
    """Save after step 1 under TP2 x PP2; resume step 2 under EP2 x DP2 and on one process."""
    ckpt = str(tmp_path / "step1")
    saver = tiny_run_config(parallel={"tensor_parallel_size": 2, **_pp("1f1b", zero_stage=1)}, steps_batch=4,
                            model=MODEL)
    run_distributed(distributed_run, 4, saver, 1, {"save_to": ckpt}, timeout_s=120)
    assert Path(ckpt).is_dir() and not Path(ckpt + ".tmp").exists()

    full = reference_run(tiny_run_config(steps_batch=4, model=MODEL), 2)  # uninterrupted
    resumed = tiny_run_config(parallel={"expert_parallel_size": 2, "data_parallel_size": 2, "zero_stage": 3},
                              steps_batch=4, model=MODEL)
    results = run_distributed(distributed_run, 4, resumed, 2, {"load_from": ckpt, "first_step": 1}, timeout_s=120)
    single = reference_run(tiny_run_config(steps_batch=4, model=MODEL), 2, load_from=ckpt, first_step=1)
    for history in [r[0] for r in results] + [single[0]]:
        assert max(history_difference(full[0][1:], history)) < TOLERANCE, (history, full[0][1:])
    assert weight_difference(full[1], [r[1] for r in results]) < TOLERANCE
    assert weight_difference(full[1], [single[1]]) < TOLERANCE


# --------------------------------------------------------------------------------------------
# The Trainer strategy with the project's LightningModule
# --------------------------------------------------------------------------------------------


def _fit(cfg: object, steps: int, devices: int, checkpoint: str | None = None) -> dict:
    """Fit the LightningModule for `steps` optimizer steps; returns full weights (and the data slice seen)."""
    import lightning as L
    import torch
    from dist_utils import full_weights, step_batches
    from torch.utils.data import DataLoader

    from lit_deepseek.parallel.strategy import DeepSeekStrategy
    from lit_deepseek.training.module import DeepSeekLightningModule

    class StepBatches(L.LightningDataModule):
        """Each optimizer step's batch, sliced to this data-parallel rank (set by the strategy)."""

        def __init__(self) -> None:
            super().__init__()
            self.slice = (0, 1)

        def set_data_parallel(self, rank: int, size: int) -> None:
            self.slice = (rank, size)

        def train_dataloader(self) -> DataLoader:
            rank, size = self.slice
            rows = cfg.training.global_batch_size // size
            batches = [{k: v[rank * rows:(rank + 1) * rows] for k, v in b.items()} for b in step_batches(cfg, steps)]
            return DataLoader(batches, batch_size=None)

    torch.manual_seed(0)
    module = DeepSeekLightningModule(cfg.model, cfg.training, cfg.parallel)
    strategy = DeepSeekStrategy(config=cfg) if devices > 1 else "auto"
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        precision="32-true", use_distributed_sampler=False)  # the data module slices itself
    data = StepBatches()
    trainer.fit(module, datamodule=data)
    if checkpoint:
        trainer.save_checkpoint(checkpoint)
    plan = module.plan
    weights = full_weights(plan, module.model) if devices > 1 else {
        n: t.detach().clone() for n, t in list(module.model.named_parameters()) + list(module.model.named_buffers())
        if not n.endswith(("expert_load", "routed_tokens", "dropped_tokens")) and ".rope." not in f".{n}"}
    return {"weights": weights, "slice": data.slice, "step": trainer.global_step}


def _fit_rank(rank: int, world_size: int, cfg: object, steps: int, checkpoint: str) -> dict:
    return _fit(cfg, steps, world_size, checkpoint)


def test_trainer_strategy_matches_single_process_and_checkpoints(tmp_path: Path) -> None:
    from lit_deepseek.model import DeepSeekV3
    from lit_deepseek.parallel.checkpoint import load_checkpoint

    layout = {"expert_parallel_size": 2, "zero_stage": 1}
    cfg = tiny_run_config(parallel=layout, steps_batch=4, model=MODEL)
    ckpt = str(tmp_path / "trainer.ckpt")
    results = run_distributed(_fit_rank, 2, cfg, 2, ckpt, timeout_s=150, init_process_group=False)
    assert [r["slice"] for r in results] == [(0, 2), (1, 2)]  # the strategy told the data module its slice
    assert all(r["step"] == 2 for r in results)
    single = _fit(tiny_run_config(steps_batch=4, model=MODEL), 2, 1)
    assert weight_difference(single["weights"], [r["weights"] for r in results]) < TOLERANCE

    # the Trainer's distributed checkpoint loads into one process
    model = DeepSeekV3(cfg.model)
    extra = load_checkpoint(ckpt, [model])
    assert extra["global_step"] == 2
    loaded = {n: t for n, t in list(model.named_parameters()) + list(model.named_buffers()) if n in single["weights"]}
    assert weight_difference(single["weights"], [loaded]) < TOLERANCE
