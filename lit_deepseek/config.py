"""Typed configuration: one dataclass per YAML section, loading, validation and estimates.

The YAML layout is::

    model: {<architecture fields>, mla: {...}, moe: {...}}
    parallel: {...}
    training: {...}
    data: {...}
    checkpoint: {...}
    logging: {...}

Every field's docstring (the string literal under it) becomes its help text in the CLI.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml


class ConfigError(ValueError):
    """A configuration that cannot work, with a message naming the field and the rule."""


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


@dataclass
class MLAConfig:
    """Multi-head latent attention (DeepSeek-V3 report, section 2.1.1)."""

    d_model: int = 1024
    """Model hidden dimension."""
    d_latent: int = 256
    """Latent KV dimension: the joint key/value compression rank (kv_lora_rank)."""
    d_q_latent: int = 512
    """Query compression rank (q_lora_rank); 0 means a plain query projection."""
    num_heads: int = 16
    """Number of attention heads."""
    qk_nope_head_dim: int = 64
    """Per-head query/key dimension without rotary embedding."""
    qk_rope_head_dim: int = 32
    """Per-head dimension of the decoupled rotary query and the shared rotary key."""
    v_head_dim: int = 64
    """Per-head value dimension."""
    use_fp8_kv: bool = False
    """Store the decoding KV (latent) cache in FP8 (needs FP8 hardware, compute capability >= 8.9)."""
    max_context_length: int = 8192
    """Maximum sequence length the rotary tables are built for (YaRN stretches the original context to it)."""
    use_flash_mla: bool = False
    """Use FlashMLA decode kernels when installed on Hopper; otherwise the PyTorch path is used with a warning."""
    rope_theta: float = 10000.0
    """Rotary base frequency."""
    rope_factor: float = 1.0
    """YaRN scaling factor; 1.0 disables YaRN."""
    rope_original_context_length: int = 4096
    """Context length of pre-training before YaRN extension (original_max_position_embeddings)."""
    rope_beta_fast: float = 32.0
    """YaRN beta_fast: rotations above which frequencies are kept (extrapolated)."""
    rope_beta_slow: float = 1.0
    """YaRN beta_slow: rotations below which frequencies are fully interpolated."""
    rope_mscale: float = 1.0
    """YaRN mscale applied to the rotary cos/sin."""
    rope_mscale_all_dim: float = 1.0
    """YaRN mscale_all_dim; the softmax scale is multiplied by mscale(factor, mscale_all_dim)^2."""

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


@dataclass
class MoEConfig:
    """DeepSeekMoE: shared plus fine-grained routed experts (report, section 2.1.2)."""

    num_experts: int = 16
    """Total routed experts."""
    num_experts_per_token: int = 2
    """Active routed experts per token (top-k)."""
    expert_intermediate_size: int = 2560
    """FFN hidden size of each routed (and shared) expert."""
    num_shared_experts: int = 1
    """Shared experts applied to every token (their FFN is num_shared_experts x expert_intermediate_size)."""
    num_expert_groups: int = 1
    """Expert groups for group-limited routing (1 = no groups)."""
    num_limited_groups: int = 1
    """Groups each token may route into (topk_group)."""
    score_function: Literal["sigmoid", "softmax"] = "sigmoid"
    """Router affinity function."""
    route_scale: float = 1.0
    """Scale applied to the normalised routing weights (2.5 in DeepSeek-V3)."""
    norm_topk_prob: bool = True
    """Normalise the selected routing weights to sum to 1."""
    use_aux_loss_free: bool = True
    """Aux-loss-free balancing: a per-expert bias added to the scores for top-k selection only."""
    bias_update_speed: float = 0.001
    """Step of the aux-loss-free bias update (gamma in the report)."""
    capacity_factor: Optional[float] = None
    """Per-expert token capacity as a multiple of the balanced load; null = dropless."""
    router_aux_loss_weight: float = 0.0001
    """Weight of the complementary sequence-wise balance loss (alpha); 0 disables it."""
    use_deep_ep: bool = False
    """Dispatch tokens with DeepEP when installed and the expert-parallel group fits it."""
    deep_ep_fp8: bool = False
    """FP8 token dispatch in DeepEP."""


@dataclass
class ModelConfig:
    """The DeepSeek-V3 architecture."""

    vocab_size: int = 32768
    """Vocabulary size."""
    num_layers: int = 12
    """Transformer blocks of the main model (MTP modules not counted)."""
    first_dense_layers: int = 1
    """Leading blocks with a dense FFN instead of MoE (first_k_dense_replace)."""
    dense_intermediate_size: int = 4096
    """FFN hidden size of the dense leading blocks."""
    mtp_depth: int = 1
    """Multi-token prediction depth D (0 disables MTP)."""
    mtp_loss_weight: float = 0.3
    """Weight lambda of the MTP loss (averaged over depths)."""
    init_std: float = 0.006
    """Standard deviation of the normal weight initialisation."""
    rms_norm_eps: float = 1e-6
    """RMSNorm epsilon."""
    tie_word_embeddings: bool = False
    """Share the input embedding with the output head."""
    mla: MLAConfig = field(default_factory=MLAConfig)
    """Multi-head latent attention settings."""
    moe: MoEConfig = field(default_factory=MoEConfig)
    """Mixture-of-experts settings."""


@dataclass
class ParallelConfig:
    """Parallel layout: total_gpus = TP x PP x EP x DP."""

    tensor_parallel_size: int = 1
    """Tensor-parallel degree (attention heads and MLPs sharded)."""
    pipeline_parallel_size: int = 1
    """Pipeline stages (layers split across ranks)."""
    expert_parallel_size: int = 1
    """Expert-parallel degree (routed experts sharded; dense weights data-parallel over EP x DP)."""
    data_parallel_size: int = -1
    """Replicas of each expert shard; -1 = whatever the world size leaves."""
    zero_stage: Literal[0, 1, 2, 3] = 1
    """0 replicated, 1 optimizer states sharded, 2 + gradients, 3 + parameters (FSDP2)."""
    overlap_grad_reduce: bool = True
    """Overlap the data-parallel gradient reduction with the backward pass."""
    sequence_parallel: bool = True
    """Shard norms and residual activations along the sequence under tensor parallelism."""
    pipeline_schedule: Literal["1f1b", "interleaved_1f1b", "zbv", "dualpipev", "gpipe"] = "1f1b"
    """Pipeline schedule."""
    virtual_pipeline_stages: int = 1
    """Model chunks per pipeline rank (interleaved 1F1B; ZBV and DualPipeV need 2)."""
    pipeline_layer_split: Optional[list[int]] = None
    """Explicit number of transformer blocks per stage (length PP x virtual stages); null = even split."""

    def resolved_data_parallel_size(self, world_size: Optional[int] = None) -> int:
        """DP with -1 resolved against world_size (1 when the world size is unknown)."""
        if self.data_parallel_size != -1:
            return self.data_parallel_size
        if world_size is None:
            return 1
        return max(1, world_size // self.model_parallel_size())

    def model_parallel_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size * self.expert_parallel_size

    def total_gpus(self, world_size: Optional[int] = None) -> int:
        """TP x PP x EP x DP (DP = -1 resolved against world_size when given)."""
        return self.model_parallel_size() * self.resolved_data_parallel_size(world_size)


@dataclass
class TrainingConfig:
    """Optimisation and step settings."""

    global_batch_size: int = 64
    """Sequences per optimizer step over all data-parallel ranks (sequences, not tokens)."""
    micro_batch_size: int = 1
    """Sequences per forward pass on one data-parallel rank."""
    learning_rate: float = 3e-4
    """Peak learning rate."""
    min_learning_rate: float = 3e-5
    """Floor the schedule decays to."""
    lr_warmup_steps: int = 2000
    """Linear warmup steps."""
    lr_schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    """Decay after warmup: cosine, warmup-stable-decay, or constant."""
    lr_decay_fraction: float = 0.1
    """WSD only: fraction of max_steps spent in the final (linear) decay."""
    max_steps: int = 100000
    """Optimizer steps to train for."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 disables)."""
    weight_decay: float = 0.1
    """AdamW weight decay (not applied to norms, biases and the router bias)."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.95
    """AdamW beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    seq_length: int = 4096
    """Tokens per training sequence."""
    use_fp8: bool = False
    """FP8 training of linear layers and experts (needs compute capability >= 8.9)."""
    precision: Literal["bf16-mixed", "32-true", "bf16-true", "16-mixed"] = "bf16-mixed"
    """Lightning precision plugin."""
    activation_checkpointing: Literal["none", "full", "selective"] = "none"
    """Recompute activations per block: none, full blocks, or selective (MoE experts only)."""
    compile: bool = False
    """Regional torch.compile of each transformer block (fuses norms, RoPE, SwiGLU, routing; GPU speed lever)."""
    seed: int = 1234
    """Seed for initialisation, data order and dropout-free determinism."""
    deterministic: bool = False
    """Use deterministic algorithms (bit-exact resume on CPU)."""
    loss_chunk_size: int = 4096
    """Tokens per chunk of the output-head + cross-entropy (bounds float32 logits memory)."""
    max_nonfinite_steps: int = 5
    """Consecutive NaN/Inf losses tolerated (each step skipped) before the run stops with a checkpoint."""
    val_every_n_steps: int = 1000
    """Run validation every this many optimizer steps."""
    val_batches: int = 50
    """Micro-batches per validation run."""

    def gradient_accumulation(self, data_parallel_ranks: int = 1) -> int:
        """Micro-batches per optimizer step on each data-parallel rank."""
        per_step = self.micro_batch_size * data_parallel_ranks
        if self.global_batch_size % per_step:
            raise ConfigError(
                f"training.global_batch_size: {self.global_batch_size} must be divisible by "
                f"training.micro_batch_size x data-parallel ranks = {self.micro_batch_size} x "
                f"{data_parallel_ranks} = {per_step}"
            )
        return self.global_batch_size // per_step


