"""FP8 against BF16 through the product path: `lit-deepseek fit` runs, read back from MLflow.

(a) convergence: BF16 seed A, BF16 seed B (the seed-to-seed noise floor), FP8 blockwise and FP8
    row-wise (seed A; --conv-runs picks other FP8 variants: fp8-blockwise-ewfp8 with the routed
    experts' FP8 weight gradient, fp8-blockwise-noexp with the routed experts in BF16) on the model
    of `benchmarks/fp8_conv.yaml` (stacked on configs/cpu_demo.yaml):
    the same shards for all four, 65,536 tokens per step, bf16-mixed, regional compile. Data
    (--corpus): `local` (the default on the GPU) is the .py/.rst/.md/.txt files of this Python
    installation (sorted paths, UTF-8 only, no duplicates, up to --corpus-mb MB), cut at line ends
    into ~4 KB pieces that are shuffled once with a fixed seed (so every batch mixes many files and
    the stream is stationary), tokenized once by `lit-deepseek prepare-data` (byte-level, 2**20-token
    shards) under the work directory; `builtin` (the CPU smoke's default) is the product's demo corpus (~465 KB, which
    1000 steps go over >100 times). The table header gives the corpus, its tokens and the epochs
    that the steps asked make of it. The learning rate is constant after warm-up, so runs that
    their time limit (an equal share of --conv-budget-s each, or each run's limit with
    --concurrent; then SIGTERM, the product's graceful stop, which saves a checkpoint) stops at
    different steps are compared over their common steps: final loss = mean of the last 100 common
    steps. `--resume` continues the runs of the newest work folder from their `last` checkpoints
    in the same MLflow runs, so 1000 steps may take several calls. `--replicates N` runs each of the
    four N times (same seed, same data) and judges the targets on the means, since GPU kernels are not
    bitwise deterministic and a same-seed rerun can drift by more than the 0.5% asked. Writes a gap table and a PNG of
    the curves (under --out and benchmarks/), and logs both to each run's MLflow store.
(b) speed: tokens/s and MFU of bf16 vs FP8 blockwise vs FP8 row-wise (--recipes: any of the variants
    above; bf16-mixed, compile) on the small config (8 x 4096 tokens per step) and on the d_model
    2048 config of `v3_d2048.yaml` (4 x 4096), measured by `bench_fit.py`'s product rows (tokens of the timed steps over the
    MLflow timestamps of their metrics).

Every run is a `lit-deepseek fit` subprocess (`bench_fit.fit_command`) with a hard time limit, cut
to end inside --budget-s; a speed run starts only with at least 90 s of the budget left.

    python benchmarks/bench_fp8.py --phases convergence --steps 1000 --concurrent --out $OUT/fp8
    python benchmarks/bench_fp8.py --phases convergence --steps 1000 --concurrent --resume --out $OUT/fp8  # continue
    python benchmarks/bench_fp8.py --phases convergence --steps 1000 --concurrent --replicates 2 --out $OUT/fp8
    python benchmarks/bench_fp8.py --phases speed --speed-configs small --out $OUT/fp8
    python benchmarks/bench_fp8.py --phases speed --speed-configs large --out $OUT/fp8
    python benchmarks/bench_fp8.py --phases speed --speed-configs large --large-micro 1 --out $OUT/fp8  # 80 GB card
    python benchmarks/bench_fp8.py --phases speed --speed-configs large --large-micro 1 \
        --recipes bf16,fp8-blockwise,fp8-blockwise-noreuse --out $OUT/fp8  # the weight reuse on and off
    python benchmarks/bench_fp8.py --phases convergence --steps 4 --device cpu --concurrent --out /tmp/bench_fp8  # smoke
    python benchmarks/bench_fp8.py --phases convergence --steps 3 --device cpu --corpus local --corpus-mb 2 \
        --out /tmp/bench_fp8  # smoke of the local corpus
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import sysconfig
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_fit  # noqa: E402  (the product-run command and MLflow reader shared with bench_fit)

bench_fit.CONFIGS["fp8conv"] = [ROOT / "configs" / "cpu_demo.yaml", ROOT / "benchmarks" / "fp8_conv.yaml"]
#: speed configs: name -> (bench_fit config, sequences of 4096 tokens per step); --large-micro splits the large
#: config's 4 sequences into micro-batches (1 on an 80 GB card: its weights, gradients and AdamW states take ~58 GiB)
SPEED = {"small": ("small", 8), "large": ("large", 4)}
#: CPU smoke of the convergence phase: the demo model itself (config "demo" runs on the CPU)
SMOKE = ["--model.num_layers", "2"]
# the local corpus (see local_corpus): pieces of about 4 KB, shuffled once with a fixed seed, in shards of
# 2**20 tokens (~57 shards for 60 MB)
PIECE_BYTES, CORPUS_SEED, SHARD_TOKENS = 4096, 0, 2**20
#: variant -> (use_fp8, fp8_recipe, fp8_expert_wgrad, routed experts in FP8); the speed phase's --recipes and the
#: convergence runs use these
#: (fp8-blockwise is the product's default FP8: bf16 expert weight gradient; before 2026-12-07's eleventh session
#: that run used the FP8 one, now fp8-blockwise-ewfp8)
VARIANTS = {"bf16": (False, "blockwise", "bf16", True), "fp8-blockwise": (True, "blockwise", "bf16", True),
            "fp8-rowwise": (True, "rowwise", "bf16", True), "fp8-blockwise-ewfp8": (True, "blockwise", "fp8", True),
            "fp8-blockwise-noexp": (True, "blockwise", "bf16", False)}
#: convergence runs: name -> (variant, seed A or B); --conv-runs picks among them
CONV_RUNS = {"bf16-seedA": ("bf16", "a"), "bf16-seedB": ("bf16", "b"),
             **{v: (v, "a") for v in VARIANTS if v.startswith("fp8")}}


def final_loss(loss: list[float], window: int) -> Optional[float]:
    return sum(loss[-window:]) / len(loss[-window:]) if loss else None


def text_pieces(text: str, size: int = PIECE_BYTES) -> list[str]:
    """text cut at line ends into pieces of at most about `size` characters (a longer line is one piece)."""
    pieces, cur, n = [], [], 0
    for line in text.splitlines(keepends=True):
        if cur and n + len(line) > size:
            pieces.append("".join(cur))
            cur, n = [], 0
        cur.append(line)
        n += len(line)
    if cur:
        pieces.append("".join(cur))
    return pieces


def local_corpus(work: Path, limit_mb: float) -> tuple[list[str], dict[str, Any]]:
    """The Python installation's text files as JSONL, tokenized by `lit-deepseek prepare-data`.

    Files are read in sorted path order, so taken whole they would make a stream that moves from
    one package to the next, and the loss of a 100-step window would say more about the files in
    it than about the recipe. Each file is therefore cut at line ends into pieces of about
    PIECE_BYTES, the pieces are shuffled once with a fixed seed (CORPUS_SEED, the same for every
    run and every training seed), and the shards are small (SHARD_TOKENS), so each step's batch mixes
    many files and the stream is stationary. Returns the fit arguments that point a run at its
    shards and the corpus' manifest."""
    paths = sysconfig.get_paths()
    files: set[str] = set()
    for root in {paths["stdlib"], paths["purelib"], sys.prefix}:
        for folder, _, names in os.walk(root):
            files.update(os.path.realpath(os.path.join(folder, n)) for n in names
                         if n.endswith((".py", ".rst", ".md", ".txt")))
    pieces, seen, size = [], set(), 0
    for path in sorted(files):
        if size >= limit_mb * 1e6:
            break
        try:
            data = Path(path).read_bytes()
            text = data.decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        digest = hashlib.sha256(data).digest()
        if not text.strip() or digest in seen:
            continue
        seen.add(digest)
        pieces += [p for p in text_pieces(text) if p.strip()]
        size += len(data)
    random.Random(CORPUS_SEED).shuffle(pieces)
    jsonl = work / "corpus-local.jsonl"
    with open(jsonl, "w", encoding="utf-8") as f:
        for piece in pieces:
            f.write(json.dumps({"text": piece}) + "\n")
    shards = work / "corpus-local"
    subprocess.run([sys.executable, "-m", "lit_deepseek", "prepare-data", "--inputs", str(jsonl), "--output",
                    str(shards), "--val_docs", "64", "--shard_tokens", str(SHARD_TOKENS), "--no_progress"],
                   cwd=work, check=True)
    manifest = json.loads((shards / "manifest.json").read_text())
    print(f"local corpus: {len(seen)} files, {size / 1e6:.1f} MB, {len(pieces):,} shuffled pieces, "
          f"{manifest['train']['tokens']:,} train tokens in {len(manifest['train']['shards'])} shards", flush=True)
    return ["--data.train_shards", str(shards / "train-*.tar"), "--data.val_shards", str(shards / "val-*.tar")], manifest


