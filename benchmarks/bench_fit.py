"""Training throughput of the product: `lit-deepseek fit` itself, against Hugging Face transformers.

Each lit-deepseek row is one `python -m lit_deepseek fit` subprocess: the CLI, the DataModule on
the built-in corpus' webdataset shards, the LightningModule's step and MLflow logging, exactly as a
user runs it. Figures are read back from the run's MLflow store:

* tokens/s: tokens of the steps after warm-up over the time between their metric timestamps
  (Lightning's MLflow logger stamps a step when it logs it). Metrics are logged every `--warmup`
  steps (`logging.log_every_n_steps`): steps that do not log leave the device queue running ahead,
  as in a user's run; the first logged step ends the warm-up;
* MFU: that rate x `flops_per_token` (6 x matmul parameters + causal attention, MTP included)
  over 989 TFLOP/s (H100/H200 dense bf16);
* startup: from launching the command to the end of the first optimizer step (exact on the
  checkpoint row, which logs every step; elsewhere the first logged step minus the steady steps
  before it);
* checkpoint stall: the longest step that ended in a periodic save, minus the median step;
* peak memory: `train/max_memory_gib` against `lit-deepseek summary`'s estimate for the same settings.

Hugging Face's DeepseekV3ForCausalLM (bf16 weights, fused AdamW, its own loss; eager and
`torch.compile`d) trains at the same shapes in this process, as the baseline.

    python benchmarks/bench_fit.py --out $OUT                     # the default table
    python benchmarks/bench_fit.py --rows small-s4096-mixed-compile --hf none --steps 6
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PEAK_BF16 = 989e12
CONFIGS = {"small": [ROOT / "configs" / "deepseek_v3_small.yaml"],
           "large": [ROOT / "configs" / "deepseek_v3_small.yaml", ROOT / "benchmarks" / "v3_d2048.yaml"],
           "demo": [ROOT / "configs" / "cpu_demo.yaml"]}  # CPU smoke test of this script


@dataclasses.dataclass
class Row:
    """One `lit-deepseek fit` run."""

    config: str = "small"
    seq: int = 4096
    micro: int = 8
    global_batch: int = 8
    precision: str = "bf16-mixed"
    compile: bool = True
    fp8: bool = False
    fp8_recipe: str = "blockwise"
    expert_wgrad: str = "bf16"  # training.fp8_expert_wgrad (the default bf16; ...-ewfp8 in the name for fp8)
    fp8_experts: bool = True  # False: routed experts added to training.fp8_exclude (...-noexp in the name)
    mtp: int = 1
    checkpoint_every: int = 0  # 0: no periodic save during the timed steps
    graphs: bool = True  # training.cuda_graphs (the default); a row named ...-nograph runs the eager step
    weight_copy: bool = True  # training.bf16_weight_copy (the default); ...-nocopy: autocast casts per micro-batch
    fp8_reuse: bool = True  # FP8 weight reuse across micro-batches (the default); ...-noreuse: LIT_DEEPSEEK_FP8_WEIGHT_CACHE=0

    @property
    def name(self) -> str:
        parts = [self.config, f"s{self.seq}", f"m{self.micro}x{self.global_batch // self.micro}",
                 self.precision, "compile" if self.compile else "eager"]
        if self.fp8:
            parts.append("fp8" if self.fp8_recipe == "blockwise" else f"fp8{self.fp8_recipe}")
            if self.expert_wgrad != "bf16":
                parts.append(f"ew{self.expert_wgrad}")
            if not self.fp8_experts:
                parts.append("noexp")
        if self.checkpoint_every:
            parts.append(f"ckpt{self.checkpoint_every}")
        if not self.graphs:
            parts.append("nograph")
        if not self.weight_copy:
            parts.append("nocopy")
        if self.fp8 and not self.fp8_reuse:
            parts.append("noreuse")
        return "-".join(parts)

    @property
    def env(self) -> dict[str, str]:
        """The environment of the row's `lit-deepseek fit` process."""
        return {**os.environ, **({} if self.fp8_reuse else {"LIT_DEEPSEEK_FP8_WEIGHT_CACHE": "0"})}


