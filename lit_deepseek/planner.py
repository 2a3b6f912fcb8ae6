"""Layout planner: which TP x PP x EP x DP layouts fit a GPU count and memory, fastest first.

Every candidate is the config with its ``parallel`` layout, ZeRO stage, activation checkpointing and
micro-batch size replaced; it must pass the same validation as `fit` and is sized by the same
estimates as `summary` (`DeepSeekConfig.memory_estimate`, `DeepSeekConfig.flops_per_token`). A
layout fits when its estimated memory per GPU stays within `USABLE_FRACTION` of the device memory
(the rest is the CUDA context, communication buffers and allocator fragmentation).

The step time is a first-order model, good for ranking layouts, not a promise:

- compute: training FLOPs of the global batch (plus recomputation under activation checkpointing)
  spread over all GPUs at `MATMUL_EFFICIENCY` of the peak (``logging.peak_tflops``, else 989 TFLOP/s),
  stretched by the pipeline bubble ``(PP - 1) / micro-batches`` of 1F1B;
- tensor parallelism: four activation all-reduces per layer and micro-batch (forward and backward);
- expert parallelism: dispatch and combine all-to-alls per MoE layer and micro-batch, forward and backward;
- data parallelism: one gradient reduction per step (half hidden under ``overlap_grad_reduce``);
  ZeRO-3 also gathers the parameters for every micro-batch's forward and backward.

Groups that stay inside a node (``gpus_per_node``, mesh order pp, dp, ep, tp with tp innermost)
use `NVLINK_GBPS`; groups that span nodes use `NETWORK_GBPS` per GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import re
from dataclasses import dataclass
from typing import Optional

from lit_deepseek.config import ConfigError, DeepSeekConfig, dotted_overrides, validate_config

USABLE_FRACTION = 0.9
"""Share of a GPU's memory the estimate may fill."""
MATMUL_EFFICIENCY = 0.45
"""Assumed share of the peak the training step reaches in its matrix multiplies."""
DEFAULT_PEAK_TFLOPS = 989.0
"""Dense bf16 peak of H100/H200 (the default of logging.peak_tflops)."""
NVLINK_GBPS = 450.0
"""Per-GPU bandwidth inside a node (GB/s, NVLink 4 one way)."""
NETWORK_GBPS = 50.0
"""Per-GPU bandwidth across nodes (GB/s, one 400 Gb/s NIC per GPU)."""
CHECKPOINTING = ("none", "selective", "full")


@dataclass(frozen=True)
class Layout:
    """One way to run the config: the parallel degrees and the memory levers."""

    tp: int
    pp: int
    ep: int
    dp: int
    zero_stage: int
    activation_checkpointing: str
    micro_batch_size: int

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.ep * self.dp

    def describe(self) -> str:
        return (f"TP {self.tp} x PP {self.pp} x EP {self.ep} x DP {self.dp}, ZeRO-{self.zero_stage}, "
                f"checkpointing {self.activation_checkpointing}, micro batch {self.micro_batch_size}")



@dataclass(frozen=True)
class Candidate:
    """A layout that passes validation, with its estimated memory per GPU and step time."""

    layout: Layout
    memory_gib: float
    step_time_s: float
    compute_s: float
    bubble_s: float
    communication_s: float