@dataclass
class DataConfig:
    """Data: tokenized webdataset shards."""

    train_shards: Optional[str] = None
    """Training shards: path, glob, brace pattern or URL; null = the built-in demo corpus."""
    val_shards: Optional[str] = None
    """Validation shards (held out); null = the built-in corpus' held-out shard."""
    test_shards: Optional[str] = None
    """Held-out shards for `lit-deepseek test` (required by `test`: the validation shards are never reused as a test set)."""
    tokenizer: Optional[str] = None
    """A `tokenizers` JSON file; null = byte-level tokenizer (vocabulary 256 + specials)."""
    cache_dir: Optional[str] = None
    """Where the built-in corpus is written as shards (once); null = `<logging.run_dir>/data`."""
    num_workers: int = 0
    """DataLoader worker processes per rank."""
    document_mask: bool = False
    """Block attention across packed document boundaries."""
    seed: Optional[int] = None
    """Data-order seed; null = training.seed."""


@dataclass
class CheckpointConfig:
    """Checkpointing."""

    dir: str = "checkpoints"
    """Checkpoint folder (relative paths live under logging.run_dir)."""
    every_n_steps: int = 1000
    """Save every this many optimizer steps."""
    keep_last: int = 3
    """Periodic checkpoints to keep (older ones are deleted)."""
    save_last: bool = True
    """Keep a `last.ckpt` for `--ckpt_path last`."""
    save_best: bool = True
    """Keep the best checkpoint by validation loss."""
    monitor: str = "val/loss"
    """Metric for the best checkpoint."""