def default_rows() -> list[Row]:
    """8 x 4096 tokens per step; the larger config at half the micro-batch (x2 accumulation) to fit."""
    rows = []
    for config, micro_4096 in (("small", 8), ("large", 4)):
        for seq in (4096, 8192):
            micro = micro_4096 * 4096 // seq
            for compile_ in (True, False):
                rows.append(Row(config, seq, micro=micro, global_batch=8 * 4096 // seq, compile=compile_))
            rows.append(Row(config, seq, micro=micro, global_batch=8 * 4096 // seq, fp8=True))
        rows.append(Row(config, 4096, micro=2, global_batch=8))  # the config's own micro-batch 2
        rows.append(Row(config, 4096, micro=2, global_batch=8, fp8=True))  # ... in FP8 (weight reuse)
    rows.append(Row("small", 4096, micro=8, global_batch=8, compile=False, fp8=True))  # FP8 eager
    rows.append(Row("small", 4096, micro=8, global_batch=8, checkpoint_every=8))  # stall of a periodic save
    return rows


def _other_shape(name: str) -> Optional[Row]:
    """A default row at another micro-batch split: CONFIG-sSEQ-mMICROxACC-... (e.g. the large config at
    micro 1 x 4, which fits an 80 GB card) is the default row CONFIG-sSEQ-m?x?-... with that split."""
    parts = name.split("-")
    if len(parts) < 3 or not re.fullmatch(r"m\d+x\d+", parts[2]):
        return None
    micro, acc = (int(v) for v in parts[2][1:].split("x"))
    for row in default_rows():
        if row.name.split("-")[:2] + row.name.split("-")[3:] == parts[:2] + parts[3:] and not row.checkpoint_every:
            return dataclasses.replace(row, micro=micro, global_batch=micro * acc)
    return None


def select_rows(wanted: list[str]) -> list[Row]:
    """The named rows in the order asked (a default row's name with another mMICROxACC split too, e.g.
    large-s4096-m1x4-bf16-mixed-compile-fp8); NAME-nograph is row NAME with `training.cuda_graphs: false`,
    NAME-nocopy with `training.bf16_weight_copy: false` (both: NAME-nograph-nocopy); an FP8 row's
    NAME-noreuse (last) runs with LIT_DEEPSEEK_FP8_WEIGHT_CACHE=0."""
    known = {r.name: r for r in default_rows()}
    rows = []
    for name in wanted:
        reuse = not name.endswith("-noreuse")
        named = name.removesuffix("-noreuse")
        base = named.removesuffix("-nocopy")
        copy = base == named
        graph_base = base.removesuffix("-nograph")
        graphs = graph_base == base
        recipe, wgrad = "blockwise", "bf16"
        if "-fp8rowwise" in graph_base:  # an FP8 row under `training.fp8_recipe: rowwise`
            graph_base, recipe = graph_base.replace("-fp8rowwise", "-fp8"), "rowwise"
        if graph_base.endswith("-fp8-ewfp8"):  # `training.fp8_expert_wgrad: fp8`
            graph_base, wgrad = graph_base.removesuffix("-ewfp8"), "fp8"
        if graph_base not in known and (other := _other_shape(graph_base)) is not None:
            known[graph_base] = other
        if graph_base not in known:
            raise SystemExit(f"--rows: unknown row {name!r}; rows: {', '.join(known)} (each also as NAME-nograph, "
                             "NAME-nocopy, NAME-nograph-nocopy; an fp8 row also as ...-fp8rowwise... or "
                             "...-fp8-ewfp8..., and with -noreuse last)")
        rows.append(dataclasses.replace(known[graph_base], graphs=graphs, weight_copy=copy, fp8_recipe=recipe,
                                        expert_wgrad=wgrad, fp8_reuse=reuse))
    return rows


# ------------------------------------------------------------------------------------ product rows
def fit_command(row: Row, run_dir: Path, steps: int, log_every_n_steps: int) -> list[str]:
    cmd = [sys.executable, "-m", "lit_deepseek", "fit"]
    for path in CONFIGS[row.config]:
        cmd += ["--config", str(path)]
    every = row.checkpoint_every or 10 * steps
    log_every = 1 if row.checkpoint_every else log_every_n_steps
    cmd += ["--parallel.expert_parallel_size", "1", "--parallel.data_parallel_size", "1",
            "--trainer.devices", "1", "--trainer.accelerator", "cuda" if row.config != "demo" else "cpu",
            "--training.seq_length", str(row.seq), "--training.micro_batch_size", str(row.micro),
            "--training.global_batch_size", str(row.global_batch), "--training.max_steps", str(steps),
            "--training.precision", row.precision, "--training.compile", str(row.compile).lower(),
            "--training.use_fp8", str(row.fp8).lower(), "--training.fp8_recipe", row.fp8_recipe,
            "--training.fp8_expert_wgrad", row.expert_wgrad,
            *(() if row.fp8_experts else ("--training.fp8_exclude", "[embed, head, gate, experts]")),
            "--training.cuda_graphs", str(row.graphs).lower(),
            "--training.bf16_weight_copy", str(row.weight_copy).lower(),
            "--training.lr_warmup_steps", "2",
            "--training.val_every_n_steps", str(10 * steps), "--training.val_batches", "1",
            "--model.mtp_depth", str(row.mtp),
            "--model.mla.max_context_length", str(max(row.seq, 8192)),
            "--checkpoint.every_n_steps", str(every), "--checkpoint.save_best", "false",
            "--checkpoint.save_last", str(bool(row.checkpoint_every)).lower(),
            "--logging.run_dir", str(run_dir), "--logging.log_every_n_steps", str(log_every),
            "--logging.heatmap_every_n_steps", "0", "--logging.progress_bar", "false"]
    return cmd


def metric_history(run_dir: Path, keys: list[str]) -> dict[str, list[Any]]:
    """{key: [Metric(step, value, timestamp ms)]} of the single run in the run directory's store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    if len(runs) != 1:
        raise RuntimeError(f"{run_dir}: expected one MLflow run, found {len(runs)}")
    run_id = runs[0].info.run_id
    return {k: sorted(client.get_metric_history(run_id, k), key=lambda m: m.step) for k in keys}


def row_config(row: Row) -> Any:
    """The `DeepSeekConfig` a row's `fit_command` trains (for its FLOPs and memory estimate)."""
    from lit_deepseek.config import load_config

    return load_config(*CONFIGS[row.config], overrides={
        "parallel.expert_parallel_size": 1, "parallel.data_parallel_size": 1, "training.seq_length": row.seq,
        "training.micro_batch_size": row.micro, "training.global_batch_size": row.global_batch,
        "training.compile": row.compile, "training.precision": row.precision, "model.mtp_depth": row.mtp,
        "training.use_fp8": row.fp8, "training.fp8_recipe": row.fp8_recipe,
        "training.fp8_expert_wgrad": row.expert_wgrad,
        **({} if row.fp8_experts else {"training.fp8_exclude": ["embed", "head", "gate", "experts"]}),
        "training.cuda_graphs": row.graphs, "training.bf16_weight_copy": row.weight_copy,
        "model.mla.max_context_length": max(row.seq, 8192)}, validate=False)


def row_estimate_gib(row: Row, cfg: Any) -> float:
    """`lit-deepseek summary`'s memory estimate of the row, under the row's environment (a -noreuse
    row keeps no FP8 weight blocks)."""
    with mock.patch.dict(os.environ, row.env):
        return cfg.memory_estimate(world_size=1)["total"]


def run_product(row: Row, steps: int, warmup: int, work: Path, timeout_s: float) -> dict[str, Any]:
    run_dir = work / row.name
    work.mkdir(parents=True, exist_ok=True)
    cmd = fit_command(row, run_dir, steps, warmup)
    t_launch = time.time()
    proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=timeout_s, env=row.env)
    wall_s = time.time() - t_launch
    (work / f"{row.name}.log").write_text(proc.stdout + proc.stderr)
    # the metrics live in the run's MLflow store; its checkpoints (~19 GB a save on the small config)
    # would fill the machine's disk over a few rows
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"name": row.name, "error": " | ".join(tail)}
    hist = metric_history(run_dir, ["train/loss", "train/mfu", "train/max_memory_gib", "train/compiled_graphs",
                                    "train/cuda_graphs", "fp8/kernel_mismatches"])
    losses = hist["train/loss"]
    stamps = [m.timestamp / 1e3 for m in losses]
    cfg = row_config(row)
    tokens_per_step = row.global_batch * row.seq
    logged = [m.step for m in losses]
    # from the first logged step on (the warm-up ends there); per-step with the checkpoint row
    first = 0 if not row.checkpoint_every else warmup - 1
    span_steps, span_s = logged[-1] - logged[first], stamps[-1] - stamps[first]
    tokens_per_s = tokens_per_step * span_steps / span_s
    step_times = [(b - a) / (sb - sa) for a, b, sa, sb in
                  zip(stamps[first:], stamps[first + 1:], logged[first:], logged[first + 1:], strict=False)]
    out: dict[str, Any] = dataclasses.asdict(row) | {
        "name": row.name, "steps": logged[-1] + 1, "tokens_per_s": tokens_per_s,
        "mfu": tokens_per_s * cfg.flops_per_token() / PEAK_BF16,
        "logged_mfu_median": statistics.median(m.value for m in hist["train/mfu"][1:]) if len(hist["train/mfu"]) > 1 else None,
        # exact where every step logs (the checkpoint row); else minus the steady steps before the first log
        "startup_s": stamps[0] - t_launch - logged[0] * statistics.median(step_times), "wall_s": wall_s,
        "loss_first": losses[0].value, "loss_last": losses[-1].value,
        "peak_gib": max((m.value for m in hist["train/max_memory_gib"]), default=float("nan")),
        "estimate_gib": row_estimate_gib(row, cfg),
        "compiled_graphs": [m.value for m in hist["train/compiled_graphs"]],
        "cuda_graphs": [m.value for m in hist["train/cuda_graphs"]],
        "step_s_median": statistics.median(step_times),
        # FP8 kernel signatures that ran the torch reference after a bit mismatch (slower; see README)
        "fp8_kernel_mismatches": hist["fp8/kernel_mismatches"][-1].value if hist["fp8/kernel_mismatches"] else None,
    }
    if row.checkpoint_every:
        saves = [i for i, m in enumerate(losses) if (m.step + 1) % row.checkpoint_every == 0]
        # Lightning logs a step after its on_train_batch_end hooks (the save): take both neighbours
        stalls = [max(stamps[i] - stamps[i - 1], stamps[i + 1] - stamps[i]) for i in saves if 0 < i < len(stamps) - 1]
        out["checkpoint_stall_s"] = max(stalls) - out["step_s_median"] if stalls else None
    return out


# ------------------------------------------------------------------------------------ Hugging Face
def run_hf(config: str, seq: int, batch: int, compiled: bool, steps: int, warmup: int) -> dict[str, Any]:
    """HF DeepseekV3ForCausalLM at the same shapes: bf16 weights, fused AdamW, its own loss (no MTP)."""
    import torch
    import transformers

    from lit_deepseek.checkpoint.hf import model_config_to_hf
    from lit_deepseek.config import load_config

    cfg = load_config(*CONFIGS[config], overrides={"parallel.expert_parallel_size": 1,
                                                   "model.mla.max_context_length": max(seq, 8192)},
                      validate=False).model
    hf = model_config_to_hf(cfg)
    conf = transformers.DeepseekV3Config(**{k: v for k, v in hf.items() if k not in ("architectures", "model_type")})
    conf.use_cache = False
    kwargs: dict[str, Any] = {"attn_implementation": "sdpa", "dtype": torch.bfloat16,
                              "experts_implementation": "grouped_mm"}
    with torch.device("cuda"):
        try:
            model = transformers.DeepseekV3ForCausalLM._from_config(conf, **kwargs)
        except TypeError:  # a transformers without the experts_implementation switch
            kwargs.pop("experts_implementation")
            model = transformers.DeepseekV3ForCausalLM._from_config(conf, **kwargs)
    model.to(torch.bfloat16).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    fwd = torch.compile(model) if compiled else model
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), device="cuda")
    torch.cuda.reset_peak_memory_stats()

    def step() -> None:
        fwd(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    name = f"hf-{config}-s{seq}-b{batch}-{'compile' if compiled else 'eager'}"
    error = None
    try:
        for _ in range(warmup):
            step()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / steps
    except torch.OutOfMemoryError:
        error = "out of memory"
    peak = torch.cuda.max_memory_allocated() / 2**30
    model = opt = fwd = None
    gc.collect()
    torch.cuda.empty_cache()
    torch._dynamo.reset()
    if error:
        return {"name": name, "error": error}
    from lit_deepseek.config import DeepSeekConfig, TrainingConfig

    cfg.mtp_depth = 0
    flops = DeepSeekConfig(model=cfg, training=TrainingConfig(seq_length=seq)).flops_per_token()
    tok_s = batch * seq / dt
    return {"name": name, "config": config, "seq": seq, "tokens_per_s": tok_s, "mfu": tok_s * flops / PEAK_BF16,
            "peak_gib": peak, "step_s_median": dt}


# ------------------------------------------------------------------------------------ report
def label(r: dict[str, Any]) -> str:
    """A row's name, flagged when FP8 kernels fell back to their reference (its speed is not the kernels')."""
    n = r.get("fp8_kernel_mismatches")
    return f"{r['name']} (FP8: {n:.0f} kernel signatures ran the reference)" if n else r["name"]


def fmt(rows: list[dict[str, Any]]) -> str:
    head = ("| run | tokens/s | MFU (989) | step s | startup s | peak GiB | estimate GiB | ckpt stall s | "
            "compiled graphs (first, last) | CUDA graphs (last) | loss first -> last |")
    lines = [head, "|" + "---|" * 11]

    def f(v: Any, spec: str) -> str:
        return "" if v is None or v != v else format(v, spec)

    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | error: {r['error'][:160]} |" + " |" * 9)
            continue
        graphs = r.get("compiled_graphs") or []
        lines.append(
            f"| {label(r)} | {r['tokens_per_s']:,.0f} | {100 * r['mfu']:.1f}% | {f(r.get('step_s_median'), '.3f')} | "
            f"{f(r.get('startup_s'), '.1f')} | {f(r.get('peak_gib'), '.1f')} | {f(r.get('estimate_gib'), '.1f')} | "
            f"{f(r.get('checkpoint_stall_s'), '.2f')} | {f'{graphs[0]:.0f}, {graphs[-1]:.0f}' if graphs else ''} | "
            f"{f(cuda[-1], '.0f') if (cuda := r.get('cuda_graphs')) else ''} | "
            f"{f(r.get('loss_first'), '.3f')} -> {f(r.get('loss_last'), '.3f')} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="", help="comma list of row names (default: the full table)")
    ap.add_argument("--hf", default="small-s4096,small-s8192,large-s4096",
                    help="comma list of config-sSEQ for the HF baseline (eager and compiled); 'none' skips it")
    ap.add_argument("--hf-modes", default="eager,compile",
                    help="which HF baselines to run: eager, compile or both (comma list)")
    ap.add_argument("--steps", type=int, default=12, help="optimizer steps per product run")
    ap.add_argument("--warmup", type=int, default=4, help="steps before timing starts")
    ap.add_argument("--budget-s", type=float, default=1e9, help="skip what remains after this many seconds")
    ap.add_argument("--run-timeout-s", type=float, default=400)
    ap.add_argument("--work", default="/tmp/bench_fit",
                    help="run directories go under a fresh time-stamped folder here (a rerun never reads an older run's store)")
    ap.add_argument("--out", default=os.environ.get("OUT", str(ROOT / "benchmarks" / "out")))
    args = ap.parse_args()
    hf_modes = set(args.hf_modes.split(","))
    if not hf_modes <= {"eager", "compile"}:  # before any run starts
        ap.error(f"--hf-modes: eager and/or compile, got {args.hf_modes!r}")
    t_start = time.time()
    work, out = Path(args.work) / time.strftime("%Y%m%d-%H%M%S"), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    rows = default_rows()
    if args.rows:
        rows = select_rows(args.rows.split(","))
    results: list[dict[str, Any]] = []

    def save() -> None:
        (out / "bench_fit.json").write_text(json.dumps(results, indent=1, default=str))
        (out / "bench_fit.md").write_text(fmt(results) + "\n")

    for row in rows:
        if time.time() - t_start > args.budget_s:
            print(f"budget spent: skipping {row.name}", flush=True)
            continue
        print(f"-> {row.name}", flush=True)
        try:
            results.append(run_product(row, args.steps, args.warmup, work, args.run_timeout_s))
        except subprocess.TimeoutExpired:
            results.append({"name": row.name, "error": f"timed out after {args.run_timeout_s:.0f} s"})
        print(fmt(results[-1:]).splitlines()[-1], flush=True)
        save()
    if args.hf != "none":
        for spec in args.hf.split(","):
            config, seq = spec.split("-s")
            for compiled in [m == "compile" for m in ("eager", "compile") if m in hf_modes]:
                if time.time() - t_start > args.budget_s:
                    continue
                results.append(run_hf(config, int(seq), 8 * 4096 // int(seq), compiled, args.steps - args.warmup,
                                      args.warmup))
                print(fmt(results[-1:]).splitlines()[-1], flush=True)
                save()
    print(f"\n{datetime.date.today()} git {git_commit()}\n{fmt(results)}")


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True).stdout.strip()
    except OSError:
        return "?"


if __name__ == "__main__":
    main()
