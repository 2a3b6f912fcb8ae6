"""Parameter, FLOP and memory estimates of a config, and the printed summary.

Parameters are counted from the model itself, built on the meta device (no memory, exact for any
config): each tensor is assigned to a component by its name. The router's bias buffer counts as a
parameter (it is trained, by the bias update). FLOPs and memory are models: FLOPs are 6 x matmul
parameters per token plus causal attention; memory follows the tensors the eager training path
keeps (see `activation_bytes`). Layout numbers (DP, micro-batches) come from
`lit_deepseek.parallel.layout`, never re-derived here.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:  # config.py delegates to this module: import its types for annotations only
    from lit_deepseek.config import DeepSeekConfig, ModelConfig

_GIB = 1024**3
_COMPONENTS = ("embedding", "head", "norms", "attention", "dense_ffn", "shared_experts", "routed_experts", "router")


# --------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------


def _component(name: str) -> str:
    """Which part of the model a parameter (or the router bias) belongs to, by its name."""
    if name.startswith("embed."):
        return "embedding"
    if name.startswith("head."):
        return "head"
    if ".experts." in name:
        return "routed_experts"
    if ".shared_experts." in name:
        return "shared_experts"
    if name.endswith(("gate_weight", "expert_bias")):
        return "router"
    if ".attn." in name:
        return "attention"
    if ".ffn." in name:
        return "dense_ffn"
    return "norms"  # block, final and MTP norms; the MTP concatenation projection is handled apart


_COUNTS: dict[str, tuple[dict[str, int], dict[str, int], int]] = {}


def _counts(m: ModelConfig) -> tuple[dict[str, int], dict[str, int], int]:
    """(main-model counts by component, MTP counts by component, MTP eh_proj parameters)."""
    key = repr(dataclasses.asdict(m))
    if key not in _COUNTS:
        import torch

        from lit_deepseek.model import DeepSeekV3

        with torch.device("meta"):
            model = DeepSeekV3(m)
        main, mtp = dict.fromkeys(_COMPONENTS, 0), dict.fromkeys(_COMPONENTS, 0)
        eh_proj = 0
        tensors = list(model.named_parameters()) + [(n, b) for n, b in model.named_buffers()
                                                    if n.endswith("expert_bias")]
        for name, t in tensors:
            if not name.startswith("mtp."):
                main[_component(name)] += t.numel()
            elif name.split(".")[2] == "eh_proj":
                eh_proj += t.numel()
            else:
                mtp[_component(name.split(".", 2)[2])] += t.numel()
        _COUNTS[key] = (main, mtp, eh_proj)
    return _COUNTS[key]


def param_breakdown(m: ModelConfig) -> dict[str, int]:
    """Parameter counts by component (main model), plus main_total, main_active and mtp_total.

    main_active counts what touches one token: everything but the embedding row lookup and the
    unselected routed experts.
    """
    main, mtp, eh_proj = _counts(m)
    out = dict(main)
    out["main_total"] = sum(main.values())
    routed_layers = m.num_layers - m.first_dense_layers
    selected = (main["routed_experts"] * m.moe.num_experts_per_token // m.moe.num_experts) if routed_layers else 0
    out["main_active"] = out["main_total"] - main["embedding"] - main["routed_experts"] + selected
    out["mtp_total"] = sum(mtp.values()) + eh_proj
    return out


def _mtp_matmul_params(m: ModelConfig) -> int:
    """Matrix-multiply parameters one token meets in the MTP modules (the shared head included)."""
    if not m.mtp_depth:
        return 0
    _, mtp, eh_proj = _counts(m)
    selected = mtp["routed_experts"] * m.moe.num_experts_per_token // m.moe.num_experts
    return (eh_proj + mtp["attention"] + mtp["dense_ffn"] + mtp["shared_experts"] + mtp["router"] + selected
            + m.mtp_depth * m.vocab_size * m.mla.d_model)


def total_params(m: ModelConfig, include_mtp: bool = False) -> int:
    b = param_breakdown(m)
    return b["main_total"] + (b["mtp_total"] if include_mtp else 0)


def matmul_params_per_token(m: ModelConfig) -> int:
    """Active parameters used in matrix multiplies per token (main model and MTP modules): the
    output head counts, the embedding lookup and the norms do not."""
    b = param_breakdown(m)
    return b["main_active"] - b["norms"] + _mtp_matmul_params(m)


def flops_per_token(cfg: DeepSeekConfig, seq_length: Optional[int] = None) -> float:
    """Training FLOPs per token: 6 x matmul parameters plus causal attention (half of full)."""
    s = seq_length or cfg.training.seq_length
    a = cfg.model.mla
    layers = cfg.model.num_layers + cfg.model.mtp_depth
    attention = 6 * layers * a.num_heads * (a.qk_head_dim + a.v_head_dim) * s / 2
    return 6 * matmul_params_per_token(cfg.model) + attention


# --------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------


def memory_estimate(cfg: DeepSeekConfig, world_size: Optional[int] = None) -> dict[str, float]:
    """Per-GPU memory in GiB: weights (with the kept FP8 weight blocks, `fp8_weight_cache_bytes`),
    gradients, optimizer states, activations, total."""
    from lit_deepseek.parallel.layout import layout_degrees

    m, p, t = cfg.model, cfg.parallel, cfg.training
    b = param_breakdown(m)
    _, mtp, _ = _counts(m)
    tp, pp, ep, dp = layout_degrees(p, world_size)
    experts = b["routed_experts"] + mtp["routed_experts"]
    dense = b["main_total"] + b["mtp_total"] - experts
    # Per GPU: dense weights split by TP and stages; experts by EP and stages.
    dense_local = dense / (tp * pp)
    expert_local = experts / (ep * pp)
    master_bytes = 2 if t.precision == "bf16-true" else 4
    dense_dp, expert_dp = dp * ep, dp  # replicas that ZeRO shards over

    def per_gpu(min_stage: int) -> float:
        sharded = p.zero_stage >= min_stage
        return dense_local / (dense_dp if sharded else 1) + expert_local / (expert_dp if sharded else 1)

    weights = per_gpu(3) * master_bytes + fp8_weight_cache_bytes(cfg, world_size)
    grads = per_gpu(2) * master_bytes
    optimizer = per_gpu(1) * 2 * master_bytes
    activations = activation_bytes(cfg) / tp
    total = weights + grads + optimizer + activations
    return {k: v / _GIB for k, v in dict(weights=weights, gradients=grads, optimizer=optimizer,
                                         activations=activations, total=total).items()}


def fp8_weight_cache_bytes(cfg: DeepSeekConfig, world_size: Optional[int] = None) -> float:
    """Bytes per GPU of the FP8 weight blocks kept across the micro-batches of a step (counted with
    the weights): training with the blockwise FP8 recipe and more than one micro-batch per step on
    a layout of plain local weights (TP 1, PP 1, ZeRO 0 or 1; any EP and DP) keeps, per local FP8
    weight parameter, 1 byte of the blocks of w (the input gradient transposes them; the float32
    scales, one per 128x128 block, are negligible); `lit_deepseek.kernels.fp8`, "Weight reuse". FP8
    weights are those of the default training.fp8_exclude (all but the embedding, head and router),
    less the routed experts when a pattern of it matches "experts"; a rank holds 1/EP of the routed
    experts. Other layouts keep none, and so does LIT_DEEPSEEK_FP8_WEIGHT_CACHE=0."""
    from lit_deepseek.kernels.fp8 import weight_reuse_enabled
    from lit_deepseek.parallel.layout import layout_degrees, plain_local_weights

    t = cfg.training
    tp, pp, ep, dp = layout_degrees(cfg.parallel, world_size)
    if not (t.use_fp8 and t.fp8_recipe == "blockwise" and weight_reuse_enabled()) or \
            not plain_local_weights(tp, pp, cfg.parallel.zero_stage):
        return 0.0
    if t.global_batch_size < 2 * t.micro_batch_size * ep * dp:  # one micro-batch per step: nothing kept
        return 0.0
    b = param_breakdown(cfg.model)
    _, mtp, eh_proj = _counts(cfg.model)
    dense = sum(b[c] + mtp[c] for c in ("attention", "dense_ffn", "shared_experts")) + eh_proj
    experts = 0 if any(fnmatch.fnmatchcase("experts", pat) for pat in t.fp8_exclude) else \
        b["routed_experts"] + mtp["routed_experts"]  # unless the routed experts stay bf16
    return 1.0 * (dense + experts / ep)


def activation_bytes(cfg: DeepSeekConfig) -> float:
    """Bytes kept for backward by one micro-batch on one pipeline stage, plus the loss's buffers.

    Counts the tensors the eager training path saves per token (checked against H200 and H100
    peaks of `lit-deepseek fit`, benchmarks/bench_fit.py, for the small config): each RMSNorm
    keeps its input and output (op by op also a float32 copy); attention keeps the projected
    queries, the latents, the decompressed keys/values, the concatenated q and k, the output and the
    log-sum-exp; an MoE layer keeps the router's float32 input, the k sorted copies and their
    weighted outputs, and three SwiGLU tensors (gate, up, product; op by op also silu's output) per
    routed copy and per shared expert. Eager steps are counted with the GPU's Triton norm and SwiGLU
    kernels; a torch.compile'd model keeps about a quarter less than the op-by-op path.
    """
    m, t, p = cfg.model, cfg.training, cfg.parallel
    a, e = m.mla, m.moe
    tokens = t.micro_batch_size * t.seq_length
    act = 4 if t.precision == "32-true" else 2
    f32 = 4
    d, h, k = a.d_model, a.num_heads, e.num_experts_per_token

    # Eager steps on a GPU run RMSNorm and SwiGLU as Triton kernels (lit_deepseek.kernels.eager),
    # which keep less than the op-by-op references: a norm its input and the row scales instead of
    # a float32 copy and the normed value, SwiGLU gate and up without silu's output. Compiled
    # blocks trace the references (scaled below).
    fused = not t.compile

    def norm(width: int) -> int:
        return width * (f32 + act) if fused else width * (f32 + 2 * act)

    swiglu = 3 * act if fused else 4 * act  # per intermediate channel: gate, up, (silu), product
    attn = (norm(d) + (norm(a.d_q_latent) if a.d_q_latent > 0 else 0) + act * h * a.qk_head_dim
            + norm(a.d_latent) + act * (a.d_latent + a.qk_rope_head_dim)
            + act * h * (a.qk_nope_head_dim + a.v_head_dim)
            + 2 * act * h * a.qk_head_dim + act * h * a.v_head_dim + f32 * h)
    routed = swiglu * k * e.expert_intermediate_size
    shared = swiglu * e.num_shared_experts * e.expert_intermediate_size
    moe_layer = norm(d) + f32 * d + 2 * act * k * d + routed + shared + 3 * f32 * e.num_experts
    dense_layer = norm(d) + swiglu * m.dense_intermediate_size
    layers = m.num_layers + m.mtp_depth
    per_stage_layers = math.ceil(layers / p.pipeline_parallel_size)
    n_dense = min(m.first_dense_layers, per_stage_layers)
    n_moe = per_stage_layers - n_dense
    # MTP: two input norms and the concatenation; final norm and the fused loss's hidden-state gradient
    mtp_extra = m.mtp_depth * (3 * norm(d) + 2 * act * d) if p.pipeline_parallel_size == 1 else 0
    outside = norm(d) + act * d
    if t.compile:
        # measured on an H200 (benchmarks/RESULTS.md): compiled blocks keep 0.74x of the eager
        # path's saved tensors across the small and large shapes (pointwise ops are recomputed)
        attn, moe_layer, dense_layer = 0.74 * attn, 0.74 * moe_layer, 0.74 * dense_layer
    per_token = attn * per_stage_layers + moe_layer * n_moe + dense_layer * n_dense + mtp_extra + outside
    if t.activation_checkpointing == "full":
        per_token = per_stage_layers * act * d + attn + moe_layer + outside
    elif t.activation_checkpointing == "selective":
        per_token -= n_moe * routed
    # Pipeline schedules keep up to PP micro-batches in flight on the first stage.
    in_flight = min(p.pipeline_parallel_size, max(1, t.global_batch_size // t.micro_batch_size))
    chunk = min(t.loss_chunk_size, tokens)
    # one chunk's float32 logits and softmax and its bf16 gradient; the head's float32 gradient
    loss = chunk * m.vocab_size * (f32 + f32 + act) + m.vocab_size * d * f32
    return per_token * tokens * in_flight + loss


# --------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------


def _fmt(n: float) -> str:
    if n >= 1e9:
        return f"{n / 1e9:8.2f}B"
    if n >= 1e6:
        return f"{n / 1e6:8.2f}M"
    return f"{n / 1e3:8.2f}K"


def summary(cfg: DeepSeekConfig, world_size: Optional[int] = None) -> str:
    """Architecture, parameters by component, the parallel layout and the memory estimate."""
    from lit_deepseek.parallel.layout import layout_degrees

    m, p = cfg.model, cfg.parallel
    b = param_breakdown(m)
    mem = memory_estimate(cfg, world_size)
    tp, pp, ep, dp = layout_degrees(p, world_size)
    lines = [
        "DeepSeek-V3 configuration",
        f"  layers {m.num_layers} (first {m.first_dense_layers} dense), d_model {m.mla.d_model}, "
        f"heads {m.mla.num_heads}, vocab {m.vocab_size}",
        f"  MLA: q latent {m.mla.d_q_latent}, kv latent {m.mla.d_latent}, head dims nope/rope/v "
        f"{m.mla.qk_nope_head_dim}/{m.mla.qk_rope_head_dim}/{m.mla.v_head_dim}, "
        f"context {m.mla.max_context_length}",
        f"  MoE: {m.moe.num_experts} routed + {m.moe.num_shared_experts} shared experts, "
        f"top-{m.moe.num_experts_per_token}, FFN {m.moe.expert_intermediate_size}, "
        f"groups {m.moe.num_expert_groups}/{m.moe.num_limited_groups}, {m.moe.score_function}",
        f"  MTP depth {m.mtp_depth} (loss weight {m.mtp_loss_weight})",
        "Parameters",
        f"  embedding        {_fmt(b['embedding'])}",
        f"  attention        {_fmt(b['attention'])}",
        f"  dense FFN        {_fmt(b['dense_ffn'])}",
        f"  shared experts   {_fmt(b['shared_experts'])}",
        f"  routed experts   {_fmt(b['routed_experts'])}",
        f"  routers          {_fmt(b['router'])}",
        f"  norms            {_fmt(b['norms'])}",
        f"  output head      {_fmt(b['head'])}",
        f"  total (main)     {_fmt(b['main_total'])}",
        f"  active per token {_fmt(b['main_active'])}",
        f"  MTP modules      {_fmt(b['mtp_total'])} (shown separately)",
        "Parallel layout",
        f"  TP {tp} x PP {pp} x EP {ep} x DP {dp} = {tp * pp * ep * dp} GPUs, ZeRO-{p.zero_stage}",
        f"Estimated memory per GPU (GiB, {cfg.training.precision}, micro batch "
        f"{cfg.training.micro_batch_size} x {cfg.training.seq_length}, "
        f"checkpointing {cfg.training.activation_checkpointing})",
    ]
    for k in ("weights", "gradients", "optimizer", "activations", "total"):
        lines.append(f"  {k:<16} {mem[k]:.1f}")
        kept = fp8_weight_cache_bytes(cfg, world_size) / _GIB if k == "weights" else 0.0
        if kept:
            lines.append(f"    of which {kept:.1f} FP8 weight blocks kept across micro-batches "
                         "(LIT_DEEPSEEK_FP8_WEIGHT_CACHE=0 drops them)")
    return "\n".join(lines)