def conv_run(name: str, variant: str, seed: int, args: argparse.Namespace, work: Path,
             limit_s: float, data: list[str]) -> dict[str, Any]:
    """One convergence run for at most limit_s: then SIGTERM, the product's own stop (the step
    finishes, a checkpoint is saved), and a kill 120 s later. With --resume it continues from the
    run's `last` checkpoint, in the same MLflow run. Returns its train/loss from the first step."""
    cpu = args.device == "cpu"
    fp8, recipe, wgrad, experts = VARIANTS[variant]
    row = bench_fit.Row("demo" if cpu else "fp8conv", seq=64 if cpu else 1024, micro=2 if cpu else 32,
                        global_batch=4 if cpu else 64, precision="32-true" if cpu else "bf16-mixed",
                        compile=not cpu, fp8=fp8, fp8_recipe=recipe, expert_wgrad=wgrad, fp8_experts=experts,
                        checkpoint_every=2 if cpu else 100)
    run_dir = work / name
    resume = args.resume and any(run_dir.rglob("last.ckpt"))
    cmd = bench_fit.fit_command(row, run_dir, args.steps, 1) + (SMOKE if cpu else []) + [
        "--training.seed", str(seed), "--training.lr_warmup_steps", str(2 if cpu else 100),
        "--training.lr_schedule", "constant"] + data + (["--ckpt_path", "last"] if resume else [])
    print(f"[{name}] {'resuming' if resume else 'starting'} (time limit {limit_s:.0f}s)", flush=True)
    t0, error = time.time(), None
    with open(work / f"{name}.log", "a") as log:
        proc = subprocess.Popen(cmd, cwd=work, stdout=log, stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                error = f"killed {limit_s + 120:.0f}s after its start"
    if error is None and proc.returncode not in (0, 143):  # 143: stopped by SIGTERM with its checkpoint
        tail = (work / f"{name}.log").read_text(errors="replace").strip().splitlines()[-3:]
        error = f"exit {proc.returncode}: " + " | ".join(tail)
    out: dict[str, Any] = {"name": name, "wall_s": time.time() - t0, "run_dir": str(run_dir), "loss": []}
    try:
        out["loss"] = [m.value for m in bench_fit.metric_history(run_dir, ["train/loss"])["train/loss"]]
    except Exception as exc:  # noqa: BLE001 - report what is missing, keep the other runs
        error = error or f"{type(exc).__name__}: {exc}"
    if error:
        out["error"] = error
    print(f"[{name}] {len(out['loss'])} steps so far, {out['wall_s']:.0f}s this call"
          + (f"; error: {error}" if error else ""), flush=True)
    return out


def convergence(args: argparse.Namespace, out: Path, work: Path, deadline: float) -> list[str]:
    base = [(name, CONV_RUNS[name][0], args.seed_a if CONV_RUNS[name][1] == "a" else args.seed_b)
            for name in args.conv_runs.split(",")]
    # --replicates N: each run N times with the same seed and data (names NAME-r1 ... NAME-rN); GPU
    # kernels are not bitwise deterministic, so the same seed drifts apart over 1000 steps, and the
    # groups' means and spreads say how far a single pair of runs can be trusted
    runs, group_of = [], {}
    for i in range(1, args.replicates + 1):
        for name, *rest in base:
            run = name if args.replicates == 1 else f"{name}-r{i}"
            runs.append((run, *rest))
            group_of[run] = name
    results: dict[str, dict[str, Any]] = {}
    shards = work / "corpus-local"
    if args.corpus == "local" and args.resume and (shards / "manifest.json").exists():
        data = ["--data.train_shards", str(shards / "train-*.tar"), "--data.val_shards", str(shards / "val-*.tar")]
        manifest = json.loads((shards / "manifest.json").read_text())
    else:
        data, manifest = local_corpus(work, args.corpus_mb) if args.corpus == "local" else ([], None)
    if args.concurrent:  # all at once on the one device (small models leave it mostly idle)
        limit = min(args.conv_budget_s, deadline - time.time() - 60)
        with ThreadPoolExecutor(len(runs)) as pool:
            futures = {name: pool.submit(conv_run, name, variant, seed, args, work, limit, data)
                       for name, variant, seed in runs}
        results = {name: f.result() for name, f in futures.items()}
    else:
        share = args.conv_budget_s / len(runs)
        for name, variant, seed in runs:
            left = deadline - time.time()
            if left < 90:
                print(f"[{name}] skipped: benchmark budget spent", flush=True)
                continue
            results[name] = conv_run(name, variant, seed, args, work, min(share, left - 60), data)
    tokens = 4 * 64 if args.device == "cpu" else 64 * 1024
    common = min((len(r["loss"]) for r in results.values()), default=0)
    window = min(100, common)
    if manifest is None:  # the built-in corpus: the manifest that the first run wrote under its run directory
        found = sorted(work.glob("*/data/pydoc-topics-*/manifest.json"))
        manifest = json.loads(found[0].read_text()) if found else None
    if manifest:
        train = manifest["train"]["tokens"]
        corpus = (f"{args.corpus} corpus: {train:,} train tokens; {args.steps} steps x {tokens:,} tokens = "
                  f"{args.steps * tokens / train:.3g} epochs")
    else:
        corpus = f"{args.corpus} corpus: size unknown"
    lines = [f"## FP8 convergence ({common} common steps, {args.steps} asked, {tokens:,} tokens per step; final loss "
             f"= mean of the last {window}; {corpus})", "", "| run | steps done | final loss | vs BF16 seed A | wall s |",
             "| --- | --- | --- | --- | --- |"]
    finals = {name: final_loss(r["loss"][:common], window) if common else None for name, r in results.items()}
    groups = {name: [f for run, f in finals.items() if group_of.get(run) == name] for name, *_ in base}
    means = {name: sum(fs) / len(fs) if fs and None not in fs else None for name, fs in groups.items()}
    ref = means.get("bf16-seedA")
    for name, r in results.items():
        f = finals[name]
        gap = f"{100 * (f - ref) / ref:+.3f}%" if f is not None and ref else "-"
        shown = f"{f:.4f}" if f is not None else "failed: " + r.get("error", "")[:120]
        lines.append(f"| {name} | {len(r['loss'])} | {shown} | {gap} | {r['wall_s']:.0f} |")
    if args.replicates > 1:
        lines += ["", f"Means over {args.replicates} replicates (same seed, same data):", "",
                  "| run | final losses | mean | spread (max - min) / mean | mean vs BF16 seed A |",
                  "| --- | --- | --- | --- | --- |"]
        for name, fs in groups.items():
            m = means[name]
            if m is None:
                continue
            lines.append(f"| {name} | {', '.join(f'{f:.4f}' for f in fs)} | {m:.4f} | "
                         f"{100 * (max(fs) - min(fs)) / m:.3f}% | {100 * (m - ref) / ref:+.3f}% |")
    b = means.get("bf16-seedB")
    if ref and b is not None:
        noise = abs(b - ref) / ref
        what = "means of the replicates" if args.replicates > 1 else "one run each"
        lines += ["", f"Noise floor |BF16 B - BF16 A| / A ({what}): {100 * noise:.3f}%."]
        for name in (n for n in groups if n.startswith("fp8")):
            f = means.get(name)
            if f is not None:
                gap = abs(f - ref) / ref
                verdict = "met" if gap <= 0.005 and gap <= noise + 0.0025 else "not met"
                lines.append(f"{name}: |gap| {100 * gap:.3f}% (targets: <= 0.5%, <= noise + 0.25% = "
                             f"{100 * (noise + 0.0025):.3f}%): {verdict}.")
    first_a = runs[0][0]  # BF16 seed A (its first replicate)
    lines += window_table(results, first_a, common)
    done = {name: r for name, r in results.items() if len(r["loss"]) >= args.steps}
    if common < args.steps and first_a in done:  # the runs that reached the asked steps, there
        at = {name: final_loss(r["loss"][:args.steps], min(100, args.steps)) for name, r in done.items()}
        lines += ["", f"At step {args.steps} (runs that reached it; mean of its last {min(100, args.steps)} steps):", "",
                  f"| run | final loss | vs {first_a} |", "| --- | --- | --- |"]
        lines += [f"| {name} | {f:.4f} | {100 * (f - at[first_a]) / at[first_a]:+.3f}% |"
                  for name, f in at.items()]
    (out / "fp8_convergence.json").write_text(json.dumps(results))
    png = plot(results, out / "fp8_convergence.png")
    if png and args.device == "gpu":  # a CPU smoke leaves the committed curves alone
        (ROOT / "benchmarks" / "fp8_convergence.png").write_bytes(png.read_bytes())
    log_to_runs(results, "\n".join(lines), png)
    return lines


def window_table(results: dict[str, dict[str, Any]], ref: str, common: int, width: int = 100) -> list[str]:
    """Each run's mean loss per `width`-step window over the common steps, as a gap to `ref`: how far two BF16
    seeds swing apart along the way says what a single final-loss gap can resolve."""
    if ref not in results or common < 2 * width:
        return []
    names = list(results)
    lines = ["", f"Per {width}-step window, mean loss vs {ref}:", "",
             "| steps | " + " | ".join(names) + " |", "|" + " --- |" * (len(names) + 1)]
    for start in range(0, common - width + 1, width):
        means = {n: sum(results[n]["loss"][start:start + width]) / width for n in names}
        cells = [f"{means[ref]:.4f}" if n == ref else f"{100 * (means[n] - means[ref]) / means[ref]:+.2f}%"
                 for n in names]
        lines.append(f"| {start + 1}-{start + width} | " + " | ".join(cells) + " |")
    return lines


def plot(results: dict[str, dict[str, Any]], path: Path) -> Optional[Path]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG", flush=True)
        return None
    fig, ax = plt.subplots(figsize=(8, 5))
    tail: list[float] = []
    k = 1
    for name, r in results.items():
        loss = r["loss"]
        if not loss:
            continue
        k = max(1, min(20, len(loss) // 10))
        smooth = [sum(loss[max(0, i - k + 1):i + 1]) / len(loss[max(0, i - k + 1):i + 1]) for i in range(len(loss))]
        ax.plot(range(1, len(smooth) + 1), smooth, label=name, linewidth=1)
        tail += smooth[len(smooth) // 3:]
    if tail:
        ax.set_ylim(min(tail) * 0.98, max(tail) * 1.02)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"train/loss ({k}-step running mean)")
    ax.set_title("lit-deepseek fit: FP8 vs BF16 (same data)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"curves: {path}", flush=True)
    return path


def log_to_runs(results: dict[str, dict[str, Any]], table: str, png: Optional[Path]) -> None:
    """The table and the PNG as artifacts of every convergence run, in its own MLflow store."""
    from mlflow.tracking import MlflowClient

    for r in results.values():
        try:
            client = MlflowClient(tracking_uri=f"sqlite:///{Path(r['run_dir']) / 'mlflow.db'}")
            runs = [x for e in client.search_experiments() for x in client.search_runs([e.experiment_id])]
            if len(runs) != 1:
                continue
            client.log_text(runs[0].info.run_id, table, "fp8_convergence.md")
            if png:
                client.log_artifact(runs[0].info.run_id, str(png))
        except Exception as exc:  # noqa: BLE001 - the report on disk stays the result
            print(f"MLflow artifact logging failed for {r['name']}: {exc}", flush=True)


def speed(args: argparse.Namespace, out: Path, work: Path, deadline: float) -> list[str]:
    lines = [f"## FP8 speed (`lit-deepseek fit`, bf16-mixed, compile, {args.speed_steps} steps, "
             f"{args.warmup} warm-up)", "", "| config | run | tokens/s | MFU (989) | peak GiB | vs bf16 |",
             "| --- | --- | --- | --- | --- | --- |"]
    rows = []
    for config in args.speed_configs.split(","):
        base = None
        name, per_step = SPEED[config]
        micro = args.large_micro if config == "large" else per_step
        for variant in args.recipes.split(","):
            # -noreuse: LIT_DEEPSEEK_FP8_WEIGHT_CACHE=0; -nograph: no CUDA graphs
            spec = variant.removesuffix("-noreuse")
            fp8, recipe, wgrad, experts = VARIANTS[spec.removesuffix("-nograph")]
            row = bench_fit.Row(name, 4096, micro=micro, global_batch=per_step, fp8=fp8, fp8_recipe=recipe,
                                expert_wgrad=wgrad, fp8_experts=experts, graphs=not spec.endswith("-nograph"),
                                fp8_reuse=spec == variant)
            left = deadline - time.time()
            if left < 90:
                lines.append(f"| {config} | {row.name} | skipped (budget) | | | |")
                continue
            print(f"[{row.name}] starting", flush=True)
            try:
                r = bench_fit.run_product(row, args.speed_steps, args.warmup, work, min(args.run_limit_s, left - 30))
            except subprocess.TimeoutExpired:
                r = {"name": row.name, "error": "timed out"}
            rows.append(r)
            if "error" in r:
                lines.append(f"| {config} | {row.name} | error: {r['error'][:160]} | | | |")
                continue
            if variant == "bf16":
                base = r["tokens_per_s"]
            ratio = f"{r['tokens_per_s'] / base:.2f}x" if base else "-"
            lines.append(f"| {config} | {bench_fit.label(r)} | {r['tokens_per_s']:,.0f} | {100 * r['mfu']:.1f}% | "
                         f"{r['peak_gib']:.1f} | {ratio} |")
            print(lines[-1], flush=True)
    (out / "fp8_speed.json").write_text(json.dumps(rows))
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phases", default="convergence,speed", help="comma list: convergence, speed")
    ap.add_argument("--out", default="bench_fp8_out", help="folder for the report, JSON and PNG")
    ap.add_argument("--work", default="/tmp/bench_fp8", help="run directories (MLflow stores, logs)")
    ap.add_argument("--steps", type=int, default=1000, help="optimizer steps asked of each convergence run")
    ap.add_argument("--conv-budget-s", type=float, default=440,
                    help="training time of the four convergence runs together (an equal share each; "
                         "with --concurrent, the limit of each)")
    ap.add_argument("--concurrent", action="store_true",
                    help="run the four convergence runs at the same time on the one device")
    ap.add_argument("--replicates", type=int, default=1,
                    help="run each of the four convergence runs this many times (same seed and data) and compare "
                         "the means: one run per recipe cannot resolve a gap smaller than a same-seed rerun's drift")
    ap.add_argument("--conv-runs", default="bf16-seedA,bf16-seedB,fp8-blockwise,fp8-rowwise",
                    help=f"comma list of the convergence runs, of: {', '.join(CONV_RUNS)}")
    ap.add_argument("--seed-a", type=int, default=1234)
    ap.add_argument("--seed-b", type=int, default=4321)
    ap.add_argument("--speed-configs", default="small,large", help="comma list of: small, large")
    ap.add_argument("--recipes", default="bf16,fp8-blockwise,fp8-rowwise",
                    help=f"speed variants, of: {', '.join(VARIANTS)} (each also as NAME-nograph: without CUDA graphs; "
                         "an FP8 one also as NAME-noreuse or NAME-nograph-noreuse: LIT_DEEPSEEK_FP8_WEIGHT_CACHE=0)")
    ap.add_argument("--large-micro", type=int, default=4, choices=[1, 2, 4],
                    help="speed: micro-batch of the large config (4 x 4096 tokens per step either way); 4 needs "
                         "~98 GiB by `lit-deepseek summary`, so on an 80 GB card use 1")
    ap.add_argument("--speed-steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=4, help="speed: steps before timing starts")
    ap.add_argument("--run-limit-s", type=float, default=200, help="hard limit of one speed run")
    ap.add_argument("--budget-s", type=float, default=560,
                    help="seconds for the whole invocation: a speed run starts only with at least 90 s of them "
                         "left and is stopped 30 s before they end (a convergence run 60 s before); a speed "
                         "run of the large config takes about 90 s")
    ap.add_argument("--device", choices=["gpu", "cpu"], default="gpu", help="cpu: smoke test on the demo model")
    ap.add_argument("--corpus", choices=["local", "builtin"], default=None,
                    help="convergence data: this Python installation's text files (default on gpu) or the "
                         "built-in demo corpus (default on cpu)")
    ap.add_argument("--corpus-mb", type=float, default=120, help="size of the local corpus in MB of text")
    ap.add_argument("--resume", action="store_true",
                    help="continue the convergence runs of the newest folder under --work from their last "
                         "checkpoints (a convergence that needs more than one call)")
    args = ap.parse_args()
    unknown = [r for r in args.conv_runs.split(",") if r not in CONV_RUNS]
    if unknown:
        ap.error(f"--conv-runs: unknown {', '.join(unknown)}; runs: {', '.join(CONV_RUNS)}")
    if args.replicates < 1:
        ap.error(f"--replicates: at least 1, got {args.replicates}")
    args.corpus = args.corpus or ("builtin" if args.device == "cpu" else "local")
    out, work = Path(args.out).resolve(), Path(args.work).resolve() / time.strftime("%Y%m%d-%H%M%S")
    earlier = sorted(p for p in Path(args.work).resolve().glob("*") if p.is_dir())
    if args.resume and earlier:
        work = earlier[-1]
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    deadline = time.time() + args.budget_s
    report: list[str] = []
    phases = args.phases.split(",")
    if "convergence" in phases:
        report += convergence(args, out, work, deadline) + [""]
    if "speed" in phases:
        report += speed(args, out, work, deadline) + [""]
    text = "\n".join(report)
    (out / "bench_fp8.md").write_text(text)
    print(text, flush=True)


if __name__ == "__main__":
    main()
