"""Single-GPU training throughput: lit-deepseek against Hugging Face transformers' DeepseekV3ForCausalLM.

One process, one invocation: measures the bf16 matmul rate first, then trains each variant for a
few steps at identical shapes (bf16 parameters, fused AdamW in bf16 for both: the setting of the
reference numbers) and prints tokens/s, MFU against 989 TFLOP/s and against the measured matmul
rate, peak memory, the ratio to Hugging Face, and our memory estimate against the measured peak.
Optional phases: loss curves of the fast path against the plain reference path and of FP8 against
bf16 on the built-in text (Python's help topics, byte tokens), and the largest batch that fits.

    python benchmarks/bench_train.py --phases throughput,curves --out $OUT
    python benchmarks/bench_train.py --tiny --device cpu      # smoke test of every code path

MFU counts 6 x matmul parameters per token plus causal attention at half
(`DeepSeekConfig.flops_per_token`), the definition used for the reference numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lit_deepseek.config import DeepSeekConfig, ModelConfig, ParallelConfig, TrainingConfig, load_config  # noqa: E402

PEAK_BF16 = 989e12  # dense bf16 TFLOP/s of an H100/H200 SXM (datasheet)
GIB = 1024**3


# ------------------------------------------------------------------------------------ configs
def small_config(mtp_depth: int) -> ModelConfig:
    """The small target shape (configs/deepseek_v3_small.yaml) on one GPU."""
    cfg = load_config(ROOT / "configs" / "deepseek_v3_small.yaml",
                      overrides={"parallel.expert_parallel_size": 1}, validate=False).model
    cfg.mtp_depth = mtp_depth
    return cfg


def large_config(mtp_depth: int) -> ModelConfig:
    """A larger DeepSeek-V3 shape that fills an H200 at batch 4 x 4096: V3's head dims (qk 128+64,
    v 128), latents 1536/512, d_model 2048, 16 layers, 64 experts top-6 (FFN 1408) + 2 shared."""
    cfg = small_config(mtp_depth)
    cfg.num_layers = 16
    cfg.dense_intermediate_size = 8192
    m, e = cfg.mla, cfg.moe
    m.d_model, m.num_heads, m.d_q_latent, m.d_latent = 2048, 16, 1536, 512
    m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim = 128, 64, 128
    e.num_experts, e.num_experts_per_token, e.expert_intermediate_size, e.num_shared_experts = 64, 6, 1408, 2
    return cfg


def tiny_config(mtp_depth: int) -> ModelConfig:
    cfg = small_config(mtp_depth)
    cfg.vocab_size, cfg.num_layers, cfg.dense_intermediate_size = 512, 3, 128
    m, e = cfg.mla, cfg.moe
    m.d_model, m.num_heads, m.d_q_latent, m.d_latent = 64, 4, 32, 32
    m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim = 16, 16, 16
    e.num_experts, e.expert_intermediate_size = 8, 32
    return cfg


CONFIGS: dict[str, Callable[[int], ModelConfig]] = {"small": small_config, "large": large_config, "tiny": tiny_config}


def run_config(cfg: ModelConfig, batch: int, seq: int, compiled: bool = False) -> DeepSeekConfig:
    """The DeepSeekConfig this benchmark trains: one GPU, bf16 weights and optimizer states, clip 1.0."""
    training = TrainingConfig(micro_batch_size=batch, global_batch_size=batch, seq_length=seq, grad_clip=1.0,
                              precision="bf16-true", activation_checkpointing="none", compile=compiled)
    parallel = ParallelConfig(expert_parallel_size=1, data_parallel_size=1, zero_stage=0)
    return DeepSeekConfig(model=cfg, training=training, parallel=parallel)


# ------------------------------------------------------------------------------------ models
def build_ours(cfg: ModelConfig, device: torch.device, fast: bool = True) -> torch.nn.Module:
    from lit_deepseek.model import DeepSeekV3, RMSNorm
    from lit_deepseek.model.moe import MoE
    from lit_deepseek.model.rope import RotaryEmbedding

    with torch.device("meta"):
        model = DeepSeekV3(cfg)
    model.to_empty(device=device)
    model.tie_weights()
    with torch.no_grad():  # same distributions as init_weights, drawn on the device (fast)
        for module in model.modules():
            if isinstance(module, (RMSNorm, RotaryEmbedding)):
                module.reset_parameters()
            elif isinstance(module, MoE):
                module.expert_bias.zero_()
                module.reset_stats()
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, cfg.init_std)
    model.to(torch.bfloat16)
    set_fast_path(model, fast)
    return model


def set_fast_path(model: torch.nn.Module, fast: bool) -> None:
    """fast=False: the plain reference path (loop over experts, index_add combine, PyTorch's own
    SDPA backend choice, checkpointed chunked loss)."""
    from lit_deepseek.model.moe import MoE

    for moe in model.moe_layers():
        assert isinstance(moe, MoE)
        # grouped GEMM on the fast path (CUDA; bf16 grouped_mm also runs on CPU for the smoke test)
        moe.use_grouped_mm = True if fast else False
        moe.fast_permute = fast


def set_global_fast(fast: bool) -> None:
    from lit_deepseek.model import attention
    from lit_deepseek.training import loss

    attention.PREFER_CUDNN_ATTENTION = fast
    loss.FUSED_CROSS_ENTROPY = fast


def build_hf(cfg: ModelConfig, device: torch.device) -> torch.nn.Module:
    import transformers

    from lit_deepseek.checkpoint.hf import model_config_to_hf

    hf = model_config_to_hf(cfg)
    conf = transformers.DeepseekV3Config(**{k: v for k, v in hf.items() if k not in ("architectures", "model_type")})
    conf.use_cache = False
    kwargs: dict[str, Any] = {"attn_implementation": "sdpa", "dtype": torch.bfloat16}
    if device.type == "cuda":
        kwargs["experts_implementation"] = "grouped_mm"
    with torch.device(device):
        try:
            model = transformers.DeepseekV3ForCausalLM._from_config(conf, **kwargs)
        except TypeError:  # older signature
            kwargs.pop("experts_implementation", None)
            kwargs["torch_dtype"] = kwargs.pop("dtype")
            model = transformers.DeepseekV3ForCausalLM._from_config(conf, **kwargs)
    model.to(torch.bfloat16)
    model.train()
    return model


def hf_impls(model: torch.nn.Module) -> str:
    c = model.config
    return f"attn={getattr(c, '_attn_implementation', '?')},experts={getattr(c, '_experts_implementation', '?')}"


# ------------------------------------------------------------------------------------ steps
def make_step(impl: str, model: torch.nn.Module, opt: torch.optim.Optimizer, run: DeepSeekConfig,
              scheduler: Optional[Any] = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """One training step on token ids: ours is the shipped `train_step` (what `lit-deepseek fit`
    runs per step: loss, backward, global-norm clip, AdamW with the expert-bias update hooked to it)."""
    from lit_deepseek.training.loss import IGNORE_INDEX
    from lit_deepseek.training.step import ExpertBalance, LocalPlan, make_loss_fn, train_step

    plan = LocalPlan()
    loss_fn = make_loss_fn(run.model, run.training)
    if impl == "ours":
        ExpertBalance(plan, [model], run.model.moe).attach(opt)

    def ours(ids: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        if labels is None:
            labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], IGNORE_INDEX)], dim=1)
        batch = {"input_ids": ids, "labels": labels}
        whole = dataclasses.replace(run.training, micro_batch_size=len(ids), global_batch_size=len(ids))
        return train_step(plan, model, batch, opt, whole, loss_fn, scheduler=scheduler).loss.main

    def hf(ids: torch.Tensor) -> torch.Tensor:
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss.detach()

    return ours if impl == "ours" else hf


def make_optimizer(model: torch.nn.Module, lr: float = 3e-4) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    fused = all(p.is_cuda for p in params)
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.1, fused=fused)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------ phases
def matmul_rate(device: torch.device, n: int = 8192, reps: int = 30) -> float:
    """bf16 dense matmul FLOP/s on random data (median of `reps`)."""
    if device.type != "cuda":
        return float("nan")
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        a @ b
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    times.sort()
    return 2 * n**3 / times[len(times) // 2]


@dataclasses.dataclass
class Variant:
    name: str
    impl: str  # ours | hf
    config: str  # small | large | tiny
    seq: int
    batch: int
    compiled: bool
    mtp: int = 0
    fp8: bool = False
    fast: bool = True


def throughput(v: Variant, device: torch.device, steps: int, warmup: int, mm_rate: float,
               profile_dir: Optional[Path] = None) -> dict[str, Any]:
    """Train `steps` timed steps after `warmup`; on out-of-memory retry with half the batch."""
    batch = v.batch
    while True:
        try:
            return _throughput(v, batch, device, steps, warmup, mm_rate, profile_dir)
        except torch.OutOfMemoryError:
            free(device)
            torch._dynamo.reset()
            if batch == 1:
                raise
            print(f"  {v.name}: out of memory at batch {batch}, retrying with {batch // 2}", flush=True)
            batch //= 2


def _throughput(v: Variant, batch: int, device: torch.device, steps: int, warmup: int, mm_rate: float,
                profile_dir: Optional[Path]) -> dict[str, Any]:
    cfg = CONFIGS[v.config](v.mtp)
    set_global_fast(v.fast)
    t_build = time.perf_counter()
    torch.manual_seed(0)
    if v.impl == "ours":
        model = build_ours(cfg, device, v.fast)
        if v.fp8:
            from lit_deepseek.kernels.fp8 import convert_to_fp8

            convert_to_fp8(model, emulate=device.type != "cuda")
        if v.compiled:
            from lit_deepseek.kernels.compile import compile_blocks

            compile_blocks(model)
        extra = ""
    else:
        model = build_hf(cfg, device)
        extra = hf_impls(model)
        if v.compiled:
            model = torch.compile(model)
    run = run_config(cfg, batch, v.seq, v.compiled)
    opt = make_optimizer(model)
    step = make_step(v.impl, model, opt, run)
    gen = torch.Generator(device=device).manual_seed(1)
    ids = [torch.randint(0, cfg.vocab_size, (batch, v.seq), device=device, generator=gen) for _ in range(2)]
    build_s = time.perf_counter() - t_build
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for i in range(warmup):
        loss = step(ids[i % 2])
    sync(device)
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(steps):
        loss = step(ids[i % 2])
    sync(device)
    dt = (time.perf_counter() - t0) / steps
    peak = torch.cuda.max_memory_allocated() / GIB if device.type == "cuda" else float("nan")
    reserved = torch.cuda.max_memory_reserved() / GIB if device.type == "cuda" else float("nan")
    flops = run.flops_per_token(v.seq)
    tok_s = batch * v.seq / dt
    est = run.memory_estimate(world_size=1)
    profile = None
    if profile_dir is not None and device.type == "cuda":
        profile = _profile(step, ids[0], profile_dir / f"profile_{v.name}.txt")
    out = dict(dataclasses.asdict(v), batch=batch, step_s=dt, tokens_per_s=tok_s, flops_per_token=flops,
               mfu_989=tok_s * flops / PEAK_BF16, mfu_measured=tok_s * flops / mm_rate if mm_rate == mm_rate else None,
               peak_gib=peak, reserved_gib=reserved, estimate_gib=est["total"], estimate=est,
               loss=float(loss), build_s=build_s, warmup_s=warm_s, impls=extra, top_kernels=profile)
    del model, opt, step, ids
    free(device)
    if v.compiled:
        torch._dynamo.reset()
    return out


def _profile(step: Callable, ids: torch.Tensor, path: Path) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step(ids)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=90)
    path.write_text(table)
    rows = sorted(prof.key_averages(), key=lambda e: -getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0)))
    total = sum(getattr(e, "self_device_time_total", 0) for e in prof.key_averages())
    return [f"{getattr(e, 'self_device_time_total', 0) / max(total, 1):6.1%} {e.key[:100]}" for e in rows[:25]
            if getattr(e, "self_device_time_total", 0) > 0][:15]


# ------------------------------------------------------------------------------------ loss curves
def text_tokens(device: torch.device) -> torch.Tensor:
    """Byte tokens of Python's bundled help topics (real text, no download)."""
    import pydoc_data.topics as topics

    text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long, device=device)


