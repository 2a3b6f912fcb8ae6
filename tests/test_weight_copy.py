"""The bf16 working copy (`training.bf16_weight_copy`) against autocast's own weight casts.

On CPU under bf16 autocast, as `lit-deepseek fit` runs `bf16-mixed`: the shipped `LocalPlan` with
and without the copy, from the same weights, over steps with gradient accumulation and optimizer
steps in between, give the same losses and the same float32 gradients bit for bit; the modules
hold their float32 masters outside a step; the CLI's default reaches the copy. The GPU comparison
(compiled blocks, CUDA graphs) is in `tests/test_cuda_graphs.py`.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from lit_deepseek.config import load_config
from lit_deepseek.model import DeepSeekV3
from lit_deepseek.training.step import LocalPlan, build_optimizer, make_loss_fn
from lit_deepseek.training.weight_copy import Bf16WeightCopy

ROOT = Path(__file__).resolve().parents[1]


def _config():  # noqa: ANN202
    cfg = load_config(ROOT / "configs" / "cpu_demo.yaml")
    cfg.model.num_layers = 2
    cfg.training.precision = "bf16-mixed"
    cfg.training.learning_rate, cfg.training.lr_warmup_steps = 1e-2, 1
    return cfg


def test_copy_covers_the_matmul_weights_only() -> None:
    cfg = _config()
    model = DeepSeekV3(cfg.model)
    copies = Bf16WeightCopy(model)
    names = {f"{[n for n, m in model.named_modules() if m is mod][0]}.{p}" for mod, p in copies.slots}
    assert "layers.0.attn.q_a_proj.weight" in names and "layers.1.ffn.experts.w2" in names
    assert "mtp.0.eh_proj.weight" in names and "mtp.0.block.ffn.shared_experts.down_proj.weight" in names
    for kept in ("head.weight", "embed.weight", "layers.1.ffn.gate_weight", "layers.0.attn_norm.weight"):
        assert kept not in names, kept
    assert all(c.dtype == torch.bfloat16 for c in copies.copies)


def test_fp8_layers_quantize_their_masters_and_stay_out_of_the_copy() -> None:
    from lit_deepseek.kernels.fp8 import convert_to_fp8

    cfg = _config()
    model = DeepSeekV3(cfg.model)
    counts = convert_to_fp8(model, "blockwise", exclude=("embed", "head", "gate", "eh_proj"), emulate=True)
    assert counts["linear"] > 0 and counts["experts"] > 0
    names = {f"{[n for n, m in model.named_modules() if m is mod][0]}.{p}" for mod, p in Bf16WeightCopy(model).slots}
    # only the layers left in bf16 (here the MTP projection) are copied
    assert names == {"mtp.0.eh_proj.weight"}, names


@pytest.mark.parametrize("micro", [1, 2])
def test_steps_with_the_copy_equal_autocast_bit_for_bit(micro: int) -> None:
    cfg = _config()
    torch.manual_seed(0)
    base = DeepSeekV3(cfg.model)
    base.init_weights(seed=5)
    runs = []
    for weight_copy in (False, True):
        model = copy.deepcopy(base)
        plan = LocalPlan(weight_copy=weight_copy)
        model = plan.parallelize(model, cfg)
        optimizer, _ = build_optimizer(plan, model, cfg)
        loss_fn = make_loss_fn(cfg.model, cfg.training)
        masters = {n: p for n, p in model.named_parameters()}
        seen: list[torch.dtype] = []  # the dtype each step's q_a_proj and experts really multiply with
        model.layers["0"].attn.q_a_proj.register_forward_pre_hook(lambda m, a, seen=seen: seen.append(m.weight.dtype))
        model.layers["1"].ffn.experts.register_forward_pre_hook(lambda m, a, seen=seen: seen.append(m.w1.dtype))
        gen = torch.Generator().manual_seed(1)
        losses, grads = [], []
        for _ in range(3):
            ids = torch.randint(0, cfg.model.vocab_size, (4, 33), generator=gen)
            batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
            with torch.autocast("cpu", dtype=torch.bfloat16):  # one region per step, as Lightning opens
                losses.append(plan.forward_backward(model, batch, micro, loss_fn).total)
            grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        # outside a step the modules hold the very float32 parameters the optimizer steps
        assert {n: p for n, p in model.named_parameters()} == masters
        assert all(p.dtype == torch.float32 for p in model.parameters())
        copies = plan._copy  # made inside the autocast region of the first step
        assert (copies is not None) == weight_copy
        if copies is not None:
            assert len(copies) > 0 and all(c.grad is None for c in copies.copies)
        assert set(seen) == {torch.bfloat16 if weight_copy else torch.float32}
        runs.append((losses, grads, {n: p.detach().clone() for n, p in model.named_parameters()}))
    (l0, g0, w0), (l1, g1, w1) = runs
    for a, b in zip(l0, l1, strict=True):
        assert torch.equal(a, b), (a, b)
    for step, (a, b) in enumerate(zip(g0, g1, strict=True)):
        assert a.keys() == b.keys()
        for name in a:
            assert a[name].dtype == b[name].dtype == torch.float32
            assert torch.equal(a[name], b[name]), (step, name, (a[name] - b[name]).abs().max())
    for name in w0:
        assert torch.equal(w0[name], w1[name]), name


def test_copy_is_off_without_bf16_autocast_and_masters_come_back_after_an_error() -> None:
    cfg = _config()
    model = DeepSeekV3(cfg.model)
    model.init_weights(seed=0)
    plan = LocalPlan(weight_copy=True)
    assert plan.weight_copies(model) is None  # float32 step: nothing to cast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        copies = plan.weight_copies(model)
    assert copies is not None
    before = [p for p in model.parameters()]

    class Boom(Exception):
        pass

    # a step of one micro-batch keeps autocast's casts: the weights multiply as float32 masters
    seen: list[torch.dtype] = []
    model.layers["0"].attn.q_a_proj.register_forward_pre_hook(lambda m, a: seen.append(m.weight.dtype))
    ids = torch.randint(0, cfg.model.vocab_size, (2, 17))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plan.forward_backward(model, {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}, 2,
                              make_loss_fn(cfg.model, cfg.training))
        assert seen == [torch.float32]
        plan.forward_backward(model, {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}, 1,
                              make_loss_fn(cfg.model, cfg.training))
        assert seen == [torch.float32, torch.bfloat16, torch.bfloat16]

    with pytest.raises(Boom), copies.swapped():
        assert model.layers["0"].attn.q_a_proj.weight.dtype == torch.bfloat16
        raise Boom
    assert [p for p in model.parameters()] == before
    assert isinstance(model.layers["0"].attn.q_a_proj.weight, nn.Parameter)
    assert model.layers["0"].attn.q_a_proj.weight.dtype == torch.float32


def test_default_config_asks_for_the_copy() -> None:
    from lit_deepseek.training.module import DeepSeekLightningModule

    cfg = load_config(ROOT / "configs" / "deepseek_v3_small.yaml")
    assert cfg.training.bf16_weight_copy and cfg.training.precision == "bf16-mixed"
    module = DeepSeekLightningModule(cfg.model, cfg.training)
    assert module._local_plan.weight_copy


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("compile_", [False, True])
def test_copy_matches_autocast_on_gpu_without_recompiles(compile_: bool) -> None:
    """Compiled blocks and grouped-GEMM experts on a GPU, eager step (no graphs): from the same
    weights every step, the copy's losses and gradients equal autocast's to bf16 rounding, and the
    compiled blocks stop recompiling after the first step."""
    from torch._dynamo.utils import counters

    from tests.test_cuda_graphs import compare_with_autocast_steps, gpu_config

    cfg = gpu_config(2, 8, compile_, False)
    with torch.device("cuda"):
        model = DeepSeekV3(cfg.model)
    model.init_weights(seed=11)
    plan = LocalPlan(weight_copy=True)
    model = plan.parallelize(model, cfg)
    graphs_after_warmup: list[int] = []

    def after_step(step: int) -> None:
        if step == 1:
            graphs_after_warmup.append(counters["stats"]["unique_graphs"])

    # run-to-run noise of the GPU step (see tests/test_cuda_graphs.py); CPU above compares bit for bit
    compare_with_autocast_steps(plan, model, cfg, steps=4, loss_rtol=1e-3, grad_bound=3e-2, after_step=after_step)
    assert plan._copy is not None and len(plan._copy) > 0
    if compile_:
        assert counters["stats"]["unique_graphs"] == graphs_after_warmup[0]
