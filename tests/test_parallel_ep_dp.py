"""Expert and data parallelism (ZeRO 0-3) train exactly like one process.

Each layout runs three optimizer steps of a tiny MoE model on real gloo processes and is compared
with the single-process run (LocalPlan, gradient accumulation over the same global batch): the
logged losses and every updated weight (experts gathered over EP) must agree to 1e-5 relative.
"""

from __future__ import annotations

import functools
import time

import pytest
from dist_utils import compare, distributed_run, reference_run, run_distributed, tiny_run_config

STEPS = 3
TOLERANCE = 1e-5


@functools.cache
def _reference(global_batch: int) -> tuple:
    return reference_run(tiny_run_config(steps_batch=global_batch), STEPS)


LAYOUTS = {
    "EP2 zero0 overlap": ({"expert_parallel_size": 2, "zero_stage": 0, "overlap_grad_reduce": True}, 2, 4),
    "DP2 zero1": ({"data_parallel_size": 2, "zero_stage": 1, "overlap_grad_reduce": False}, 2, 4),
    "DP2 zero3": ({"data_parallel_size": 2, "zero_stage": 3}, 2, 4),
    "EP2 x DP2 zero2": ({"expert_parallel_size": 2, "data_parallel_size": 2, "zero_stage": 2}, 4, 8),
    "EP2 x DP2 zero3": ({"expert_parallel_size": 2, "data_parallel_size": 2, "zero_stage": 3}, 4, 8),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process(name: str) -> None:
    parallel, world_size, global_batch = LAYOUTS[name]
    reference = _reference(global_batch)
    cfg = tiny_run_config(parallel=parallel, steps_batch=global_batch)
    start = time.perf_counter()
    results = run_distributed(distributed_run, world_size, cfg, STEPS, timeout_s=180)
    wall = time.perf_counter() - start
    loss_diff, norm_diff, weight_diff = compare(reference, results)
    print(f"\nLAYOUT {name}: loss {loss_diff:.2e} grad-norm {norm_diff:.2e} weight {weight_diff:.2e} wall {wall:.1f}s")
    # every rank logs the same global-batch loss
    assert all(r[0] == results[0][0] for r in results)
    assert max(loss_diff, norm_diff, weight_diff) < TOLERANCE, (loss_diff, norm_diff, weight_diff)
