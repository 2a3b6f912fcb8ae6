"""A custom training loop with Lightning Fabric and the 4D-parallel strategy.

Runs on CPU as it is (two processes, expert parallelism over 2 ranks, gloo):

    python examples/fabric_custom_loop.py

On GPUs, set ``--accelerator cuda --devices 8`` and a layout, e.g. ``--tp 2 --pp 2 --ep 2``;
multi-node runs start it under torchrun or SLURM (Fabric picks the cluster environment up).
Each iteration calls the shipped step, `lit_deepseek.training.step.train_step` (the one the
LightningModule runs): the plan runs forward/backward over the micro-batches of one optimizer step,
clips with the global gradient norm and steps the optimizer, whose step hook moves the expert biases.

It trains on uniformly random tokens, so there is nothing to learn: the loss stays near
ln(256) = 5.55. It shows the loop and the layouts, not learning; for real text, feed it the
batches of `lit_deepseek.data.DeepSeekDataModule` as `lit-deepseek fit` does.
"""

from __future__ import annotations

import argparse
import math

import lightning as L
import torch

from lit_deepseek.config import DeepSeekConfig, MLAConfig, ModelConfig, MoEConfig, ParallelConfig, TrainingConfig
from lit_deepseek.model import DeepSeekV3
from lit_deepseek.parallel.strategy import DeepSeekFabricStrategy
from lit_deepseek.training.step import build_optimizer, make_loss_fn, train_step


def tiny_config(args: argparse.Namespace) -> DeepSeekConfig:
    model = ModelConfig(vocab_size=256, num_layers=4, first_dense_layers=1, dense_intermediate_size=96, mtp_depth=1,
                        mla=MLAConfig(d_model=64, d_latent=32, d_q_latent=48, num_heads=4, qk_nope_head_dim=16,
                                      qk_rope_head_dim=8, v_head_dim=16, max_context_length=128),
                        moe=MoEConfig(num_experts=8, num_experts_per_token=2, expert_intermediate_size=32))
    parallel = ParallelConfig(tensor_parallel_size=args.tp, pipeline_parallel_size=args.pp,
                              expert_parallel_size=args.ep, zero_stage=args.zero_stage)
    training = TrainingConfig(global_batch_size=8, micro_batch_size=2, learning_rate=1e-3, lr_warmup_steps=0,
                              lr_schedule="constant", min_learning_rate=1e-3, seq_length=64, precision="32-true")
    return DeepSeekConfig(model=model, parallel=parallel, training=training)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--num-nodes", type=int, default=1)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--ep", type=int, default=2)
    parser.add_argument("--zero-stage", type=int, default=1, choices=(0, 1, 2, 3))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--checkpoint", default=None, help="save a distributed checkpoint here at the end")
    args = parser.parse_args()

    cfg = tiny_config(args)
    strategy = DeepSeekFabricStrategy(cfg)  # validates the layout before any process group exists
    fabric = L.Fabric(accelerator=args.accelerator, devices=args.devices, num_nodes=args.num_nodes,
                      strategy=strategy, precision="32-true")
    fabric.launch()
    fabric.seed_everything(cfg.training.seed)
    plan = strategy.plan

    with fabric.init_module():
        model = DeepSeekV3(cfg.model)
    model.init_weights(seed=cfg.training.seed)  # identical on every rank; the plan then shards it
    model = fabric.setup_module(model)
    optimizer, _ = build_optimizer(plan, model, cfg)
    optimizer = fabric.setup_optimizers(optimizer)
    loss_fn = make_loss_fn(cfg.model, cfg.training)

    t = cfg.training
    rows = t.global_batch_size // plan.data_parallel_size  # this rank's share of the global batch
    generator = torch.Generator().manual_seed(t.seed)
    fabric.print(f"training on random tokens: the loss stays near ln({cfg.model.vocab_size}) = "
                 f"{math.log(cfg.model.vocab_size):.2f} (nothing to learn; this shows the loop, not learning)")
    for step in range(args.steps):
        tokens = torch.randint(0, cfg.model.vocab_size, (t.global_batch_size, t.seq_length + 1), generator=generator)
        mine = tokens[plan.data_parallel_rank * rows:(plan.data_parallel_rank + 1) * rows].to(fabric.device)
        batch = {"input_ids": mine[:, :-1], "labels": mine[:, 1:]}
        result = train_step(plan, model, batch, optimizer, t, loss_fn, fabric.backward)
        norm = "skipped (non-finite loss)" if result.skipped else f"{float(result.grad_norm):.4f}"
        fabric.print(f"step {step}: loss {float(result.loss.main):.4f}  total {float(result.loss.total):.4f}  "
                     f"grad norm {norm}")
    if args.checkpoint:
        fabric.save(args.checkpoint, {"model": model, "optimizer": optimizer, "step": args.steps})
        fabric.print(f"saved {args.checkpoint}")


if __name__ == "__main__":
    main()
