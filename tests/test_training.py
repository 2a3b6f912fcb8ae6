"""Training engine: loss, optimiser, schedule, balancing, non-finite steps, atomic checkpoints."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import pytest
import torch

from lit_deepseek.config import ModelConfig, TrainingConfig, load_config
from lit_deepseek.training.loss import IGNORE_INDEX, chunked_cross_entropy, model_loss, shift_labels
from lit_deepseek.training.optim import lr_multiplier, param_groups
from lit_deepseek.training.step import LocalPlan

ROOT = Path(__file__).resolve().parents[1]


def tiny_model_config(**moe: object) -> ModelConfig:
    cfg = load_config(ROOT / "configs" / "cpu_demo.yaml").model
    cfg.num_layers = 2
    for k, v in moe.items():
        setattr(cfg.moe, k, v)
    return cfg


def test_chunked_cross_entropy_equals_full_logits() -> None:
    torch.manual_seed(0)
    h = torch.randn(37, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    labels = torch.randint(0, 50, (37,))
    labels[3] = IGNORE_INDEX
    ours = chunked_cross_entropy(h, w, labels, chunk_size=8)
    ours.backward()
    g_h, g_w = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref = torch.nn.functional.cross_entropy(h @ w.T, labels, ignore_index=IGNORE_INDEX)
    ref.backward()
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(g_h, h.grad)
    torch.testing.assert_close(g_w, w.grad)


def test_mtp_targets_are_shifted() -> None:
    labels = torch.tensor([[1, 2, 3, 4]])
    assert shift_labels(labels, 2).tolist() == [[3, 4, IGNORE_INDEX, IGNORE_INDEX]]


def test_model_loss_weights_mtp() -> None:
    torch.manual_seed(0)
    w = torch.randn(20, 8)
    h, h1 = torch.randn(2, 6, 8), torch.randn(2, 6, 8)
    labels = torch.randint(0, 20, (2, 6))
    parts = model_loss(w, h, [h1], labels, mtp_loss_weight=0.3, chunk_size=5)
    main = torch.nn.functional.cross_entropy((h @ w.T).flatten(0, 1), labels.flatten())
    mtp = torch.nn.functional.cross_entropy((h1 @ w.T).flatten(0, 1), shift_labels(labels, 1).flatten(),
                                            ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(parts.main, main)
    torch.testing.assert_close(parts.mtp, mtp)
    torch.testing.assert_close(parts.total, main + 0.3 * mtp)


def test_lr_schedule_warmup_cosine_floor_and_wsd() -> None:
    t = TrainingConfig(learning_rate=1.0, min_learning_rate=0.1, lr_warmup_steps=10, max_steps=110)
    assert lr_multiplier(0, t) == pytest.approx(0.1)
    assert lr_multiplier(9, t) == pytest.approx(1.0)
    assert lr_multiplier(60, t) == pytest.approx(0.55)
    assert lr_multiplier(110, t) == pytest.approx(0.1)
    assert lr_multiplier(500, t) == pytest.approx(0.1)
    wsd = TrainingConfig(learning_rate=1.0, min_learning_rate=0.0, lr_warmup_steps=10, max_steps=110,
                         lr_schedule="wsd", lr_decay_fraction=0.2)
    assert lr_multiplier(80, wsd) == pytest.approx(1.0)
    assert lr_multiplier(100, wsd) == pytest.approx(0.5)
    assert lr_multiplier(110, wsd) == pytest.approx(0.0)


def test_no_weight_decay_on_norms_biases_and_router_bias() -> None:
    from lit_deepseek.model import DeepSeekV3

    model = DeepSeekV3(tiny_model_config())
    decay, no_decay = param_groups([model], 0.1)
    decay_ids = {id(p) for p in decay["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.ndim >= 2 for p in decay["params"])
    assert all("norm" not in names[i] for i in decay_ids)
    assert any("norm" in names[id(p)] for p in no_decay["params"])
    assert "expert_bias" not in {n.split(".")[-1] for n, _ in model.named_parameters()}  # a buffer, not optimised
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0


def _step_batch(vocab: int, a: int, micro: int, seq: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (a * micro, seq + 1), generator=g)
    return {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}


def _loss_fn(cfg: ModelConfig):
    def fn(model, h, mtp, labels):
        return model_loss(model.head.weight, h, mtp, labels, cfg.mtp_loss_weight, chunk_size=64)
    return fn


def test_gradient_accumulation_equals_one_big_batch() -> None:
    from lit_deepseek.model import DeepSeekV3

    cfg = tiny_model_config(router_aux_loss_weight=0.0)
    batch = _step_batch(cfg.vocab_size, 4, 2, 32)
    grads = []
    for micro in (2, 8):
        torch.manual_seed(0)
        model = DeepSeekV3(cfg)
        model.init_weights(seed=0)
        parts = LocalPlan().forward_backward(model, batch, micro, _loss_fn(cfg))
        grads.append((parts.total, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (l1, g1), (l2, g2) = grads
    torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-6)
    assert g1.keys() == g2.keys()
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("checkpointing", ["none", "full", "selective"])
def test_expert_load_counts_every_micro_batch_once(checkpointing: str) -> None:
    from lit_deepseek.model import DeepSeekV3
    from lit_deepseek.training.checkpointing import apply_activation_checkpointing

    cfg = tiny_model_config()
    model = DeepSeekV3(cfg)
    model.init_weights(seed=1)
    apply_activation_checkpointing(model, checkpointing)
    a, micro, seq = 3, 2, 16
    batch = _step_batch(cfg.vocab_size, a, micro, seq, seed=2)
    LocalPlan().forward_backward(model, batch, micro, _loss_fn(cfg))
    for moe in model.moe_layers():
        # every token routes to top-k experts in every micro-batch: no more, no less
        assert moe.expert_load.sum().item() == a * micro * seq * cfg.moe.num_experts_per_token


def test_bias_update_moves_towards_balance() -> None:
    from lit_deepseek.model import DeepSeekV3

    cfg = tiny_model_config()
    moe = DeepSeekV3(cfg).moe_layers()[0]
    load = torch.tensor([10.0, 0, 0, 0, 0, 0, 0, 6.0])
    moe.update_bias(load, 0.01)
    expected = 0.01 * torch.sign(load.mean() - load)
    torch.testing.assert_close(moe.expert_bias, expected)


@pytest.mark.parametrize("aux_loss_free,speed", [(True, 0.003), (False, 0.003)])
def test_train_step_moves_expert_biases_by_the_configured_speed(aux_loss_free: bool, speed: float) -> None:
    """The shipped step's optimizer hook applies model.moe.use_aux_loss_free and bias_update_speed."""
    from lit_deepseek.config import DeepSeekConfig
    from lit_deepseek.model import DeepSeekV3
    from lit_deepseek.training.step import build_optimizer, make_loss_fn, train_step

    cfg = DeepSeekConfig(model=tiny_model_config(use_aux_loss_free=aux_loss_free, bias_update_speed=speed),
                         training=TrainingConfig(global_batch_size=4, micro_batch_size=2, seq_length=16))
    plan = LocalPlan()
    model = plan.parallelize(DeepSeekV3(cfg.model), cfg)
    optimizer, balance = build_optimizer(plan, model, cfg)
    batch = _step_batch(cfg.model.vocab_size, 2, 2, 16, seed=3)
    result = train_step(plan, model, batch, optimizer, cfg.training, make_loss_fn(cfg.model, cfg.training))
    assert not result.skipped and torch.isfinite(result.grad_norm)
    assert balance.last_load is not None and balance.last_load.sum(dim=1).eq(4 * 16 * 2).all()
    biases = balance.biases()
    if aux_loss_free:  # each bias moved by +-speed towards balance (0 where a load equals the mean)
        moved = biases.abs()
        assert moved.max().item() == pytest.approx(speed)
        assert torch.all((moved == 0) | torch.isclose(moved, torch.tensor(speed)))
    else:
        assert biases.abs().max().item() == 0.0
    assert all(m.expert_load.sum() == 0 for m in model.moe_layers())  # statistics reset for the next step