def train_curve(cfg: ModelConfig, state: dict, device: torch.device, steps: int, batch: int, seq: int,
                fast: bool, compiled: bool, fp8: bool, tokens: torch.Tensor) -> list[float]:
    """Losses of `steps` AdamW steps (warmup 20 steps to 3e-4, clip 1.0) from the given weights."""
    set_global_fast(fast)
    model = build_ours(cfg, device, fast)
    model.load_state_dict(state)
    if fp8:
        from lit_deepseek.kernels.fp8 import convert_to_fp8

        convert_to_fp8(model, emulate=device.type != "cuda")
    if compiled:
        from lit_deepseek.kernels.compile import compile_blocks

        compile_blocks(model)
    opt = make_optimizer(model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))
    step = make_step("ours", model, opt, run_config(cfg, batch, seq, compiled), scheduler=sched)
    n = tokens.numel()
    losses = []
    for s in range(steps):
        starts = [((s * batch + j) * seq * 7919) % (n - seq - 1) for j in range(batch)]
        win = torch.stack([tokens[a:a + seq + 1] for a in starts])
        losses.append(step(win[:, :-1], win[:, 1:]))
    out = [float(x) for x in torch.stack(losses).cpu()]
    del model, opt
    free(device)
    if compiled:
        torch._dynamo.reset()
    return out


