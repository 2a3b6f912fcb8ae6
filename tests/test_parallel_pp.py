"""Pipeline parallelism (PP2, gloo, CPU): every schedule gives the single-process losses and weights."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model_config
from dist_utils import run_distributed
from test_parallel_tp import (
    MICRO,
    loss_fn,
    make_batches,
    make_model,
    make_optimizer,
    max_relative_difference,
    reference_run,
)

from lit_deepseek.config import ConfigError, DeepSeekConfig, ParallelConfig, TrainingConfig, validate_config
from lit_deepseek.parallel.layout import layer_split
from lit_deepseek.parallel.pipeline import available_schedules

N_MICRO = 4
CASES = [  # (schedule, virtual stages, explicit layer split)
    ("gpipe", 1, None),
    ("1f1b", 1, [3, 1]),
    ("interleaved_1f1b", 2, None),
    ("zbv", 2, None),
    ("dualpipev", 2, None),
]


def run_config(cfg, parallel: ParallelConfig, micro_batches: int = N_MICRO, micro: int = MICRO) -> DeepSeekConfig:
    training = TrainingConfig(global_batch_size=micro_batches * micro, micro_batch_size=micro, seq_length=16)
    return DeepSeekConfig(model=cfg, parallel=parallel, training=training)


def _pp_worker(rank: int, world_size: int, cfg, batches, parallel: ParallelConfig) -> dict:
    from lit_deepseek.parallel.pipeline import build_pipeline
    from lit_deepseek.training.step import split_micro_batches

    layout = validate_config(run_config(cfg, parallel), world_size)
    layout.build_mesh("cpu")
    model = make_model(cfg)
    handle = build_pipeline(model, layout)
    del model
    params = [p for part in handle.stage_modules for p in part.parameters()]
    opt = make_optimizer(params)
    losses = []
    for batch in batches:
        opt.zero_grad()
        parts = handle.forward_backward(split_micro_batches(batch, MICRO), loss_fn, 1.0 / layout.accumulation_steps)
        opt.step()
        losses.append(None if parts is None else parts.total.item())
    states = [{k: v.detach().clone() for k, v in part.named_parameters()} for part in handle.stage_modules]
    loads = {name: buf.clone() for part in handle.stage_modules
             for name, buf in part.named_buffers() if name.endswith("expert_load")}
    return {"losses": losses, "states": states, "loads": loads, "stages": handle.stage_ids,
            "first": handle.has_first_stage, "last": handle.has_last_stage}


@pytest.fixture(scope="module")
def reference():
    cfg = tiny_model_config(num_layers=4)
    batches = make_batches(cfg, micro_batches=N_MICRO)
    ref = reference_run(cfg, batches)
    return cfg, batches, ref[:2], ref[2]


@pytest.mark.parametrize(("schedule", "vpp", "split"), CASES, ids=[c[0] for c in CASES])
def test_pp2_matches_single_process(reference, schedule: str, vpp: int, split) -> None:
    if schedule not in available_schedules():
        pytest.skip(f"torch {torch.__version__} has no {schedule} schedule")
    cfg, batches, (ref_losses, ref_state), ref_loads = reference
    parallel = ParallelConfig(pipeline_parallel_size=2, pipeline_schedule=schedule, virtual_pipeline_stages=vpp,
                              pipeline_layer_split=split)
    results = run_distributed(_pp_worker, 2, cfg, batches, parallel, timeout_s=60)
    held = sorted(s for r in results for s in r["stages"])
    assert held == list(range(2 * vpp))
    last = [r for r in results if r["last"]]
    assert len(last) == 1 and all(r["losses"] == [None] * len(batches) for r in results if not r["last"])
    losses = last[0]["losses"]
    loss_diff = max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses, strict=True))
    # every parameter is held by some stage; the embedding also by the last one (MTP), equal in both
    seen: dict[str, float] = {}
    for r in results:
        for state in r["states"]:
            for name, value in state.items():
                diff = max_relative_difference({name: value}, {name: ref_state[name]})
                seen[name] = max(seen.get(name, 0.0), diff)
    assert set(seen) == set(ref_state)
    weight_diff = max(seen.values())
    print(f"PP2 {schedule}: loss rel diff {loss_diff:.2e}, weight rel diff {weight_diff:.2e}")
    assert loss_diff < 1e-5, (losses, ref_losses)
    assert weight_diff < 1e-5
    # expert loads (for the bias update) counted once per routed copy, as in one process
    loads = {k: v for r in results for k, v in r["loads"].items()}
    assert loads.keys() == ref_loads.keys()
    for name, load in loads.items():
        torch.testing.assert_close(load, ref_loads[name], rtol=0, atol=0)


def test_stage_layout_and_bad_settings() -> None:
    assert layer_split(4, 2) == ((0, 1), (2, 3))
    assert layer_split(4, 2, [3, 1]) == ((0, 1, 2), (3,))
    zbv = validate_config(run_config(tiny_model_config(num_layers=4), ParallelConfig(
        pipeline_parallel_size=2, pipeline_schedule="zbv", virtual_pipeline_stages=2)), world_size=2)
    assert zbv.stage_indices(0) == [0, 3] and zbv.stage_layers == ((0,), (1,), (2,), (3,))
    assert zbv.accumulation_steps == N_MICRO
    cases = {
        "virtual_pipeline_stages": ParallelConfig(pipeline_parallel_size=2, pipeline_schedule="zbv"),
        "pipeline_layer_split": ParallelConfig(pipeline_parallel_size=2, pipeline_layer_split=[1, 1]),
        r"PP x virtual stages \(4\)": ParallelConfig(pipeline_parallel_size=2, pipeline_schedule="interleaved_1f1b",
                                    virtual_pipeline_stages=2, data_parallel_size=1),
    }
    for field, parallel in cases.items():
        with pytest.raises(ConfigError, match=field):
            validate_config(run_config(tiny_model_config(num_layers=3), parallel))
    with pytest.raises(ConfigError, match="at least PP"):
        validate_config(run_config(tiny_model_config(num_layers=4), ParallelConfig(pipeline_parallel_size=2),
                                   micro_batches=1))
    with pytest.raises(ConfigError, match="multiple of PP"):
        validate_config(run_config(tiny_model_config(num_layers=4), ParallelConfig(
            pipeline_parallel_size=2, pipeline_schedule="interleaved_1f1b", virtual_pipeline_stages=2),
            micro_batches=3))