def test_gradient_clip_folded_into_fused_adamw_equals_clipping_the_gradients() -> None:
    """A fused AdamW (what plain CUDA parameters get) takes the clip as its grad_scale instead of a
    pass that scales every gradient: same norm, same weights to float32 rounding as the foreach
    AdamW on clipped gradients, a clip that binds (weights differ from an unclipped run), and the
    hook released after each step."""
    from lit_deepseek.config import DeepSeekConfig
    from lit_deepseek.model import DeepSeekV3
    from lit_deepseek.training.optim import build_adamw
    from lit_deepseek.training.step import make_loss_fn, train_step

    runs = {}
    for name, fused, clip in (("folded", True, 0.05), ("scaled", False, 0.05), ("unclipped", True, 0.0)):
        cfg = DeepSeekConfig(model=tiny_model_config(router_aux_loss_weight=0.0),
                             training=TrainingConfig(global_batch_size=4, micro_batch_size=2, seq_length=16,
                                                     grad_clip=clip, learning_rate=1e-2))
        plan = LocalPlan()
        torch.manual_seed(0)
        model = plan.parallelize(DeepSeekV3(cfg.model), cfg)
        model.init_weights(seed=0)
        optimizer = build_adamw([model], cfg.training, fused=fused, foreach=None if fused else True)
        norms = []
        for step in range(3):
            batch = _step_batch(cfg.model.vocab_size, 2, 2, 16, seed=step)
            result = train_step(plan, model, batch, optimizer, cfg.training, make_loss_fn(cfg.model, cfg.training))
            norms.append(result.grad_norm.item())
            assert getattr(optimizer, "grad_scale", None) is None
        runs[name] = (norms, {n: p.detach().clone() for n, p in model.named_parameters()})
    (nf, wf), (ns, ws), (_, wu) = runs["folded"], runs["scaled"], runs["unclipped"]
    assert min(nf) > 0.05 * 10  # the clip binds on every step
    assert nf == pytest.approx(ns, rel=1e-5)
    for name in wf:
        # 3 AdamW steps at lr 1e-2: measured <= 6e-6 apart (fused vs foreach kernels and x / (1 / c))
        torch.testing.assert_close(wf[name], ws[name], rtol=0, atol=2e-5, msg=name)
    assert max((wf[n] - wu[n]).abs().max().item() for n in wf) > 1e-3