def smooth(xs: list[float], w: int = 10) -> list[float]:
    return [sum(xs[max(0, i - w + 1):i + 1]) / len(xs[max(0, i - w + 1):i + 1]) for i in range(len(xs))]


def curves(device: torch.device, config: str, batch: int, seq: int, ref_steps: int, fp8_steps: int) -> dict[str, Any]:
    cfg = CONFIGS[config](1)
    torch.manual_seed(0)
    state = {k: v.clone() for k, v in build_ours(cfg, device).state_dict().items()}
    tokens = text_tokens(device)
    t0 = time.perf_counter()
    fast = train_curve(cfg, state, device, max(ref_steps, fp8_steps), batch, seq, True, True, False, tokens)
    t_fast = time.perf_counter() - t0
    out: dict[str, Any] = {"config": config, "batch": batch, "seq": seq, "mtp": 1, "fast": fast, "fast_s": t_fast}
    if ref_steps:
        ref = train_curve(cfg, state, device, ref_steps, batch, seq, False, False, False, tokens)
        out["reference"], out["reference_s"] = ref, time.perf_counter() - t0 - t_fast
        sf, sr = smooth(fast[:ref_steps]), smooth(ref)
        out["max_abs_diff_smoothed"] = max(abs(a - b) for a, b in zip(sf, sr, strict=True))
        out["max_abs_diff_smoothed_after_20"] = (max(abs(a - b) for a, b in zip(sf[20:], sr[20:], strict=True))
                                                 if ref_steps > 20 else float("nan"))
    if fp8_steps:
        fp8 = train_curve(cfg, state, device, fp8_steps, batch, seq, True, True, True, tokens)
        out["fp8"] = fp8
        tail = min(20, fp8_steps)
        b16 = sum(fast[fp8_steps - tail:fp8_steps]) / tail
        f8 = sum(fp8[-tail:]) / tail
        out["bf16_final"], out["fp8_final"] = b16, f8
        out["fp8_rel_diff"] = (f8 - b16) / b16
    return out


