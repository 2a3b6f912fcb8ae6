"""Typed configuration: one dataclass per YAML section, loading and validation.

The YAML layout is::

    model: {<architecture fields>, mla: {...}, moe: {...}}
    parallel: {...}
    training: {...}
    data: {...}
    checkpoint: {...}
    logging: {...}

Every field's docstring (the string literal under it) becomes its help text in the CLI. Values are
typed by jsonargparse (the CLI's parser too); the layout rules that join sections (and the world
size) live in `lit_deepseek.parallel.layout`, the parameter / FLOP / memory estimates in
`lit_deepseek.estimates`: the methods below that reach them are one-line delegations.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from lit_deepseek import estimates

if typing.TYPE_CHECKING:
    from lit_deepseek.parallel.layout import Layout


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
    """Store the decoding latent cache in FP8 e4m3 with per-token scales (half the memory; decoding only)."""
    max_context_length: int = 8192
    """Maximum sequence length the rotary tables are built for (YaRN stretches the original context to it)."""
    use_flash_mla: bool = False
    """Decode through FlashMLA when installed (Hopper, bf16 cache); otherwise our Triton kernel, with one warning."""
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

    def total_gpus(self, world_size: Optional[int] = None) -> int:
        """TP x PP x EP x DP (DP = -1 resolved against world_size when given, else 1)."""
        from lit_deepseek.parallel.layout import layout_degrees

        return math.prod(layout_degrees(self, world_size))


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
    """FP8 training of linear layers and experts (Hopper GPU; on CPU its float32 emulation)."""
    fp8_recipe: Literal["blockwise", "rowwise"] = "blockwise"
    """FP8 scaling: blockwise = DeepSeek-V3's 1x128 activation and gradient tiles and 128x128 weight blocks (Hopper);
    rowwise = one scale per row of each operand (compute capability >= 8.9)."""
    fp8_expert_wgrad: Literal["bf16", "fp8"] = "bf16"
    """Routed experts' weight-gradient products under the blockwise recipe: bf16 = torch's grouped GEMM on the
    unquantized input and output gradient (as the row-wise recipe always does; faster, see the README);
    fp8 = DeepSeek-V3's 1x128 tiles along the tokens for both operands (a Triton kernel; warns on CUDA, see the
    README). Forward and input-gradient products stay FP8 either way."""
    fp8_exclude: list[str] = field(default_factory=lambda: ["embed", "head", "gate"])
    """Modules kept in BF16 under use_fp8 (names or glob patterns; default embedding, output head, MoE router)."""
    precision: Literal["bf16-mixed", "32-true", "bf16-true", "16-mixed"] = "bf16-mixed"
    """Lightning precision plugin."""
    activation_checkpointing: Literal["none", "full", "selective"] = "none"
    """Recompute activations per block: none, full blocks, or selective (MoE experts only)."""
    compile: bool = False
    """Regional torch.compile of each transformer block (fuses norms, RoPE, SwiGLU, routing; GPU speed lever)."""
    cuda_graphs: bool = True
    """One process on a GPU: after two eager steps, replay each micro-batch's forward + backward as a CUDA graph
    (removes the host's launch time); with activation checkpointing, expert capacity, 16-mixed or 32-true, steps run eagerly."""
    bf16_weight_copy: bool = True
    """One process under bf16-mixed with gradient accumulation: cast the matmul weights to a bf16 working copy once per
    optimizer step instead of once per micro-batch (gradients still accumulate in float32 on the masters; same numbers
    as autocast's casts)."""
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
    sample_prompts: Optional[list[str]] = None
    """Prompts to continue (greedy) after each validation, logged to MLflow as text artifacts; null = off."""
    sample_max_new_tokens: int = 48
    """New tokens per sample prompt."""


@dataclass
class DeepSeekConfig:
    """A whole run: the six sections of a config file."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    # one-line delegations: the estimates live in lit_deepseek.estimates
    def param_breakdown(self) -> dict[str, int]:
        """Parameter counts by component for the main model and the MTP modules."""
        return estimates.param_breakdown(self.model)

    def total_params(self, include_mtp: bool = False) -> int:
        """All parameters of the main model (MTP modules added when include_mtp)."""
        return estimates.total_params(self.model, include_mtp)

    def mtp_params(self) -> int:
        """Parameters of the MTP modules (embedding and head are shared, not counted)."""
        return estimates.param_breakdown(self.model)["mtp_total"]

    def active_params_per_token(self) -> int:
        """Parameters that touch one token in the main model (no embedding lookup, selected experts only)."""
        return estimates.param_breakdown(self.model)["main_active"]

    def flops_per_token(self, seq_length: Optional[int] = None) -> float:
        """Training FLOPs per token: 6 x matmul parameters plus causal attention (half of full)."""
        return estimates.flops_per_token(self, seq_length)

    def memory_estimate(self, world_size: Optional[int] = None) -> dict[str, float]:
        """Per-GPU memory in GiB: weights, gradients, optimizer states, activations, total."""
        return estimates.memory_estimate(self, world_size)

    def summary(self, world_size: Optional[int] = None) -> str:
        return estimates.summary(self, world_size)

    def print_summary(self, world_size: Optional[int] = None) -> None:
        print(self.summary(world_size))

    def validate(self, world_size: Optional[int] = None) -> Layout:
        return validate_config(self, world_size)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def data_cache_dir(self) -> str:
        """Folder of the built-in corpus: data.cache_dir, or `<logging.run_dir>/data` when unset."""
        return self.data.cache_dir or str(Path(self.logging.run_dir) / "data")


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


# Domain of every numeric (and required string) field: dotted name -> (predicate, rule shown to the
# user). Checked first by `validate_config`, so a bad value is reported against its own field before
# any rule that relates two fields. Optional fields (None allowed) are only checked when set.
def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _gt(lo: float) -> Any:
    return lambda v: _finite(v) and v > lo


def _ge(lo: float) -> Any:
    return lambda v: _finite(v) and v >= lo


def _in(lo: float, hi: float, hi_open: bool = False) -> Any:
    return lambda v: _finite(v) and lo <= v and (v < hi if hi_open else v <= hi)


_POS, _NONNEG = (_gt(0), "must be a positive number"), (_ge(0), "must be a finite number >= 0")
_SEED = (lambda v: isinstance(v, int) and 0 <= v < 2**32, "must be an integer in [0, 2**32)")
_NONEMPTY = (lambda v: isinstance(v, str) and v.strip() != "", "must not be empty")
FIELD_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "model.vocab_size": _POS, "model.num_layers": _POS, "model.first_dense_layers": _NONNEG,
    "model.dense_intermediate_size": _POS, "model.mtp_depth": _NONNEG, "model.mtp_loss_weight": _NONNEG,
    "model.init_std": _POS, "model.rms_norm_eps": _POS,
    "model.mla.d_model": _POS, "model.mla.d_latent": _POS, "model.mla.d_q_latent": _NONNEG,
    "model.mla.num_heads": _POS, "model.mla.qk_nope_head_dim": _POS, "model.mla.qk_rope_head_dim": _POS,
    "model.mla.v_head_dim": _POS, "model.mla.max_context_length": _POS, "model.mla.rope_theta": _POS,
    "model.mla.rope_factor": (_ge(1), "must be a finite number >= 1 (1 = no YaRN)"),
    "model.mla.rope_original_context_length": _POS, "model.mla.rope_beta_fast": _POS,
    "model.mla.rope_beta_slow": _POS, "model.mla.rope_mscale": _NONNEG, "model.mla.rope_mscale_all_dim": _NONNEG,
    "model.moe.num_experts": _POS, "model.moe.num_experts_per_token": _POS,
    "model.moe.expert_intermediate_size": _POS, "model.moe.num_shared_experts": _NONNEG,
    "model.moe.num_expert_groups": _POS, "model.moe.num_limited_groups": _POS, "model.moe.route_scale": _POS,
    "model.moe.bias_update_speed": _NONNEG, "model.moe.capacity_factor": (_gt(0), "must be a positive number or null (dropless)"),
    "model.moe.router_aux_loss_weight": _NONNEG,
    "training.global_batch_size": _POS, "training.micro_batch_size": _POS, "training.learning_rate": _POS,
    "training.min_learning_rate": _NONNEG, "training.lr_warmup_steps": _NONNEG,
    "training.lr_decay_fraction": (_in(0, 1), "must be in [0, 1]"), "training.max_steps": _POS,
    "training.grad_clip": (_ge(0), "must be a finite number >= 0 (0 disables)"), "training.weight_decay": _NONNEG,
    "training.adam_beta1": (_in(0, 1, hi_open=True), "must be in [0, 1)"),
    "training.adam_beta2": (_in(0, 1, hi_open=True), "must be in [0, 1)"), "training.adam_eps": _POS,
    "training.seq_length": _POS, "training.seed": _SEED, "training.loss_chunk_size": _POS,
    "training.max_nonfinite_steps": _POS, "training.val_every_n_steps": _POS,
    "training.val_batches": (_ge(0), "must be >= 0 (0 disables validation)"),
    "data.cache_dir": _NONEMPTY, "data.num_workers": _NONNEG, "data.seed": _SEED,
    "checkpoint.dir": _NONEMPTY, "checkpoint.every_n_steps": _POS,
    "checkpoint.keep_last": (lambda v: isinstance(v, int) and (v >= 1 or v == -1), "must be >= 1, or -1 to keep all"),
    "checkpoint.monitor": _NONEMPTY,
    "logging.run_dir": _NONEMPTY, "logging.experiment_name": _NONEMPTY, "logging.log_every_n_steps": _POS,
    "logging.heatmap_every_n_steps": (_ge(0), "must be >= 0 (0 disables)"), "logging.peak_tflops": _POS,
    "logging.sample_max_new_tokens": _POS,
}


def check_field_domains(cfg: DeepSeekConfig) -> None:
    """ConfigError naming the first field outside its domain (FIELD_RULES)."""
    for name, (ok, rule) in FIELD_RULES.items():
        value: Any = cfg
        for part in name.split("."):
            value = getattr(value, part)
        if value is None and name in _OPTIONAL_FIELDS:
            continue
        if not ok(value):
            raise ConfigError(f"{name}: {rule}, got {value!r}")


_OPTIONAL_FIELDS = ("model.moe.capacity_factor", "data.seed", "data.cache_dir", "logging.peak_tflops")

# An allocation larger than this share of the memory it lands in is refused before anything starts.
_FIT_SHARE = 1.0


def check_fits(cfg: DeepSeekConfig, world_size: Optional[int] = None, device_bytes: Optional[int] = None) -> None:
    """ConfigError when the memory estimate per device (weights, optimizer, activations, rotary tables)
    exceeds `device_bytes` (default: one GPU's memory when CUDA is available, else the host's RAM)."""
    if device_bytes is None:
        device_bytes = _device_bytes()
    if not device_bytes:
        return
    gib = 1024**3
    est = cfg.memory_estimate(world_size)
    a = cfg.model.mla
    rope = 2 * a.max_context_length * a.qk_rope_head_dim * 4 / gib  # cos and sin tables, float32
    need = est["total"] + rope
    if need > _FIT_SHARE * device_bytes / gib:
        b = cfg.param_breakdown()
        owner = {"routed_experts": "model.moe.num_experts", "embedding": "model.vocab_size", "head": "model.vocab_size",
                 "attention": "model.mla.d_model", "dense_ffn": "model.dense_intermediate_size",
                 "shared_experts": "model.moe.num_shared_experts", "router": "model.moe.num_experts"}
        weights = max(owner, key=lambda k: b.get(k, 0))
        parts = {owner[weights]: need - est["activations"] - rope, "training.seq_length": est["activations"],
                 "model.mla.max_context_length": rope}
        biggest = max(parts, key=lambda k: parts[k])
        raise ConfigError(
            f"{biggest}: the run needs an estimated {need:,.1f} GiB per device (weights {est['weights']:.1f}, "
            f"optimizer {est['optimizer']:.1f}, activations {est['activations']:.1f}, rotary tables {rope:.1f}) but "
            f"the device has {device_bytes / gib:,.1f} GiB; shrink the model or batch, or add devices")


def _device_bytes() -> int:
    try:
        import torch

        if torch.cuda.is_available():
            return int(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)
    except Exception:  # noqa: BLE001 - no usable GPU: fall back to host memory
        pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 0


def validate_config(cfg: DeepSeekConfig, world_size: Optional[int] = None) -> Layout:
    """Raise ConfigError (one line: field and rule) for the first impossible setting; returns the
    resolved layout (see `lit_deepseek.parallel.layout.resolve_layout`; without a world size,
    DP = -1 counts as 1 and the world-size rules are skipped)."""
    m, a, e, p, t = cfg.model, cfg.model.mla, cfg.model.moe, cfg.parallel, cfg.training

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(msg)

    check_field_domains(cfg)

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
    need(t.lr_warmup_steps >= 0, f"training.lr_warmup_steps: must be >= 0, got {t.lr_warmup_steps}")
    need(t.min_learning_rate <= t.learning_rate,
         f"training.min_learning_rate: {t.min_learning_rate} must not exceed training.learning_rate ({t.learning_rate})")
    need(cfg.logging.sample_max_new_tokens >= 1,
         f"logging.sample_max_new_tokens: must be >= 1, got {cfg.logging.sample_max_new_tokens}")
    if cfg.logging.sample_prompts:
        need(all(isinstance(p, str) and p for p in cfg.logging.sample_prompts),
             "logging.sample_prompts: every prompt must be a non-empty string")
    need(t.grad_clip >= 0, f"training.grad_clip: must be >= 0 (0 disables), got {t.grad_clip}")

    for name in ("tensor_parallel_size", "pipeline_parallel_size", "expert_parallel_size", "virtual_pipeline_stages"):
        value = getattr(p, name)
        need(value >= 1, f"parallel.{name}: must be >= 1, got {value}")
    need(p.data_parallel_size == -1 or p.data_parallel_size >= 1,
         f"parallel.data_parallel_size: must be >= 1 or -1 (auto), got {p.data_parallel_size}")
    need(t.fp8_recipe in ("blockwise", "rowwise"),
         f"training.fp8_recipe: must be blockwise or rowwise, got {t.fp8_recipe!r}")
    need(t.fp8_expert_wgrad in ("bf16", "fp8"),
         f"training.fp8_expert_wgrad: must be bf16 or fp8, got {t.fp8_expert_wgrad!r}")
    need(isinstance(t.fp8_exclude, (list, tuple)) and all(isinstance(p, str) and p.strip() == p and p
                                                         for p in t.fp8_exclude),
         f"training.fp8_exclude: must be a list of module names or glob patterns (non-empty, no surrounding spaces), "
         f"got {t.fp8_exclude!r}")
    from lit_deepseek.parallel.layout import resolve_layout

    return resolve_layout(cfg, world_size)  # the rules that join sections and the world size


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
    if path.is_dir():
        raise ConfigError(f"config: {path} is a directory, not a YAML file")
    if not path.is_file():
        raise ConfigError(f"config: file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"config: {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config: {path} cannot be read: {exc}") from None
    if data is None:
        raise ConfigError(f"config: {path} is empty (expected sections: {', '.join(SECTIONS)})")
    if not isinstance(data, dict):
        raise ConfigError(f"config: {path} must hold a mapping of sections, got {type(data).__name__}")
    return data


def dotted_overrides(args: list[str]) -> dict[str, Any]:
    """`--key.path value` pairs of a tool's command line as {key.path: YAML value} for `load_config`."""
    overrides: dict[str, Any] = {}
    it = iter(args)
    for key in it:
        if not key.startswith("--"):
            raise ConfigError(f"unexpected argument {key!r}: overrides are --key.path value pairs")
        overrides[key[2:]] = yaml.safe_load(next(it, "null"))
    return overrides


def load_config(*paths: Union[str, os.PathLike], overrides: Optional[dict] = None,
                validate: bool = True, world_size: Optional[int] = None) -> DeepSeekConfig:
    """Load one or more YAML files (later ones override earlier ones), then dotted overrides."""
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
        cfg.validate(world_size)
    return cfg


def from_dict(data: dict) -> DeepSeekConfig:
    """Build a DeepSeekConfig from nested dicts; jsonargparse checks keys and types (as in the CLI)."""
    from jsonargparse import ArgumentParser

    if not isinstance(data, dict):
        raise ConfigError(f"config: expected a mapping of sections, got {type(data).__name__}")
    for key in data:
        if key not in SECTIONS:
            raise ConfigError(f"{key}: unknown section (known: {', '.join(SECTIONS)})")
    parser = ArgumentParser(exit_on_error=False)
    for name, cls in SECTIONS.items():
        parser.add_class_arguments(cls, name)
    try:
        ns = parser.parse_object(data)
    except Exception as exc:  # jsonargparse's ArgumentError and its subclasses
        raise ConfigError(_one_line(str(exc))) from None
    return _instantiate(DeepSeekConfig, ns.as_dict())


def _instantiate(cls: type, values: dict) -> Any:
    """A (nested) config dataclass from values jsonargparse has already checked."""
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in values:
            value = values[f.name]
            nested = typing.get_type_hints(cls)[f.name]
            kwargs[f.name] = _instantiate(nested, value or {}) if dataclasses.is_dataclass(nested) else value
    return cls(**kwargs)


def _one_line(message: str) -> str:
    """jsonargparse's report as one line: 'section.key: rule'."""
    import re

    unknown = re.search(r"Group '([\w.]+)' does not accept (?:nested key|option)s? '([\w.]+)'", message)
    if unknown:
        return f"{unknown.group(1)}.{unknown.group(2)}: unknown key"
    lines = [line.strip(" -") for line in message.splitlines() if line.strip()]
    key = re.search(r'Parser key "([\w.]+)"', message)
    if not key:
        return " ".join(lines)
    reason = next((line for line in lines[1:] if line.startswith("Expected")), lines[1] if len(lines) > 1 else "invalid")
    reason = re.sub(r"<class '(\w+)'>", r"\1", reason).replace("Expected a ", "expected ")
    return f"{key.group(1)}: {reason}"


if __name__ == "__main__":  # pragma: no cover
    load_config(*sys.argv[1:]).print_summary()