def test_activation_checkpointing_keeps_a_later_fp8_conversion() -> None:
    """parallelize checkpoints blocks before converting to FP8: the converted experts must run."""
    from lit_deepseek.kernels.fp8 import convert_to_fp8
    from lit_deepseek.model import DeepSeekV3
    from lit_deepseek.training.checkpointing import apply_activation_checkpointing

    cfg = tiny_model_config()
    ids = _step_batch(cfg.vocab_size, 1, 2, 16, seed=4)["input_ids"]
    outputs = []
    for order in ("fp8 first", "checkpointing first", "bf16"):
        model = DeepSeekV3(cfg)
        model.init_weights(seed=5)
        if order == "fp8 first":
            convert_to_fp8(model, recipe="blockwise", emulate=True)
        apply_activation_checkpointing(model, "selective")
        if order == "checkpointing first":
            convert_to_fp8(model, recipe="blockwise", emulate=True)
        outputs.append(model(ids))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)
    assert not torch.equal(outputs[1], outputs[2])  # FP8 really ran


def test_nonfinite_losses_are_skipped_then_stop_with_checkpoint(tmp_path: Path) -> None:
    import lightning as L

    from lit_deepseek.training.callbacks import checkpoint_callbacks
    from lit_deepseek.training.module import DeepSeekLightningModule, NonFiniteLossError

    cfg = load_config(ROOT / "configs" / "cpu_demo.yaml")
    cfg.model.num_layers = 2
    cfg.training.max_nonfinite_steps = 3
    cfg.training.micro_batch_size = 2
    cfg.training.global_batch_size = 2
    cfg.training.seq_length = 16

    class Poisoned(DeepSeekLightningModule):
        def loss_fn(self, model, h, mtp, labels):
            parts = super().loss_fn(model, h, mtp, labels)
            if self.global_step >= 2:  # steps 0 and 1 are fine, then every loss is NaN
                parts.total = parts.total * float("nan")
            return parts

    module = Poisoned(cfg.model, cfg.training)
    batches = torch.utils.data.DataLoader([_step_batch(cfg.model.vocab_size, 1, 2, 16, seed=i) for i in range(10)],
                                          batch_size=None)
    ckpt_dir = tmp_path / "ckpt"
    trainer = L.Trainer(max_steps=10, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=checkpoint_callbacks(cfg.checkpoint, ckpt_dir), limit_val_batches=0,
                        accelerator="cpu", devices=1)
    with pytest.raises(NonFiniteLossError, match="3 consecutive non-finite losses"):
        trainer.fit(module, train_dataloaders=batches)
    assert module.global_step == 2
    assert module.nonfinite_total == 3
    saved = list(ckpt_dir.glob("nonfinite-step2.ckpt"))
    assert saved, list(ckpt_dir.iterdir()) if ckpt_dir.exists() else "no checkpoint dir"