def parse_memory(text: str) -> float:
    """GPU memory in GiB from "80GB", "141 GiB", "40g" or a plain number of GiB. Vendors' "GB" are read as GiB."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(gib|gb|g|mib|mb|m|tib|tb|t)?\s*", str(text).lower())
    if not match:
        raise ConfigError(f"--gpu_memory: expected a size such as 80GB or 141GiB, got {text!r}")
    value, unit = float(match.group(1)), (match.group(2) or "g")[0]
    return value * {"g": 1.0, "m": 1 / 1024, "t": 1024.0}[unit]


def layout_of(cfg: DeepSeekConfig, world_size: int) -> Layout:
    """The layout a config asks for on `world_size` GPUs."""
    from lit_deepseek.parallel.layout import layout_degrees

    p, t = cfg.parallel, cfg.training
    tp, pp, ep, dp = layout_degrees(p, world_size)
    return Layout(tp, pp, ep, dp, p.zero_stage, t.activation_checkpointing, t.micro_batch_size)


def with_layout(cfg: DeepSeekConfig, layout: Layout) -> DeepSeekConfig:
    """A copy of the config running `layout` (an even layer split when the stages change)."""
    p = cfg.parallel
    keep_pipeline = layout.pp == p.pipeline_parallel_size
    parallel = dataclasses.replace(
        p, tensor_parallel_size=layout.tp, pipeline_parallel_size=layout.pp, expert_parallel_size=layout.ep,
        data_parallel_size=layout.dp, zero_stage=layout.zero_stage,
        pipeline_schedule=p.pipeline_schedule if keep_pipeline else "1f1b",
        virtual_pipeline_stages=p.virtual_pipeline_stages if keep_pipeline else 1,
        pipeline_layer_split=p.pipeline_layer_split if keep_pipeline else _even_split(cfg.model.num_layers, layout.pp))
    training = dataclasses.replace(cfg.training, activation_checkpointing=layout.activation_checkpointing,
                                   micro_batch_size=layout.micro_batch_size)
    return dataclasses.replace(cfg, parallel=parallel, training=training)


def _even_split(layers: int, stages: int) -> Optional[list[int]]:
    if stages == 1 or layers % stages == 0:
        return None
    q, r = divmod(layers, stages)
    return [q + 1] * r + [q] * (stages - r)  # the last stage, which also holds the head and MTP, gets fewer


def _powers_of_two(limit: int) -> list[int]:
    return [2**i for i in range(int(math.log2(max(1, limit))) + 1)]


def candidate_layouts(cfg: DeepSeekConfig, gpus: int) -> list[Layout]:
    """Every layout worth trying on `gpus` GPUs (powers of two per degree; validation prunes the rest)."""
    m, t = cfg.model, cfg.training
    out = []
    for tp in _powers_of_two(min(8, gpus)):
        for pp in _powers_of_two(min(gpus // tp, m.num_layers)):
            for ep in _powers_of_two(min(gpus // (tp * pp), m.moe.num_experts)):
                if gpus % (tp * pp * ep):
                    continue
                dp = gpus // (tp * pp * ep)
                # ZeRO shards over replicas: with none, every stage is the same, so keep the config's
                stages = (0, 1, 2, 3) if dp * ep > 1 else (cfg.parallel.zero_stage,)
                for zero, ac, mbs in itertools.product(stages, CHECKPOINTING,
                                                       _powers_of_two(min(8, t.global_batch_size))):
                    if t.global_batch_size % (mbs * dp * ep) == 0:  # whole micro-batches per replica
                        out.append(Layout(tp, pp, ep, dp, zero, ac, mbs))
    return out


def estimate(cfg: DeepSeekConfig, layout: Layout, gpus_per_node: int = 8) -> Candidate:
    """Memory per GPU and step time of `cfg` under `layout` (the config is not validated here)."""
    c = with_layout(cfg, layout)
    m, t, p = c.model, c.training, c.parallel
    memory = c.memory_estimate(layout.gpus)["total"]
    peak = (c.logging.peak_tflops or DEFAULT_PEAK_TFLOPS) * 1e12 * MATMUL_EFFICIENCY
    tokens = t.global_batch_size * t.seq_length
    flops = c.flops_per_token() * tokens
    if layout.activation_checkpointing == "full":
        flops *= 4 / 3  # the forward again
    elif layout.activation_checkpointing == "selective":
        b = c.param_breakdown()
        routed_active = b["routed_experts"] and b["routed_experts"] * m.moe.num_experts_per_token / m.moe.num_experts
        flops += 2 * routed_active * tokens  # the routed experts' forward again
    compute = flops / (layout.gpus * peak)
    micro = t.global_batch_size // (layout.micro_batch_size * layout.dp * layout.ep)
    bubble = compute * (layout.pp - 1) / micro if layout.pp > 1 else 0.0

    act = 2 if t.precision != "32-true" else 4
    micro_bytes = layout.micro_batch_size * t.seq_length * m.mla.d_model * act
    layers_per_stage = math.ceil((m.num_layers + m.mtp_depth) / layout.pp)
    moe_per_stage = math.ceil(max(0, m.num_layers - m.first_dense_layers + m.mtp_depth) / layout.pp)

    def bandwidth(span: int) -> float:
        return (NVLINK_GBPS if span <= gpus_per_node else NETWORK_GBPS) * 1e9

    comm = 0.0
    if layout.tp > 1:
        ring = 2 * (layout.tp - 1) / layout.tp
        comm += micro * layers_per_stage * 4 * ring * micro_bytes / bandwidth(layout.tp)
    if layout.ep > 1:
        sent = micro_bytes * m.moe.num_experts_per_token * (layout.ep - 1) / layout.ep / layout.tp
        comm += micro * moe_per_stage * 4 * sent / bandwidth(layout.tp * layout.ep)
    b = c.param_breakdown()
    experts = b["routed_experts"] + (b["mtp_total"] and b["routed_experts"] // max(1, m.num_layers - m.first_dense_layers)
                                      * m.mtp_depth)
    dense_local = (b["main_total"] + b["mtp_total"] - experts) / (layout.tp * layout.pp)
    expert_local = experts / (layout.ep * layout.pp)
    grad_bytes = 4 if t.precision != "bf16-true" else 2
    reduce = 0.0
    for params, ranks, span in ((dense_local, layout.dp * layout.ep, layout.gpus // layout.pp),
                                (expert_local, layout.dp, layout.gpus // layout.pp)):
        if ranks > 1:
            ring = 2 * (ranks - 1) / ranks
            reduce += ring * params * grad_bytes / bandwidth(span)
            if layout.zero_stage >= 3:  # parameters gathered for each micro-batch's forward and backward
                reduce += micro * 2 * (ranks - 1) / ranks * params * act / bandwidth(span)
    comm += reduce * (0.5 if p.overlap_grad_reduce and layout.zero_stage < 3 else 1.0)
    return Candidate(layout, memory, compute + bubble + comm, compute, bubble, comm)


def is_valid(cfg: DeepSeekConfig, layout: Layout) -> bool:
    try:
        validate_config(with_layout(cfg, layout), layout.gpus)
    except ConfigError:
        return False
    return True


def plan(cfg: DeepSeekConfig, gpus: int, gpu_memory_gib: float, gpus_per_node: int = 8) -> list[Candidate]:
    """Layouts of `cfg` on `gpus` GPUs that fit `gpu_memory_gib` each, fastest estimated step first."""
    usable = gpu_memory_gib * USABLE_FRACTION
    fits = []
    for layout in candidate_layouts(cfg, gpus):
        cand = estimate(cfg, layout, gpus_per_node)
        if cand.memory_gib <= usable and is_valid(cfg, layout):
            fits.append(cand)
    fits.sort(key=lambda c: (c.step_time_s, c.memory_gib))
    return fits


def smallest_memory(cfg: DeepSeekConfig, gpus: int) -> Optional[Candidate]:
    """The valid layout with the least memory per GPU on `gpus` GPUs (None when no layout is valid)."""
    best = None
    for layout in candidate_layouts(cfg, gpus):
        cand = estimate(cfg, layout)
        if (best is None or cand.memory_gib < best.memory_gib) and is_valid(cfg, layout):
            best = cand
    return best


def gpus_needed(cfg: DeepSeekConfig, gpu_memory_gib: float, start: int = 1, limit: int = 65536) -> Optional[int]:
    """The smallest power-of-two GPU count (from `start`) on which some layout fits, up to `limit`."""
    gpus = 2 ** math.ceil(math.log2(max(1, start)))
    while gpus <= limit:
        best = smallest_memory(cfg, gpus)
        if best is not None and best.memory_gib <= gpu_memory_gib * USABLE_FRACTION:
            return gpus
        gpus *= 2
    return None


_FLAGS = (("tp", "parallel.tensor_parallel_size"), ("pp", "parallel.pipeline_parallel_size"),
          ("ep", "parallel.expert_parallel_size"), ("dp", "parallel.data_parallel_size"),
          ("zero_stage", "parallel.zero_stage"), ("activation_checkpointing", "training.activation_checkpointing"),
          ("micro_batch_size", "training.micro_batch_size"))


def _changes(cfg: DeepSeekConfig, a: Optional[Layout], b: Layout, auto_dp: bool = False) -> list[str]:
    """Command-line overrides that turn layout `a` of `cfg` into `b` (all of `b` when `a` is None)."""
    out = [f"--{name} {getattr(b, attr)}" for attr, name in _FLAGS
           if a is None or (getattr(a, attr) != getattr(b, attr) and not (auto_dp and attr == "dp"))]
    p = cfg.parallel
    if b.pp != p.pipeline_parallel_size and (p.pipeline_layer_split is not None or p.virtual_pipeline_stages > 1):
        split = with_layout(cfg, b).parallel.pipeline_layer_split
        out.append("--parallel.pipeline_layer_split " + ("null" if split is None else
                                                         "[" + ",".join(map(str, split)) + "]"))
        if p.virtual_pipeline_stages > 1:
            out += ["--parallel.pipeline_schedule 1f1b", "--parallel.virtual_pipeline_stages 1"]
    return out


def memory_check(cfg: DeepSeekConfig, world_size: int, gpu_memory_gib: float) -> Optional[str]:
    """None unless the config's estimate exceeds the GPU's memory; then one line with the estimate and the smallest
    change that fits with the planner's headroom (fewest changed fields, then the fastest), or the GPU count it needs."""
    current = layout_of(cfg, world_size)
    need = cfg.memory_estimate(world_size)["total"]
    if need <= gpu_memory_gib:
        return None
    head = (f"parallel: the estimated memory per GPU is {need:.1f} GiB but a GPU has {gpu_memory_gib:.1f} GiB "
            f"({current.describe()})")
    fits = plan(cfg, world_size, gpu_memory_gib)
    auto_dp = cfg.parallel.data_parallel_size == -1  # DP follows TP, PP and EP: not a change to name
    if fits:
        # fewest fields changed, then the fastest, then the one closest to the asked-for memory use
        best = min(fits, key=lambda c: (len(_changes(cfg, current, c.layout, auto_dp)), round(c.step_time_s, 3),
                                        -c.memory_gib))
        change = " ".join(_changes(cfg, current, best.layout, auto_dp))
        return f"{head}; smallest change that fits: {change} ({best.memory_gib:.1f} GiB)"
    more = gpus_needed(cfg, gpu_memory_gib, start=world_size * 2)
    hint = f"about {more} GPUs of this size" if more else "more memory than 65536 such GPUs give"
    return f"{head}; no layout fits {world_size} GPUs: it needs {hint} (see lit-deepseek plan)"