# ------------------------------------------------------------------------------------ FP8 check
def fp8_check(device: torch.device, config: str, seq: int, batch: int = 2) -> list[dict[str, Any]]:
    """Same weights and tokens through bf16 and FP8, eager and compiled: loss, relative difference of
    the final hidden states to bf16 eager, and a causality probe (changing the last token must not
    change any earlier position's hidden state)."""
    from lit_deepseek.kernels.compile import compile_blocks
    from lit_deepseek.kernels.fp8 import convert_to_fp8
    from lit_deepseek.training.loss import IGNORE_INDEX, model_loss

    cfg = CONFIGS[config](0)
    set_global_fast(True)
    torch.manual_seed(0)
    state = {k: v.clone() for k, v in build_ours(cfg, device).state_dict().items()}
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)
    ids2 = ids.clone()
    ids2[:, -1] = (ids2[:, -1] + 1) % cfg.vocab_size
    labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], IGNORE_INDEX)], dim=1)
    rows, ref_h = [], None
    for fp8, compiled in ((False, False), (True, False), (True, True), (False, True)):
        model = build_ours(cfg, device)
        model.load_state_dict(state)
        if fp8:
            convert_to_fp8(model, emulate=device.type != "cuda")
        if compiled:
            compile_blocks(model)
        h1, _ = model(ids, return_hidden=True)
        h1, _ = model(ids, return_hidden=True)
        h2, _ = model(ids2, return_hidden=True)
        loss = model_loss(model.head.weight, h1, [], labels, 0.0).total
        leak = (h1[:, :-1].float() - h2[:, :-1].float()).abs().max().item()
        if ref_h is None:
            ref_h = h1.detach().float()
        diff = ((h1.detach().float() - ref_h).norm() / ref_h.norm()).item()
        rows.append({"fp8": fp8, "compiled": compiled, "loss": loss.item(), "leak_max_abs": leak, "rel_diff_h": diff})
        print(f"  fp8 check fp8={fp8} compiled={compiled}: loss {loss.item():.4f}, causality leak {leak:.3g}, "
              f"rel diff vs bf16 eager {diff:.4f}", flush=True)
        del model, h1, h2, loss
        free(device)
        torch._dynamo.reset()
    return rows