def test_diverged_weights_are_never_checkpointed_and_the_last_finite_one_survives(tmp_path: Path) -> None:
    """Weights turn NaN while the loss is still finite: the save is refused (naming the tensor), keep_last
    pruning never removed the last finite checkpoint, and last/best are hard links, not copies."""
    import lightning as L

    from lit_deepseek.training.callbacks import AtomicCheckpointIO, checkpoint_callbacks
    from lit_deepseek.training.module import DeepSeekLightningModule, NonFiniteCheckpointError

    cfg = load_config(ROOT / "configs" / "cpu_demo.yaml")
    cfg.model.num_layers = 2
    cfg.training.micro_batch_size = cfg.training.global_batch_size = 2
    cfg.training.seq_length = 16
    cfg.checkpoint.every_n_steps, cfg.checkpoint.keep_last = 1, 1

    class Diverging(DeepSeekLightningModule):
        def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
            out = super().training_step(batch, batch_idx)
            if self.global_step == 3:
                with torch.no_grad():
                    self.model.layers["1"].attn.o_proj.weight[0, 0] = float("nan")
            return out

    module = Diverging(cfg.model, cfg.training)
    batches = torch.utils.data.DataLoader([_step_batch(cfg.model.vocab_size, 1, 2, 16, seed=i) for i in range(10)],
                                          batch_size=None)
    ckpt_dir = tmp_path / "ckpt"
    trainer = L.Trainer(max_steps=10, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=checkpoint_callbacks(cfg.checkpoint, ckpt_dir), limit_val_batches=0,
                        accelerator="cpu", devices=1, plugins=[AtomicCheckpointIO()])
    with pytest.raises(NonFiniteCheckpointError, match=r"layers.1.attn.o_proj.weight is not finite at step 3.*step0000002"):
        trainer.fit(module, train_dataloaders=batches)
    names = sorted(p.name for p in ckpt_dir.iterdir())
    assert names == ["last.ckpt", "step0000002.ckpt"], names
    assert (ckpt_dir / "last.ckpt").stat().st_ino == (ckpt_dir / "step0000002.ckpt").stat().st_ino
    state = torch.load(ckpt_dir / "last.ckpt", weights_only=True)
    assert state["global_step"] == 2
    assert all(torch.isfinite(t).all() for t in state["state_dict"].values() if t.is_floating_point())


def test_checkpoint_write_is_atomic(tmp_path: Path) -> None:
    from lit_deepseek.training.callbacks import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "weights": torch.arange(4)}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        io.save_checkpoint({"step": 2, "weights": torch.arange(1000), "boom": Unpicklable()}, path)
        io.wait()
    io.teardown()
    assert torch.load(path, weights_only=True)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_flops_per_token_matches_the_published_mfu_figure() -> None:
    # The small shape without MTP: HF's 96k tokens/s at 23.8% MFU of 989 TFLOP/s at sequence 4096.
    cfg = load_config(ROOT / "configs" / "deepseek_v3_small.yaml", validate=False)
    cfg.model.mtp_depth = 0
    expected = 0.238 * 989e12 / 96_000
    assert math.isclose(cfg.flops_per_token(4096), expected, rel_tol=0.02)