@dataclass
class LoggingConfig:
    """Experiment tracking."""

    run_dir: str = "runs/default"
    """Run directory: holds the MLflow store and its artifacts, checkpoints, plots and the built-in corpus by default."""
    tracking_uri: Optional[str] = None
    """MLflow tracking URI; null = `<run_dir>/mlflow.db` (SQLite) with artifacts in `<run_dir>/mlartifacts`."""
    experiment_name: str = "lit-deepseek"
    """MLflow experiment."""
    run_name: Optional[str] = None
    """MLflow run name."""
    log_every_n_steps: int = 10
    """Metric logging interval in optimizer steps."""
    heatmap_every_n_steps: int = 500
    """Expert-load heatmap artifact interval (0 disables)."""
    async_logging: bool = True
    """Log to MLflow asynchronously so tracking never stalls a step."""
    peak_tflops: Optional[float] = None
    """Peak dense bf16 TFLOP/s per device for MFU; null = 989 on H100/H200, Lightning's table otherwise."""
    progress_bar: bool = True
    """Show a progress bar."""


@dataclass
class DeepSeekConfig:
    """A whole run: the six sections of a config file."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    # ---------------------------------------------------------------- parameters
    def param_breakdown(self) -> dict[str, int]:
        """Parameter counts by component for the main model and the MTP modules."""
        return _param_breakdown(self.model)

    def total_params(self, include_mtp: bool = False) -> int:
        """All parameters of the main model (MTP modules added when include_mtp)."""
        b = self.param_breakdown()
        return b["main_total"] + (b["mtp_total"] if include_mtp else 0)

    def mtp_params(self) -> int:
        """Parameters of the MTP modules (embedding and head are shared, not counted)."""
        return self.param_breakdown()["mtp_total"]

    def active_params_per_token(self) -> int:
        """Parameters that touch one token in the main model: everything but the
        unselected routed experts (the embedding row lookup is not counted)."""
        return self.param_breakdown()["main_active"]

    def matmul_params_per_token(self) -> int:
        """Active parameters used in matrix multiplies per token (main model and MTP modules):
        the output head counts, the embedding lookup does not."""
        m = self.model
        b = self.param_breakdown()
        n = b["main_active"] - b["norms"]
        if m.mtp_depth:
            d = m.mla.d_model
            block = _block_params(m, moe_layer=m.num_layers > m.first_dense_layers)
            per_module = (2 * d * d + block["attention"] + block["dense_ffn"] + block["shared_experts"]
                          + block["router"] + block["active_routed"] + m.vocab_size * d)
            n += m.mtp_depth * per_module
        return n

    def flops_per_token(self, seq_length: Optional[int] = None) -> float:
        """Training FLOPs per token: 6 x matmul parameters plus causal attention (half of full)."""
        s = seq_length or self.training.seq_length
        a = self.model.mla
        layers = self.model.num_layers + self.model.mtp_depth
        attention = 6 * layers * a.num_heads * (a.qk_head_dim + a.v_head_dim) * s / 2
        return 6 * self.matmul_params_per_token() + attention

    def validate(self, world_size: Optional[int] = None) -> None:
        validate_config(self, world_size)

    # ---------------------------------------------------------------- memory
    def memory_estimate(self, world_size: Optional[int] = None) -> dict[str, float]:
        """Per-GPU memory in GiB: weights, gradients, optimizer states, activations, total."""
        return _memory_estimate(self, world_size)

    def summary(self, world_size: Optional[int] = None) -> str:
        m, p = self.model, self.parallel
        b = self.param_breakdown()
        mem = self.memory_estimate(world_size)
        dp = p.resolved_data_parallel_size(world_size)
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
            f"  TP {p.tensor_parallel_size} x PP {p.pipeline_parallel_size} x EP {p.expert_parallel_size}"
            f" x DP {dp} = {p.total_gpus(world_size)} GPUs, ZeRO-{p.zero_stage}",
            f"Estimated memory per GPU (GiB, {self.training.precision}, micro batch "
            f"{self.training.micro_batch_size} x {self.training.seq_length}, "
            f"checkpointing {self.training.activation_checkpointing})",
        ]
        for k in ("weights", "gradients", "optimizer", "activations", "total"):
            lines.append(f"  {k:<16} {mem[k]:.1f}")
        return "\n".join(lines)

    def print_summary(self, world_size: Optional[int] = None) -> None:
        print(self.summary(world_size))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def data_cache_dir(self) -> str:
        """Folder of the built-in corpus: data.cache_dir, or `<logging.run_dir>/data` when unset."""
        return self.data.cache_dir or str(Path(self.logging.run_dir) / "data")


def _fmt(n: float) -> str:
    if n >= 1e9:
        return f"{n / 1e9:8.2f}B"
    if n >= 1e6:
        return f"{n / 1e6:8.2f}M"
    return f"{n / 1e3:8.2f}K"


# --------------------------------------------------------------------------------------------
# Parameter counting
# --------------------------------------------------------------------------------------------


def _attention_params(mla: MLAConfig) -> int:
    d, h = mla.d_model, mla.num_heads
    if mla.d_q_latent > 0:
        q = d * mla.d_q_latent + mla.d_q_latent + mla.d_q_latent * h * mla.qk_head_dim
    else:
        q = d * h * mla.qk_head_dim
    kv = d * (mla.d_latent + mla.qk_rope_head_dim) + mla.d_latent
    kv += mla.d_latent * h * (mla.qk_nope_head_dim + mla.v_head_dim)
    out = h * mla.v_head_dim * d
    return q + kv + out


def _block_params(m: ModelConfig, moe_layer: bool) -> dict[str, int]:
    d = m.mla.d_model
    per_expert = 3 * d * m.moe.expert_intermediate_size
    out = {"attention": _attention_params(m.mla), "norms": 2 * d, "dense_ffn": 0,
           "shared_experts": 0, "routed_experts": 0, "router": 0, "active_routed": 0}
    if moe_layer:
        out["shared_experts"] = m.moe.num_shared_experts * per_expert
        out["routed_experts"] = m.moe.num_experts * per_expert
        out["router"] = m.moe.num_experts * d + m.moe.num_experts  # weight + bias buffer
        out["active_routed"] = m.moe.num_experts_per_token * per_expert
    else:
        out["dense_ffn"] = 3 * d * m.dense_intermediate_size
    return out


def _param_breakdown(m: ModelConfig) -> dict[str, int]:
    d, v = m.mla.d_model, m.vocab_size
    keys = ("attention", "norms", "dense_ffn", "shared_experts", "routed_experts", "router", "active_routed")
    acc = dict.fromkeys(keys, 0)
    for i in range(m.num_layers):
        for k, n in _block_params(m, i >= m.first_dense_layers).items():
            acc[k] += n
    embedding = v * d
    head = 0 if m.tie_word_embeddings else v * d
    norms = acc["norms"] + d  # final norm
    main_total = (embedding + head + norms + acc["attention"] + acc["dense_ffn"]
                  + acc["shared_experts"] + acc["routed_experts"] + acc["router"])
    main_active = main_total - embedding - acc["routed_experts"] + acc["active_routed"]
    mtp_total = 0
    if m.mtp_depth:
        block = _block_params(m, moe_layer=m.num_layers > m.first_dense_layers)
        per_module = (2 * d + 2 * d * d + d  # enorm, hnorm, eh_proj, final norm of the module
                      + sum(n for k, n in block.items() if k != "active_routed"))
        mtp_total = m.mtp_depth * per_module
    return {
        "embedding": embedding, "head": head, "norms": norms, "attention": acc["attention"],
        "dense_ffn": acc["dense_ffn"], "shared_experts": acc["shared_experts"],
        "routed_experts": acc["routed_experts"], "router": acc["router"],
        "main_total": main_total, "main_active": main_active, "mtp_total": mtp_total,
    }


# --------------------------------------------------------------------------------------------
# Memory estimate
# --------------------------------------------------------------------------------------------

_GIB = 1024**3


def _memory_estimate(cfg: DeepSeekConfig, world_size: Optional[int]) -> dict[str, float]:
    m, p, t = cfg.model, cfg.parallel, cfg.training
    b = _param_breakdown(m)
    tp, pp, ep = p.tensor_parallel_size, p.pipeline_parallel_size, p.expert_parallel_size
    dp = p.resolved_data_parallel_size(world_size)
    experts = b["routed_experts"] + (b["mtp_total"] and _block_params(m, True)["routed_experts"] * m.mtp_depth)
    dense = b["main_total"] + b["mtp_total"] - experts
    # Per GPU: dense weights split by TP and stages; experts by EP and stages.
    dense_local = dense / (tp * pp)
    expert_local = experts / (ep * pp)
    master_bytes = 2 if t.precision == "bf16-true" else 4
    dense_dp, expert_dp = dp * ep, dp  # replicas that ZeRO shards over
    weights = (dense_local / (dense_dp if p.zero_stage >= 3 else 1)
               + expert_local / (expert_dp if p.zero_stage >= 3 else 1)) * master_bytes
    grads = (dense_local / (dense_dp if p.zero_stage >= 2 else 1)
             + expert_local / (expert_dp if p.zero_stage >= 2 else 1)) * master_bytes
    optimizer = (dense_local / (dense_dp if p.zero_stage >= 1 else 1)
                 + expert_local / (expert_dp if p.zero_stage >= 1 else 1)) * 2 * master_bytes
    activations = _activation_bytes(cfg) / tp
    total = weights + grads + optimizer + activations
    return {k: v / _GIB for k, v in dict(weights=weights, gradients=grads, optimizer=optimizer,
                                         activations=activations, total=total).items()}


def _activation_bytes(cfg: DeepSeekConfig) -> float:
    """Bytes kept for backward by one micro-batch on one pipeline stage, plus the loss's buffers.

    Counts the tensors the eager training path saves per token (measured against an H200 run of
    benchmarks/bench_train.py: within +10% of the peak for the small config at 4096 and 8192): each
    RMSNorm keeps its float32 copy, the normed value and its output; attention keeps the projected
    queries, the latents, the decompressed keys/values, the concatenated q and k, the output and the
    log-sum-exp; an MoE layer keeps the router's float32 input, the k sorted copies and their
    weighted outputs, and four SwiGLU tensors (gate, up, silu, product) per routed copy and per
    shared expert. A torch.compile'd model keeps about a quarter less (pointwise ops recomputed).
    """
    m, t, p = cfg.model, cfg.training, cfg.parallel
    a, e = m.mla, m.moe
    tokens = t.micro_batch_size * t.seq_length
    act = 4 if t.precision == "32-true" else 2
    f32 = 4
    d, h, k = a.d_model, a.num_heads, e.num_experts_per_token

    def norm(width: int) -> int:
        return width * (f32 + 2 * act)

    attn = (norm(d) + (norm(a.d_q_latent) if a.d_q_latent > 0 else 0) + act * h * a.qk_head_dim
            + norm(a.d_latent) + act * (a.d_latent + a.qk_rope_head_dim)
            + act * h * (a.qk_nope_head_dim + a.v_head_dim)
            + 2 * act * h * a.qk_head_dim + act * h * a.v_head_dim + f32 * h)
    routed = 4 * act * k * e.expert_intermediate_size
    shared = 4 * act * e.num_shared_experts * e.expert_intermediate_size
    moe_layer = norm(d) + f32 * d + 2 * act * k * d + routed + shared + 3 * f32 * e.num_experts
    dense_layer = norm(d) + 4 * act * m.dense_intermediate_size
    layers = m.num_layers + m.mtp_depth
    per_stage_layers = math.ceil(layers / p.pipeline_parallel_size)
    n_dense = min(m.first_dense_layers, per_stage_layers)
    n_moe = per_stage_layers - n_dense
    # MTP: two input norms and the concatenation; final norm and the fused loss's hidden-state gradient
    mtp_extra = m.mtp_depth * (3 * norm(d) + 2 * act * d) if p.pipeline_parallel_size == 1 else 0
    outside = norm(d) + act * d
    per_token = attn * per_stage_layers + moe_layer * n_moe + dense_layer * n_dense + mtp_extra + outside
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
# Validation
# --------------------------------------------------------------------------------------------


def validate_config(cfg: DeepSeekConfig, world_size: Optional[int] = None, hardware: bool = True) -> None:
    """Raise ConfigError (one line: field and rule) for the first impossible setting.

    `hardware=False` skips the checks against this machine's devices (FP8 support), for planning elsewhere."""
    m, a, e, p, t = cfg.model, cfg.model.mla, cfg.model.moe, cfg.parallel, cfg.training

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(msg)

    for name, value in (("model.vocab_size", m.vocab_size), ("model.num_layers", m.num_layers),
                        ("model.mla.d_model", a.d_model), ("model.mla.d_latent", a.d_latent),
                        ("model.mla.num_heads", a.num_heads), ("model.moe.num_experts", e.num_experts),
                        ("model.moe.num_experts_per_token", e.num_experts_per_token),
                        ("training.micro_batch_size", t.micro_batch_size),
                        ("training.global_batch_size", t.global_batch_size),
                        ("training.seq_length", t.seq_length)):
        need(value > 0, f"{name}: must be positive, got {value}")
    need(a.d_latent <= a.d_model,
         f"model.mla.d_latent: {a.d_latent} must not exceed model.mla.d_model ({a.d_model})")
    need(a.d_q_latent >= 0, f"model.mla.d_q_latent: must be >= 0 (0 = no query compression), got {a.d_q_latent}")
    need(a.qk_rope_head_dim % 2 == 0, f"model.mla.qk_rope_head_dim: must be even, got {a.qk_rope_head_dim}")
    need(0 <= m.first_dense_layers <= m.num_layers,
         f"model.first_dense_layers: must be between 0 and model.num_layers ({m.num_layers}), got {m.first_dense_layers}")
    need(m.mtp_depth >= 0, f"model.mtp_depth: must be >= 0, got {m.mtp_depth}")
    need(e.num_experts_per_token <= e.num_experts,
         f"model.moe.num_experts_per_token: top-k {e.num_experts_per_token} exceeds model.moe.num_experts ({e.num_experts})")
    need(e.num_expert_groups >= 1 and e.num_experts % e.num_expert_groups == 0,
         f"model.moe.num_expert_groups: {e.num_expert_groups} must divide model.moe.num_experts ({e.num_experts})")
    need(1 <= e.num_limited_groups <= e.num_expert_groups,
         f"model.moe.num_limited_groups: {e.num_limited_groups} must be between 1 and "
         f"model.moe.num_expert_groups ({e.num_expert_groups})")
    if e.num_expert_groups > 1:
        per_group = e.num_experts // e.num_expert_groups
        need(per_group >= 2, f"model.moe.num_expert_groups: each group needs >= 2 experts (group score = top-2 sum), got {per_group}")
        need(e.num_experts_per_token <= e.num_limited_groups * per_group,
             f"model.moe.num_experts_per_token: top-k {e.num_experts_per_token} exceeds the experts in "
             f"num_limited_groups ({e.num_limited_groups} x {per_group})")
    need(e.capacity_factor is None or e.capacity_factor > 0,
         f"model.moe.capacity_factor: must be > 0 or null (dropless), got {e.capacity_factor}")
    need(a.rope_factor >= 1.0, f"model.mla.rope_factor: must be >= 1 (1 = no YaRN), got {a.rope_factor}")
    if a.rope_factor > 1.0:
        need(a.max_context_length <= a.rope_original_context_length * a.rope_factor,
             f"model.mla.max_context_length: {a.max_context_length} exceeds rope_original_context_length x "
             f"rope_factor = {a.rope_original_context_length} x {a.rope_factor:g}")
    need(t.seq_length <= a.max_context_length,
         f"training.seq_length: {t.seq_length} exceeds model.mla.max_context_length ({a.max_context_length})")
    need(t.global_batch_size % t.micro_batch_size == 0,
         f"training.global_batch_size: {t.global_batch_size} must be divisible by training.micro_batch_size "
         f"({t.micro_batch_size})")
    need(t.lr_warmup_steps >= 0, f"training.lr_warmup_steps: must be >= 0, got {t.lr_warmup_steps}")
    need(t.min_learning_rate <= t.learning_rate,
         f"training.min_learning_rate: {t.min_learning_rate} must not exceed training.learning_rate ({t.learning_rate})")
    need(t.grad_clip >= 0, f"training.grad_clip: must be >= 0 (0 disables), got {t.grad_clip}")

    for name in ("tensor_parallel_size", "pipeline_parallel_size", "expert_parallel_size", "virtual_pipeline_stages"):
        value = getattr(p, name)
        need(value >= 1, f"parallel.{name}: must be >= 1, got {value}")
    need(p.data_parallel_size == -1 or p.data_parallel_size >= 1,
         f"parallel.data_parallel_size: must be >= 1 or -1 (auto), got {p.data_parallel_size}")
    tp, pp, ep, vpp = p.tensor_parallel_size, p.pipeline_parallel_size, p.expert_parallel_size, p.virtual_pipeline_stages
    need(a.num_heads % tp == 0,
         f"parallel.tensor_parallel_size: model.mla.num_heads ({a.num_heads}) must be divisible by TP ({tp})")
    if tp > 1 and p.sequence_parallel:
        need(t.seq_length % tp == 0, f"training.seq_length: {t.seq_length} must be divisible by TP ({tp}) under "
                                     f"parallel.sequence_parallel")
    need(e.num_experts % ep == 0,
         f"parallel.expert_parallel_size: model.moe.num_experts ({e.num_experts}) must be divisible by EP ({ep})")
    if p.pipeline_schedule in ("zbv", "dualpipev"):
        need(vpp == 2, f"parallel.virtual_pipeline_stages: schedule {p.pipeline_schedule} needs exactly 2 stages per rank, got {vpp}")
    if p.pipeline_schedule == "interleaved_1f1b":
        need(vpp >= 2, f"parallel.virtual_pipeline_stages: interleaved_1f1b needs >= 2 stages per rank, got {vpp}")
    if p.pipeline_schedule in ("1f1b", "gpipe"):
        need(vpp == 1, f"parallel.virtual_pipeline_stages: schedule {p.pipeline_schedule} takes 1 stage per rank, got {vpp}")
    stages = pp * vpp
    if p.pipeline_layer_split is not None:
        need(len(p.pipeline_layer_split) == stages,
             f"parallel.pipeline_layer_split: needs {stages} entries (PP x virtual stages), got {len(p.pipeline_layer_split)}")
        need(sum(p.pipeline_layer_split) == m.num_layers and min(p.pipeline_layer_split) >= 0,
             f"parallel.pipeline_layer_split: entries must be >= 0 and sum to model.num_layers ({m.num_layers})")
    elif pp > 1:
        need(m.num_layers >= stages,
             f"parallel.pipeline_parallel_size: model.num_layers ({m.num_layers}) is fewer than PP x virtual stages ({stages})")
        need(m.num_layers % stages == 0,
             f"parallel.pipeline_parallel_size: model.num_layers ({m.num_layers}) must be divisible by PP x virtual "
             f"stages ({stages}), or set parallel.pipeline_layer_split")
    if world_size is not None:
        mp = p.model_parallel_size()
        if p.data_parallel_size == -1:
            need(world_size % mp == 0,
                 f"parallel: world size {world_size} is not divisible by TP x PP x EP = {tp} x {pp} x {ep} = {mp}")
        else:
            total = p.total_gpus()
            need(total == world_size,
                 f"parallel: TP x PP x EP x DP = {tp} x {pp} x {ep} x {p.data_parallel_size} = {total} "
                 f"but the world size is {world_size} (trainer.devices x trainer.num_nodes)")
        dp = p.resolved_data_parallel_size(world_size)
        t.gradient_accumulation(dp * ep)
        if pp > 1 and p.pipeline_schedule != "gpipe":
            n_micro = t.gradient_accumulation(dp * ep)
            need(n_micro >= pp, f"training.global_batch_size: pipeline schedule {p.pipeline_schedule} needs at least "
                                f"PP ({pp}) micro-batches per step on each data-parallel rank, got {n_micro}")
            if p.pipeline_schedule == "interleaved_1f1b":
                need(n_micro % pp == 0, f"training.global_batch_size: interleaved_1f1b needs the micro-batch count "
                                        f"({n_micro}) to be a multiple of PP ({pp})")
    if t.use_fp8 and hardware:
        _check_fp8_available()


