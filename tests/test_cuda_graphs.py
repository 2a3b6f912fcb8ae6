"""Micro-batch CUDA graphs (`training.cuda_graphs`) against the eager step they replay.

On a GPU: `train_step` through `LocalPlan(cuda_graphs=True)` and through the eager plan, same model,
same batches, under bf16 autocast as `lit-deepseek fit` runs it, with and without compile, FP8 and
gradient accumulation; the losses, gradient norms and weights of every step agree, and the graphs
were really captured (no silent eager fallback). On CPU: which settings keep a step eager.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lit_deepseek.config import DeepSeekConfig, load_config
from lit_deepseek.training.cuda_graphs import graph_blockers
from lit_deepseek.training.step import LocalPlan, build_optimizer, make_loss_fn, train_step

ROOT = Path(__file__).resolve().parents[1]


def gpu_config(micro: int, global_batch: int, compile_: bool, fp8: bool) -> DeepSeekConfig:
    """The demo model at shapes every GPU path takes (FP8 tiles of 128, grouped GEMM strides)."""
    cfg = load_config(ROOT / "configs" / "cpu_demo.yaml")
    m = cfg.model
    m.vocab_size, m.dense_intermediate_size, m.num_layers = 512, 512, 3
    m.mla.d_model, m.mla.num_heads, m.mla.d_latent, m.mla.d_q_latent = 256, 4, 128, 128
    m.mla.qk_nope_head_dim = m.mla.qk_rope_head_dim = m.mla.v_head_dim = 32
    m.moe.expert_intermediate_size = 256
    t = cfg.training
    t.micro_batch_size, t.global_batch_size, t.seq_length = micro, global_batch, 256
    t.compile, t.use_fp8, t.precision, t.learning_rate, t.lr_warmup_steps = compile_, fp8, "bf16-mixed", 1e-2, 1
    return cfg


def test_settings_that_need_the_host_keep_the_step_eager() -> None:
    cfg = load_config(ROOT / "configs" / "cpu_demo.yaml")
    assert graph_blockers(cfg) == []
    cfg.training.activation_checkpointing = "full"
    cfg.model.moe.capacity_factor = 1.25
    cfg.training.precision = "16-mixed"
    found = " | ".join(graph_blockers(cfg))
    for name in ("training.activation_checkpointing", "model.moe.capacity_factor", "training.precision"):
        assert name in found, found


def test_graphs_asked_on_cpu_run_the_eager_step() -> None:
    """`cuda_graphs` is on by default; on CPU the plan has no graphs and gives the eager step's numbers."""
    from lit_deepseek.model import DeepSeekV3

    cfg = load_config(ROOT / "configs" / "cpu_demo.yaml")
    cfg.model.num_layers = 2
    assert cfg.training.cuda_graphs
    torch.manual_seed(0)
    batch = {"input_ids": torch.randint(0, cfg.model.vocab_size, (4, 32))}
    batch["labels"] = torch.roll(batch["input_ids"], -1, dims=1)
    out = []
    for plan in (LocalPlan(cuda_graphs=True), LocalPlan()):
        model = DeepSeekV3(cfg.model)
        model.init_weights(seed=3)
        model = plan.parallelize(model, cfg)
        assert plan.graphs(model) is None
        loss = plan.forward_backward(model, batch, 2, make_loss_fn(cfg.model, cfg.training))
        out.append((loss.total, [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    assert torch.equal(out[0][0], out[1][0])
    assert all(torch.equal(a, b) for a, b in zip(out[0][1], out[1][1], strict=True))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("compile_,fp8,micro", [(False, False, 2), (True, False, 2), (True, False, 8),
                                                (True, True, 2)])
def test_graphed_steps_equal_eager_steps_on_gpu(compile_: bool, fp8: bool, micro: int) -> None:
    from lit_deepseek.model import DeepSeekV3

    cfg = gpu_config(micro, 8, compile_, fp8)
    steps = 6
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(steps):
        ids = torch.randint(0, cfg.model.vocab_size, (8, cfg.training.seq_length + 1), generator=gen)
        batches.append({"input_ids": ids[:, :-1].cuda(), "labels": ids[:, 1:].cuda()})
    runs = {}
    for graphs in (False, True):
        torch._dynamo.reset()
        plan = LocalPlan(cuda_graphs=graphs)
        with torch.device("cuda"):
            model = DeepSeekV3(cfg.model)
        model.init_weights(seed=7)
        model = plan.parallelize(model, cfg)
        optimizer, _ = build_optimizer(plan, model, cfg)
        loss_fn = make_loss_fn(cfg.model, cfg.training)
        losses, norms = [], []
        with torch.autocast("cuda", dtype=torch.bfloat16):
            for batch in batches:
                result = train_step(plan, model, batch, optimizer, cfg.training, loss_fn)
                losses.append(result.loss.total.item())
                norms.append(result.grad_norm.item())
        if graphs:  # captured after the two warm-up steps: the first micro-batch's graph, and the next ones'
            assert plan.graphs(model).captured == (1 if micro == 8 else 2)
        runs[graphs] = losses, norms, [p.detach().float().clone() for p in model.parameters()]
    (l0, n0, w0), (l1, n1, w1) = runs[False], runs[True]
    torch.testing.assert_close(torch.tensor(l1), torch.tensor(l0), rtol=2e-3, atol=0)
    torch.testing.assert_close(torch.tensor(n1), torch.tensor(n0), rtol=2e-2, atol=0)
    worst = max(((a - b).norm() / b.norm().clamp_min(1e-12)).item() for a, b in zip(w1, w0, strict=True))
    assert worst < 1e-2, worst