# ------------------------------------------------------------------------------------ memory fit
def fit(device: torch.device, config: str, seq: int, batches: list[int], compiled: bool) -> list[dict[str, Any]]:
    """One full step (forward, backward, AdamW) at increasing batch sizes until out of memory."""
    cfg = CONFIGS[config](1)
    set_global_fast(True)
    model = build_ours(cfg, device)
    if compiled:
        from lit_deepseek.kernels.compile import compile_blocks

        compile_blocks(model)
    opt = make_optimizer(model)
    step = make_step("ours", model, opt, run_config(cfg, batches[0], seq, compiled))
    rows = []
    for b in batches:
        ids = torch.randint(0, cfg.vocab_size, (b, seq), device=device)
        try:
            torch.cuda.reset_peak_memory_stats()
            step(ids)
            step(ids)
            sync(device)
            peak = torch.cuda.max_memory_allocated() / GIB
            est = run_config(cfg, b, seq, compiled).memory_estimate(world_size=1)["total"]
            rows.append({"config": config, "seq": seq, "batch": b, "fits": True, "peak_gib": peak, "estimate_gib": est,
                         "compiled": compiled, "mtp": 1})
            print(f"  fit {config} seq {seq} batch {b}: peak {peak:.1f} GiB, estimate {est:.1f} GiB", flush=True)
        except torch.OutOfMemoryError:
            opt.zero_grad(set_to_none=True)
            del ids
            free(device)
            rows.append({"config": config, "seq": seq, "batch": b, "fits": False, "compiled": compiled, "mtp": 1})
            print(f"  fit {config} seq {seq} batch {b}: out of memory", flush=True)
            break
    del model, opt, step
    free(device)
    torch._dynamo.reset()
    return rows