def _check_fp8_available() -> None:
    import torch

    if not torch.cuda.is_available():
        raise ConfigError("training.use_fp8: FP8 training needs a CUDA GPU with compute capability >= 8.9; none is available")
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 9):
        raise ConfigError(f"training.use_fp8: FP8 training needs compute capability >= 8.9, this GPU has {major}.{minor}")


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

SECTIONS = {"model": ModelConfig, "parallel": ParallelConfig, "training": TrainingConfig,
            "data": DataConfig, "checkpoint": CheckpointConfig, "logging": LoggingConfig}


def deep_merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def read_yaml(path: Union[str, os.PathLike]) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config: file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config: {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config: {path} must hold a mapping of sections, got {type(data).__name__}")
    return data


def load_config(*paths: Union[str, os.PathLike], overrides: Optional[dict] = None,
                validate: bool = True, world_size: Optional[int] = None, hardware: bool = True) -> DeepSeekConfig:
    """Load one or more YAML files (later ones override earlier ones), then dotted overrides.

    `hardware=False` validates without checking this machine's devices (for `summary` and `plan`)."""
    data: dict = {}
    for path in paths:
        data = deep_merge(data, read_yaml(path))
    for key, value in (overrides or {}).items():
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    data.pop("trainer", None)  # Lightning's own section, handled by the CLI
    cfg = from_dict(data)
    if validate:
        validate_config(cfg, world_size, hardware=hardware)
    return cfg


def from_dict(data: dict) -> DeepSeekConfig:
    """Build a DeepSeekConfig from nested dicts, rejecting unknown keys and wrong types."""
    return _build(DeepSeekConfig, data, "")


def _build(cls: type, data: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "config"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise ConfigError(f"{prefix}{key}: unknown key (known: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(hints[k], v, f"{prefix}{k}") for k, v in data.items()}
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, name: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value if value is not None else {}, name + ".")
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, name)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{name}: invalid value {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{name}: must be one of {', '.join(repr(a) for a in args)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        return [_coerce(args[0], v, f"{name}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return value
    return value


def field_docs(cls: type) -> dict[str, str]:
    """Field docstrings (the string literal under each field) of a config dataclass."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, nxt in zip(body, body[1:], strict=False):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant):
            docs[node.target.id] = str(nxt.value.value)  # type: ignore[union-attr]
    return docs


if __name__ == "__main__":  # pragma: no cover
    load_config(*sys.argv[1:]).print_summary()