def format_plan(cfg: DeepSeekConfig, gpus: int, gpu_memory_gib: float, top: int = 10, gpus_per_node: int = 8,
                name: str = "config") -> str:
    """The planner's report: the config's own layout, then the fitting layouts, fastest first."""
    t = cfg.training
    usable = gpu_memory_gib * USABLE_FRACTION
    peak = cfg.logging.peak_tflops or DEFAULT_PEAK_TFLOPS
    lines = [f"{name}: {cfg.total_params() / 1e9:.2f}B parameters ({cfg.active_params_per_token() / 1e9:.2f}B active), "
             f"global batch {t.global_batch_size} x {t.seq_length} tokens, {t.precision}",
             f"{gpus} GPUs x {gpu_memory_gib:g} GiB ({usable:.1f} GiB usable each), {gpus_per_node} per node, "
             f"{peak:g} TFLOP/s peak at {MATMUL_EFFICIENCY:.0%}"]
    try:
        own = layout_of(cfg, gpus)
        validate_config(cfg, gpus)
        mine = estimate(cfg, own, gpus_per_node)
        verdict = "fits" if mine.memory_gib <= usable else "does NOT fit"
        lines.append(f"config's layout: {own.describe()}: {mine.memory_gib:.1f} GiB/GPU, "
                     f"step ~{mine.step_time_s:.2f} s: {verdict}")
    except ConfigError as exc:
        lines.append(f"config's layout does not run on {gpus} GPUs: {exc}")
    fits = plan(cfg, gpus, gpu_memory_gib, gpus_per_node)
    if not fits:
        best = smallest_memory(cfg, gpus)
        more = gpus_needed(cfg, gpu_memory_gib, start=gpus * 2)
        if best is not None:
            lines.append(f"no layout fits: the least memory is {best.memory_gib:.1f} GiB/GPU ({best.layout.describe()})")
        lines.append(f"smallest GPU count that fits: {more}" if more else "no GPU count up to 65536 fits")
        return "\n".join(lines)
    lines.append(f"{len(fits)} layouts fit; the {min(top, len(fits))} fastest by estimate:")
    lines.append(f"{'#':>3} {'TP':>3} {'PP':>3} {'EP':>4} {'DP':>5} {'ZeRO':>4}  {'checkpointing':<13} {'mbs':>3} "
                 f"{'GiB/GPU':>8} {'step s':>8} {'compute':>8} {'bubble':>7} {'comm':>7}")
    for i, c in enumerate(fits[:top], 1):
        lo = c.layout
        lines.append(f"{i:>3} {lo.tp:>3} {lo.pp:>3} {lo.ep:>4} {lo.dp:>5} {lo.zero_stage:>4}  "
                     f"{lo.activation_checkpointing:<13} {lo.micro_batch_size:>3} {c.memory_gib:>8.1f} "
                     f"{c.step_time_s:>8.2f} {c.compute_s:>8.2f} {c.bubble_s:>7.2f} {c.communication_s:>7.2f}")
    lines.append("run the first: " + " ".join(_changes(cfg, None, fits[0].layout)))
    return "\n".join(lines)