# ------------------------------------------------------------------------------------ saved activations
def saved_activations(device: torch.device, config: str, seq: int, mtp: int = 1) -> dict[str, Any]:
    """Bytes per token that one forward keeps for backward, by block kind (eager fast path, tensors
    seen by autograd's saved-tensor hooks, each storage counted once, parameters excluded), and the
    memory actually retained after the forward (eager and compiled), at batch 1."""
    from lit_deepseek.kernels.compile import compile_blocks
    from lit_deepseek.training.loss import IGNORE_INDEX, model_loss

    cfg = CONFIGS[config](mtp)
    set_global_fast(True)
    model = build_ours(cfg, device)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    current = ["outside"]
    handles = []
    for key, block in model.layers.items():
        kind = "dense" if int(key) < cfg.first_dense_layers else "moe"
        handles.append(block.register_forward_pre_hook(lambda m, a, kind=kind: current.__setitem__(0, kind)))
        handles.append(block.register_forward_hook(lambda m, a, o: current.__setitem__(0, "outside")))
    for module in model.mtp:
        handles.append(module.register_forward_pre_hook(lambda m, a: current.__setitem__(0, "mtp")))
        handles.append(module.register_forward_hook(lambda m, a, o: current.__setitem__(0, "outside")))
    seen: set[int] = set()
    acc: dict[str, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and ptr not in seen:
            seen.add(ptr)
            acc[current[0]] = acc.get(current[0], 0) + t.untyped_storage().nbytes()
        return t

    ids = torch.randint(0, cfg.vocab_size, (1, seq), device=device)
    labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], IGNORE_INDEX)], dim=1)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        h, mtp_h = model(ids, return_hidden=True)
    for hd in handles:
        hd.remove()
    n_moe = cfg.num_layers - cfg.first_dense_layers
    out: dict[str, Any] = {"config": config, "seq": seq, "mtp": mtp,
                           "dense_per_layer": acc.get("dense", 0) / max(cfg.first_dense_layers, 1) / seq,
                           "moe_per_layer": acc.get("moe", 0) / max(n_moe, 1) / seq,
                           "mtp_per_module": acc.get("mtp", 0) / max(mtp, 1) / seq,
                           "outside": acc.get("outside", 0) / seq}
    del h, mtp_h
    free(device)
    for compiled in (False, True):
        m = build_ours(cfg, device)
        if compiled:
            compile_blocks(m)
        for _ in range(2 if compiled else 1):  # compile first, then measure
            free(device)
            before = torch.cuda.memory_allocated() if device.type == "cuda" else 0
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            h, mtp_h = m(ids, return_hidden=True)
            after = torch.cuda.memory_allocated() if device.type == "cuda" else 0
            parts = model_loss(m.head.weight, h, mtp_h, labels, cfg.mtp_loss_weight)
            parts.total.backward()
            peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
            m.zero_grad(set_to_none=True)
            del h, mtp_h, parts
        out["retained_per_token_" + ("compiled" if compiled else "eager")] = (after - before) / seq
        out["fwd_bwd_peak_over_retained_" + ("compiled" if compiled else "eager")] = (peak - after) / GIB
        del m
        free(device)
        torch._dynamo.reset()
    return out


# ------------------------------------------------------------------------------------ report
def fmt_table(rows: list[dict[str, Any]], mm_rate: float) -> str:
    hf = {(r["config"], r["seq"], r["compiled"]): r for r in rows if r["impl"] == "hf" and "error" not in r}
    lines = ["| variant | config | seq x batch | MTP | compiled | tokens/s | MFU (989) | MFU (measured mm) "
             "| peak GiB | estimate GiB | est/peak | vs HF (same mode) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | {r['config']} | {r['seq']} x {r['batch']} | {r['mtp']} | {r['compiled']} "
                         f"| failed: {r['error'][:80]} | | | | | | |")
            continue
        ref = hf.get((r["config"], r["seq"], r["compiled"]))
        ratio = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x" if ref is not None and r["impl"] == "ours" else ""
        est = f"{r['estimate_gib']:.1f} | {r['estimate_gib'] / r['peak_gib']:.2f}" if r["impl"] == "ours" else " | "
        mfu_m = f"{100 * r['mfu_measured']:.1f}%" if r.get("mfu_measured") else "n/a"
        lines.append(f"| {r['name']} | {r['config']} | {r['seq']} x {r['batch']} | {r['mtp']} | {r['compiled']} "
                     f"| {r['tokens_per_s']:,.0f} | {100 * r['mfu_989']:.1f}% | {mfu_m} | {r['peak_gib']:.1f} | {est} "
                     f"| {ratio} |")
    return "\n".join(lines)


def git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True).strip()
    except Exception:
        return os.environ.get("BENCH_COMMIT", "unknown")


def variants(args: argparse.Namespace) -> list[Variant]:
    s = args.tiny_seq if args.tiny else None
    cfgs = {"small": "tiny" if args.tiny else "small", "large": "tiny" if args.tiny else "large"}
    b8 = 2 if args.tiny else 8
    out = []
    for spec in args.variants.split(","):
        # impl:config:seq:batch:mode[:mtpN][:fp8][:ref]
        parts = spec.split(":")
        impl, config, seq, batch, mode = parts[:5]
        flags = parts[5:]
        mtp = next((int(f[3:]) for f in flags if f.startswith("mtp")), 0)
        fp8 = "fp8" in flags
        fast = "ref" not in flags
        name = f"{impl}-{config}-{seq}-{mode}" + (f"-mtp{mtp}" if mtp else "") + ("-fp8" if fp8 else "") + \
            ("-ref" if not fast else "")
        out.append(Variant(name, impl, cfgs[config], s or int(seq), min(int(batch), b8) if args.tiny else int(batch),
                           mode == "compiled", mtp, fp8, fast))
    return out


