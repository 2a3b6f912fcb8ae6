"""Mesh layout, validation before any process group, and the expert-parallel token dispatchers."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist
from dist_utils import run_distributed, tiny_run_config

from lit_deepseek.config import ConfigError, validate_config
from lit_deepseek.model.dispatch import LocalDispatcher
from lit_deepseek.parallel.expert import AllToAllDispatcher, make_dispatcher
from lit_deepseek.parallel.layout import Layout

# --------------------------------------------------------------------------------------------
# Bad input: rejected before any process group exists
# --------------------------------------------------------------------------------------------

BAD_LAYOUTS = [
    ({"parallel": {"tensor_parallel_size": 2, "data_parallel_size": 2}}, 8, "world size is 8"),
    ({"parallel": {"expert_parallel_size": 2, "tensor_parallel_size": 2}}, 6,
     "world size 6 is not divisible by TP x PP x EP"),
    ({"parallel": {"tensor_parallel_size": 8, "data_parallel_size": 1}, "model": {"mla.num_heads": 4}}, 8,
     "model.mla.num_heads (4) must be divisible by TP (8)"),
    ({"parallel": {"expert_parallel_size": 3, "data_parallel_size": 1}}, 3,
     "model.moe.num_experts (8) must be divisible by EP (3)"),
    ({"parallel": {"pipeline_parallel_size": 2, "virtual_pipeline_stages": 2, "pipeline_schedule": "interleaved_1f1b",
                   "data_parallel_size": 1}, "model": {"num_layers": 6}}, 2,
     "must be divisible by PP x virtual stages (4)"),
    ({"parallel": {"pipeline_parallel_size": 2, "pipeline_schedule": "zbv", "data_parallel_size": 1}}, 2,
     "schedule zbv needs exactly 2 stages per rank"),
    ({"parallel": {"pipeline_parallel_size": 2, "virtual_pipeline_stages": 2, "pipeline_schedule": "1f1b",
                   "data_parallel_size": 1}, "model": {"num_layers": 4}}, 2, "schedule 1f1b takes 1 stage per rank"),
]


@pytest.mark.parametrize(("overrides", "world_size", "message"), BAD_LAYOUTS)
def test_bad_layout_is_rejected_before_any_process_group(overrides: dict, world_size: int, message: str) -> None:
    cfg = tiny_run_config(parallel=overrides.get("parallel"), model=overrides.get("model"))
    with pytest.raises(ConfigError) as info:
        validate_config(cfg, world_size)
    assert message in str(info.value)
    assert "\n" not in str(info.value)
    assert not dist.is_initialized()


def test_data_parallel_minus_one_takes_what_is_left() -> None:
    cfg = tiny_run_config(parallel={"tensor_parallel_size": 2, "expert_parallel_size": 2})
    layout = validate_config(cfg, 8)
    assert (layout.pp, layout.dp, layout.ep, layout.tp) == (1, 2, 2, 2)
    assert layout.data_parallel_size == 4
    assert layout.accumulation_steps == cfg.training.global_batch_size // (cfg.training.micro_batch_size * 4)


def test_tensor_parallel_is_innermost_and_data_rank_spans_dp_and_ep() -> None:
    layout = Layout(pp=2, dp=2, ep=2, tp=2)
    coords = [layout.coordinate(r) for r in range(16)]
    assert [c["tp"] for c in coords[:4]] == [0, 1, 0, 1]  # TP peers are neighbouring ranks
    assert coords[8]["pp"] == 1 and coords[7]["pp"] == 0
    # TP and PP peers read the same data; the EP x DP ranks of one stage read different slices
    assert layout.data_parallel_rank(0) == layout.data_parallel_rank(1) == layout.data_parallel_rank(8)
    assert sorted({layout.data_parallel_rank(r) for r in range(0, 8, 2)}) == [0, 1, 2, 3]


def test_deep_ep_without_expert_parallelism_warns_once_and_stays_local() -> None:
    cfg = tiny_run_config(model={"moe.use_deep_ep": True})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = make_dispatcher(cfg.model, None)
        make_dispatcher(cfg.model, None)
    messages = [str(w.message) for w in caught if "use_deep_ep" in str(w.message)]
    assert len(messages) == 1 and "expert_parallel_size is 1" in messages[0]
    assert isinstance(first, LocalDispatcher)


# --------------------------------------------------------------------------------------------
# Real process groups
# --------------------------------------------------------------------------------------------


def _mesh_worker(rank: int, world_size: int) -> dict:
    cfg = tiny_run_config(parallel={"expert_parallel_size": 2})  # DP = -1 -> 2
    layout = validate_config(cfg, world_size)
    mesh = layout.build_mesh("cpu")
    assert layout.build_mesh("cpu") is mesh  # built once, cached with its sub-meshes
    dp_ep = layout.submesh("dp_ep")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg.model.moe.use_deep_ep = True
        dispatcher = make_dispatcher(cfg.model, mesh["ep"].get_group())
    return {
        "coordinate": layout.local_coordinate(),
        "expected": layout.coordinate(rank),
        "data_rank": dp_ep.get_local_rank(),
        "expected_data_rank": layout.data_parallel_rank(rank),
        "dp_ep_ranks": sorted(dist.get_process_group_ranks(dp_ep.get_group())),
        "ep_ranks": sorted(dist.get_process_group_ranks(mesh["ep"].get_group())),
        "dispatcher": type(dispatcher).__name__,
        "warnings": [str(w.message) for w in caught if "use_deep_ep" in str(w.message)],
    }


def test_mesh_axes_groups_and_deep_ep_fallback() -> None:
    results = run_distributed(_mesh_worker, 4)
    for rank, r in enumerate(results):
        assert r["coordinate"] == r["expected"]
        assert r["data_rank"] == r["expected_data_rank"]
        assert r["dp_ep_ranks"] == [0, 1, 2, 3]
        assert r["ep_ranks"] == ([0, 1] if rank < 2 else [2, 3])
        assert r["dispatcher"] == "AllToAllDispatcher"
    assert len(results[0]["warnings"]) == 1 and "needs CUDA" in results[0]["warnings"][0]
    assert results[1]["warnings"] == []  # one warning for the job, from rank 0


def _dispatch_worker(rank: int, world_size: int) -> dict:
    num_experts, hidden = 6, 5
    group = dist.new_group(list(range(world_size)))
    dispatcher = AllToAllDispatcher(group)
    g = torch.Generator().manual_seed(rank)
    counts = torch.randint(0, 4, (num_experts,), generator=g)
    counts[0] = 0  # an expert no rank sends to from rank 0
    x = torch.randn(int(counts.sum()), hidden, generator=g, requires_grad=True)
    expert_of_row = torch.repeat_interleave(torch.arange(num_experts), counts)
    x_local, local_counts, handle = dispatcher.dispatch(x, counts)
    start, end = dispatcher.local_expert_range(num_experts)
    # a per-expert function the backward must route back: row * (global expert id + 1)
    local_expert = torch.repeat_interleave(torch.arange(start, end), local_counts)
    y = dispatcher.combine(x_local * (local_expert + 1).to(x.dtype)[:, None], handle)
    (y * torch.arange(hidden, dtype=x.dtype)).sum().backward()
    return {"x": x.detach(), "counts": counts, "x_local": x_local.detach(), "local_counts": local_counts,
            "range": (start, end), "y": y.detach(), "grad": x.grad, "expert_of_row": expert_of_row,
            "global": dispatcher.global_tokens_per_expert(counts)}


def test_all_to_all_dispatch_combine_and_gradients() -> None:
    results = run_distributed(_dispatch_worker, 2)
    total = sum(r["counts"] for r in results)
    for r in results:
        start, end = r["range"]
        # rows for my experts arrive grouped by local expert, source ranks in order within each expert
        expected = torch.cat([src["x"][src["expert_of_row"] == e] for e in range(start, end) for src in results])
        assert torch.equal(r["x_local"], expected)
        assert torch.equal(r["local_counts"], total[start:end])
        scale = (r["expert_of_row"] + 1).to(r["x"].dtype)[:, None]
        torch.testing.assert_close(r["y"], r["x"] * scale, rtol=0, atol=0)
        torch.testing.assert_close(r["grad"], scale * torch.arange(r["x"].shape[1], dtype=r["x"].dtype))
        assert torch.equal(r["global"], total)


def test_fabric_strategy_rejects_a_bad_layout_before_any_process_group() -> None:
    import lightning as L

    from lit_deepseek.parallel.strategy import DeepSeekFabricStrategy

    cfg = tiny_run_config(parallel={"tensor_parallel_size": 2, "data_parallel_size": 1})
    fabric = L.Fabric(accelerator="cpu", devices=1, strategy=DeepSeekFabricStrategy(cfg))
    with pytest.raises(ConfigError, match="world size is 1"):
        fabric.launch()
    assert not dist.is_initialized()


def _empty_expert_worker(rank: int, world_size: int) -> dict:
    hidden = 3
    group = dist.new_group(list(range(world_size)))
    dispatcher = AllToAllDispatcher(group)
    counts = torch.tensor([2, 1, 0, 0])  # 4 experts  # nobody routes to rank 1's experts (2 and 3)
    x = torch.randn(int(counts.sum()), hidden, requires_grad=True)
    x_local, local_counts, handle = dispatcher.dispatch(x, counts)
    # experts that received nothing produce an output outside the autograd graph
    y_local = x_local * 2 if int(local_counts.sum()) else torch.zeros(0, hidden)
    dispatcher.combine(y_local, handle).sum().backward()
    return {"grad": x.grad, "received": int(local_counts.sum())}


def test_rank_whose_experts_receive_nothing_still_joins_backward() -> None:
    """Without this, the other EP ranks wait forever in the backward all-to-all."""
    results = run_distributed(_empty_expert_worker, 2, timeout_s=60)
    assert [r["received"] for r in results] == [6, 0]
    for r in results:
        torch.testing.assert_close(r["grad"], torch.full_like(r["grad"], 2.0))