def test_skipped_step_still_advances_the_data_position(tmp_path: Path) -> None:
    import types

    from lit_deepseek.config import DataConfig
    from lit_deepseek.data.datamodule import DeepSeekDataModule

    dm = DeepSeekDataModule(DataConfig(cache_dir=str(tmp_path)), seq_length=16, micro_batch_size=2,
                            global_batch_size=4)
    dm.trainer = types.SimpleNamespace(global_step=3)
    assert dm.consumed_tokens == 3 * 4 * 16
    dm.on_step_skipped()
    assert dm.consumed_tokens == 4 * 4 * 16
    state = dm.state_dict()
    resumed = DeepSeekDataModule(DataConfig(cache_dir=str(tmp_path)), seq_length=16, micro_batch_size=2,
                                 global_batch_size=4)
    resumed.load_state_dict(state)
    resumed.trainer = types.SimpleNamespace(global_step=3)
    assert resumed.consumed_tokens == 4 * 4 * 16


def test_async_checkpoint_is_a_snapshot_and_keeps_tied_tensors_tied(tmp_path: Path) -> None:
    """Training may change the tensors right after save_checkpoint returns: the file holds the values at
    the call. Two names of one tensor stay one tensor in the file."""
    from lit_deepseek.training.callbacks import AtomicCheckpointIO

    io = AtomicCheckpointIO(async_save=True)
    weight = torch.arange(6, dtype=torch.float32)
    io.save_checkpoint({"state_dict": {"embed": weight, "head": weight}, "step": 1}, tmp_path / "a.ckpt")
    weight.add_(100)  # the next optimizer step, while the writer may still be busy
    io.link(tmp_path / "a.ckpt", tmp_path / "last.ckpt")
    io.teardown()
    state = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert state["state_dict"]["embed"].tolist() == list(range(6))
    assert state["state_dict"]["embed"].data_ptr() == state["state_dict"]["head"].data_ptr()
    assert (tmp_path / "last.ckpt").stat().st_ino == (tmp_path / "a.ckpt").stat().st_ino


def test_checkpoint_buffers_are_reserved_before_the_first_save(tmp_path: Path) -> None:
    """The host buffers that periodic saves copy the weights and optimizer states into are allocated
    when training starts (Adam's moments foreseen before its first step), not during the first save;
    the saves made through them hold the weights of their step."""
    import lightning as L

    from lit_deepseek.training.callbacks import AtomicCheckpointIO, checkpoint_callbacks
    from lit_deepseek.training.module import DeepSeekLightningModule

    class KeepAll(AtomicCheckpointIO):  # on CPU, buffers for every tensor (the GPU rule keeps device tensors)
        keeps = staticmethod(lambda t: True)
        before_first_save: Optional[set] = None
        after_first_save: Optional[set] = None

        def save_checkpoint(self, checkpoint: dict, path: Any, storage_options: Any = None) -> None:
            first = self.before_first_save is None
            if first:
                self.wait()
                self.before_first_save = set(self._host)
            super().save_checkpoint(checkpoint, path, storage_options)
            if first:
                self.after_first_save = set(self._host)

    cfg = load_config(ROOT / "configs" / "cpu_demo.yaml")
    cfg.model.num_layers = 2
    cfg.training.micro_batch_size = cfg.training.global_batch_size = 2
    cfg.training.seq_length = 16
    cfg.checkpoint.every_n_steps, cfg.checkpoint.keep_last = 2, 2
    module = DeepSeekLightningModule(cfg.model, cfg.training)
    batches = torch.utils.data.DataLoader([_step_batch(cfg.model.vocab_size, 1, 2, 16, seed=i) for i in range(4)],
                                          batch_size=None)
    io = KeepAll()
    trainer = L.Trainer(max_steps=4, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=checkpoint_callbacks(cfg.checkpoint, tmp_path), limit_val_batches=0,
                        accelerator="cpu", devices=1, plugins=[io])
    trainer.fit(module, train_dataloaders=batches)
    used = {k for k in io.after_first_save if k.startswith(("/state_dict/", "/optimizer_states/0/state/"))}
    assert any(k.endswith("/exp_avg_sq") for k in used) and any(k.startswith("/state_dict/") for k in used)
    assert {k for k in used if not k.endswith("/step")} <= io.before_first_save  # only Adam's step counters later
    final = torch.load(tmp_path / "step0000004.ckpt", weights_only=True)
    for name, value in module.state_dict().items():
        assert torch.equal(final["state_dict"][name], value), name
    moments = trainer.optimizers[0].state_dict()["state"]
    for index, st in moments.items():
        assert torch.equal(final["optimizer_states"][0]["state"][index]["exp_avg_sq"], st["exp_avg_sq"])