DEFAULT_VARIANTS = ",".join([
    "hf:small:4096:8:eager", "hf:small:4096:8:compiled",
    "ours:small:4096:8:eager:ref", "ours:small:4096:8:eager", "ours:small:4096:8:compiled",
    "ours:small:4096:8:compiled:mtp1", "ours:small:4096:8:compiled:fp8",
])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--phases", default="throughput", help="comma list: throughput, curves, fit, saved")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS,
                    help="comma list of impl:config:seq:batch:eager|compiled[:mtpN][:fp8][:ref]")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--curve-steps", type=int, default=200)
    ap.add_argument("--fp8-steps", type=int, default=300)
    ap.add_argument("--curve-batch", type=int, default=2)
    ap.add_argument("--fit-batches", default="8,16,24,32,40,48,56,64")
    ap.add_argument("--fit-seq", type=int, default=4096)
    ap.add_argument("--profile", default="", help="comma list of variant names to profile one step of")
    ap.add_argument("--budget-s", type=float, default=1e9, help="skip the remaining work after this many seconds")
    ap.add_argument("--out", default=os.environ.get("OUT", str(ROOT / "benchmarks" / "out")))
    ap.add_argument("--results", default="", help="append the markdown section to this file")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke test of every path)")
    ap.add_argument("--tiny-seq", type=int, default=64)
    ap.add_argument("--note", default="")
    args = ap.parse_args()

    t_start = time.perf_counter()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    torch._dynamo.config.cache_size_limit = 64
    torch._dynamo.config.accumulated_cache_size_limit = 512
    torch._dynamo.config.automatic_dynamic_shapes = False
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    log = (out_dir / "bench.jsonl").open("a")

    def record(kind: str, data: dict[str, Any]) -> None:
        log.write(json.dumps({"kind": kind, **data}, default=str) + "\n")
        log.flush()

    import transformers

    env = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "commit": git_commit(), "torch": torch.__version__, "transformers": transformers.__version__,
           "gpu": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
           "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
           "argv": " ".join(sys.argv[1:])}
    mm = matmul_rate(device)
    env["bf16_matmul_tflops"] = mm / 1e12
    print(json.dumps(env), flush=True)
    record("env", env)
    phases = args.phases.split(",")
    rows: list[dict[str, Any]] = []
    sections = [f"### {env['date']} · commit {env['commit']} · {env['gpu']} · torch {env['torch']} · "
                f"transformers {env['transformers']}" + (f" · {args.note}" if args.note else ""),
                "", f"Settings: bf16 parameters and fused AdamW (bf16 states) for both implementations, "
                f"lr 3e-4, {args.warmup} warm-up + {args.steps} timed steps on random tokens; HF: sdpa attention, "
                f"grouped_mm experts, `torch.compile(model)`; ours: `compile_blocks` (regional). "
                f"Measured bf16 matmul (8192^3): {mm / 1e12:.0f} TFLOP/s. Command: "
                f"`python benchmarks/bench_train.py {env['argv']}`", ""]

    def over_budget() -> bool:
        return time.perf_counter() - t_start > args.budget_s

    if "throughput" in phases:
        prof = set(args.profile.split(",")) if args.profile else set()
        for v in variants(args):
            if over_budget():
                print(f"  {v.name}: skipped (budget)", flush=True)
                continue
            t0 = time.perf_counter()
            try:
                r = throughput(v, device, args.steps, args.warmup, mm, out_dir if v.name in prof else None)
            except Exception as exc:  # keep going: one failure must not cost the other variants
                traceback.print_exc()
                r = dict(dataclasses.asdict(v), error=f"{type(exc).__name__}: {exc}".replace("\n", " ")[:300])
                free(device)
                torch._dynamo.reset()
            rows.append(r)
            record("throughput", r)
            if "error" not in r:
                print(f"  {v.name}: {r['tokens_per_s']:,.0f} tok/s, MFU {100 * r['mfu_989']:.1f}% "
                      f"({100 * (r['mfu_measured'] or 0):.1f}% of measured), peak {r['peak_gib']:.1f} GiB "
                      f"(estimate {r['estimate_gib']:.1f}), batch {r['batch']}, loss {r['loss']:.3f}, "
                      f"{time.perf_counter() - t0:.0f}s {r['impls']}", flush=True)
                for line in r.get("top_kernels") or []:
                    print("     ", line, flush=True)
        sections += [fmt_table(rows, mm), ""]

    if "fp8check" in phases and not over_budget():
        try:
            for r in fp8_check(device, "tiny" if args.tiny else "small", args.tiny_seq if args.tiny else 1024):
                record("fp8check", r)
                sections.append(f"FP8 check (small, 2 x 1024): fp8={r['fp8']} compiled={r['compiled']} loss "
                                f"{r['loss']:.4f}, causality leak {r['leak_max_abs']:.3g}, rel diff to bf16 eager "
                                f"{r['rel_diff_h']:.4f}")
            sections.append("")
        except Exception as exc:
            traceback.print_exc()
            sections += [f"FP8 check failed: {type(exc).__name__}: {exc}", ""]

    if "curves" in phases and not over_budget():
        try:
            c = curves(device, "tiny" if args.tiny else "small", args.curve_batch, args.tiny_seq if args.tiny else 4096,
                       args.curve_steps, args.fp8_steps)
            record("curves", c)
            line = (f"Loss curves (small, MTP 1, batch {c['batch']} x {c['seq']}, Python help-topic bytes, "
                    f"lr 3e-4 after 20 warm-up steps):")
            if "reference" in c:
                line += (f" fast path (compiled) vs plain reference path over {args.curve_steps} steps: max |diff| of "
                         f"10-step moving averages {c['max_abs_diff_smoothed']:.4f} (after step 20: "
                         f"{c['max_abs_diff_smoothed_after_20']:.4f}), final smoothed "
                         f"{smooth(c['fast'][:args.curve_steps])[-1]:.4f} vs {smooth(c['reference'])[-1]:.4f}; "
                         f"times {c['fast_s']:.0f}s vs {c['reference_s']:.0f}s.")
            if "fp8" in c:
                line += (f" FP8 vs bf16 after {args.fp8_steps} steps (mean of last 20): {c['fp8_final']:.4f} vs "
                         f"{c['bf16_final']:.4f} ({100 * c['fp8_rel_diff']:+.2f}%).")
            print(line, flush=True)
            sections += [line, ""]
        except Exception as exc:
            traceback.print_exc()
            sections += [f"Loss curves failed: {type(exc).__name__}: {exc}", ""]

    if "fit" in phases and not over_budget():
        try:
            batches = [int(b) for b in args.fit_batches.split(",")]
            fr = fit(device, "tiny" if args.tiny else "small", args.tiny_seq if args.tiny else args.fit_seq, batches,
                     compiled=False) if device.type == "cuda" else []
            for r in fr:
                record("fit", r)
            ok = [r for r in fr if r["fits"]]
            if ok:
                line = (f"Largest small-config batch at seq {args.fit_seq} (MTP 1, eager fast path): {ok[-1]['batch']} "
                        f"(tried {args.fit_batches}); peak vs estimate: " +
                        ", ".join(f"b{r['batch']} {r['peak_gib']:.1f}/{r['estimate_gib']:.1f}" for r in ok))
                print(line, flush=True)
                sections += [line, ""]
        except Exception as exc:
            traceback.print_exc()
            sections += [f"Fit search failed: {type(exc).__name__}: {exc}", ""]

    if "saved" in phases and not over_budget():
        try:
            sv = saved_activations(device, "tiny" if args.tiny else "small", args.tiny_seq if args.tiny else 4096)
            record("saved", sv)
            line = ("Saved activations, bytes per token (eager fast path, batch 1 x 4096, MTP 1): " +
                    ", ".join(f"{k} {v:,.0f}" if isinstance(v, float) and "peak" not in k else f"{k} {v}"
                              for k, v in sv.items() if k not in ("config", "seq", "mtp")))
            print(line, flush=True)
            sections += [line, ""]
        except Exception as exc:
            traceback.print_exc()
            sections += [f"Saved-activation count failed: {type(exc).__name__}: {exc}", ""]

    text = "\n".join(sections)
    (out_dir / "results_section.md").write_text(text + "\n")
    if args.results:
        with open(args.results, "a") as f:
            f.write("\n" + text + "\n")
    print("\n" + text)
    print(f"total {time.perf_counter() - t_start:.0f}s")


if __name__ == "__main__":
    main()