def plan_main(argv: list[str]) -> int:
    """`lit-deepseek plan --config FILE [--config OVERRIDE] --gpus N --gpu_memory 80GB [--key.path value ...]`."""
    from lit_deepseek.config import load_config

    parser = argparse.ArgumentParser(
        prog="lit-deepseek plan",
        description="List the parallel layouts (TP, PP, EP, DP, ZeRO stage, activation checkpointing, micro batch) "
                    "that fit N GPUs by the memory estimate of `summary`, fastest estimated step first.")
    parser.add_argument("--config", "-c", action="append", required=True, help="YAML config (repeatable)")
    parser.add_argument("--gpus", type=int, required=True, help="number of GPUs (world size)")
    parser.add_argument("--gpu_memory", default="80GB", help="memory of one GPU, e.g. 80GB, 141GB (default 80GB)")
    parser.add_argument("--gpus_per_node", type=int, default=8, help="GPUs per node sharing NVLink (default 8)")
    parser.add_argument("--top", type=int, default=10, help="layouts to list (default 10)")
    args, rest = parser.parse_known_args(argv)
    if args.gpus < 1:
        raise ConfigError(f"--gpus: must be >= 1, got {args.gpus}")
    overrides = dotted_overrides(rest)
    cfg = load_config(*args.config, overrides=overrides)
    print(format_plan(cfg, args.gpus, parse_memory(args.gpu_memory), top=args.top, gpus_per_node=args.gpus_per_node,
                      name=" + ".join(args.config)))
    return 0
