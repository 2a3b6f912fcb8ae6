"""Decoding on one GPU: decode-attention bandwidth, end-to-end `lit-deepseek generate` against
Hugging Face transformers, and what the FP8 latent cache costs in perplexity.

Phases (``--phases attention,generate,fp8``), each bounded by its own sizes:

* attention: the Triton split-KV kernel over a paged cache at V3's head shape (128 heads, latent
  512 + rope 64) for every batch x context, bf16 and FP8 cache; GB/s = cache bytes read / time, and
  the percentage of the bandwidth of a plain device copy (read + write) measured in the same run.
  A few launch settings are swept per shape (the best is reported, with its settings); FlashMLA is
  measured too when `flash_mla` imports. Each shape is checked against the PyTorch reference.
* generate: configs/deepseek_v3_small.yaml (one GPU, no MTP) with random-initialised weights
  saved as a Hugging Face directory; `lit-deepseek generate --model DIR --timing` (a subprocess:
  the product) against `DeepseekV3ForCausalLM.generate` (greedy, same weights, same prompts, bf16)
  at batch 1 and batch 64; new tokens per second after a warm-up.
* fp8: `lit-deepseek fit --config configs/cpu_demo.yaml` for a few hundred steps, then the
  perplexity of held-out text read through the decode path with the bf16 cache and the FP8 cache.
* speculative: the same trained demo model, greedy decoding at batch 1, plain against
  self-speculative decoding with its MTP module drafting one token; acceptance rate and tokens/s.

    python benchmarks/bench_generate.py --out $OUT                       # all phases, < 8 min on an H200
    python benchmarks/bench_generate.py --phases fp8,speculative --device cpu --fit_steps 150   # CPU

Writes a markdown table to stdout and to ``--out/bench_generate.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lit_deepseek.config import MLAConfig, load_config  # noqa: E402
from lit_deepseek.model.paged_cache import PagedLatentCache, quantize_entries  # noqa: E402

SWEEP = [  # (heads per program, tokens per tile, warps, pipeline stages); the first is KERNEL_CONFIG's
    {"block_h": 32, "block_n": 32, "num_warps": 8, "num_stages": 2},
    {"block_h": 32, "block_n": 32, "num_warps": 4, "num_stages": 2},
    {"block_h": 16, "block_n": 64, "num_warps": 4, "num_stages": 2},
    {"block_h": 32, "block_n": 64, "num_warps": 8, "num_stages": 2},
    {"block_h": 64, "block_n": 32, "num_warps": 8, "num_stages": 2},
    {"block_h": 64, "block_n": 64, "num_warps": 8, "num_stages": 1},
]


def lit(*args: str, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run([sys.executable, "-m", "lit_deepseek", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"lit-deepseek {args[0]} failed: {proc.stderr[-2000:]}")
    return proc


def cuda_time(fn: Any, iters: int) -> float:
    """Median seconds per call of fn over `iters` calls (CUDA events), after one warm-up call."""
    fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


# ------------------------------------------------------------------------------------ attention
def copy_bandwidth(gib: float = 4.0) -> float:
    """Bytes per second of a device-to-device copy (bytes read + bytes written)."""
    src = torch.empty(int(gib * 2**30) // 2, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    seconds = cuda_time(lambda: dst.copy_(src), 10)
    return 2 * src.numel() * src.element_size() / seconds


def filled_cache(batch: int, context: int, fp8: bool) -> PagedLatentCache:
    """A one-layer paged cache of `context` random tokens per sequence at V3's latent shape."""
    mla = MLAConfig(d_model=7168, d_latent=512, num_heads=128, qk_nope_head_dim=128, qk_rope_head_dim=64,
                    v_head_dim=128, max_context_length=context + 1)
    cache = PagedLatentCache(mla, 1, [context + 1] * batch, dtype=torch.bfloat16, device="cuda", fp8=fp8)
    entries = cache.kv[0]
    for i in range(0, entries.shape[0], 1024):  # block by block: bounded temporary memory
        part = torch.randn(entries[i:i + 1024].shape, device="cuda", dtype=torch.bfloat16)
        if fp8:
            q, s = quantize_entries(part, 512)
            entries[i:i + 1024], cache.scale[0][i:i + 1024] = q, s
        else:
            entries[i:i + 1024] = part
    cache.advance(context)
    return cache


def measure_shape(batch: int, context: int, fp8: bool, args: argparse.Namespace, copy: float) -> list[dict[str, Any]]:
    from lit_deepseek.kernels import decode_attention as da

    cache = filled_cache(batch, context, fp8)
    gen = torch.Generator(device="cuda").manual_seed(0)
    q_lat = torch.randn(batch, 1, 128, 512, device="cuda", dtype=torch.bfloat16, generator=gen)
    q_rope = torch.randn(batch, 1, 128, 64, device="cuda", dtype=torch.bfloat16, generator=gen)
    scale = 192 ** -0.5
    per_token = 576 * cache.kv.element_size() + (8 if fp8 else 0)  # latent + rope (+ 2 float32 scales)
    bytes_read = batch * context * per_token
    q = torch.cat((q_lat, q_rope), dim=-1).reshape(batch, 128, 576)
    row_seq = torch.arange(batch, device="cuda", dtype=torch.int32)
    row_len = torch.full((batch,), context, device="cuda", dtype=torch.int32)

    def run(setting: dict) -> torch.Tensor:
        return da.decode_attention_kernel(q, cache.kv[0], cache.scale[0] if fp8 else None, cache.block_table,
                                          row_seq, row_len, 512, scale, max_len=context, **setting)

    best = None
    for setting in SWEEP if args.sweep else [da.KERNEL_CONFIG]:
        try:
            seconds = cuda_time(lambda setting=setting: run(setting), args.iters)
        except Exception as exc:  # a setting the compiler rejects (shared memory): skip it
            print(f"  setting {setting} failed: {str(exc).splitlines()[0][:120]}", flush=True)
            continue
        if best is None or seconds < best[0]:
            best = (seconds, setting)
    if best is None:
        return []
    seconds, setting = best
    # correctness at this shape against the PyTorch reference (the first 4 sequences)
    out = run(setting)[:4].float()
    small = PagedLatentCache(cache.mla, 1, [context + 1] * 4, dtype=torch.bfloat16, device="cuda", fp8=fp8)
    small.kv[0].copy_(cache.kv[0][: small.num_blocks])
    if fp8:
        small.scale[0].copy_(cache.scale[0][: small.num_blocks])
    small.advance(context - 1)  # the reference attends over lengths + 1 positions (its query's own token)
    ref = small[0].attend_reference(q_lat[:4].float(), q_rope[:4].float(), scale)[:, 0]
    row = {"kernel": "triton", "cache": "fp8" if fp8 else "bf16", "batch": batch, "context": context,
           "us": seconds * 1e6, "gb_s": bytes_read / seconds / 1e9, "pct_copy": 100 * bytes_read / seconds / copy,
           "setting": setting, "max_rel_err": ((out - ref).abs().max() / ref.abs().max()).item()}
    rows = [row]
    if da.flash_mla_available() and not fp8:
        fm = cuda_time(lambda: da.flash_mla_attention(cache[0], q_lat, q_rope, scale), args.iters)
        rows.append({**row, "kernel": "flash_mla", "us": fm * 1e6, "gb_s": bytes_read / fm / 1e9,
                     "pct_copy": 100 * bytes_read / fm / copy, "setting": {}, "max_rel_err": float("nan")})
    return rows


def attention_phase(args: argparse.Namespace) -> list[dict[str, Any]]:
    copy = copy_bandwidth()
    torch.cuda.empty_cache()
    print(f"device copy: {copy / 1e9:.0f} GB/s (read + write)", flush=True)
    rows = []
    deadline = time.perf_counter() + args.attention_budget_s
    for fp8 in (False, True):
        for batch in args.batches:
            for context in args.contexts:
                if time.perf_counter() > deadline:
                    print(f"attention: time budget reached, skipping batch {batch} context {context}", flush=True)
                    continue
                for row in measure_shape(batch, context, fp8, args, copy):
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------------------------ end to end
def generate_phase(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    import transformers

    from lit_deepseek.checkpoint.hf import save_hf_model
    from lit_deepseek.model import DeepSeekV3

    cfg = load_config(ROOT / "configs" / "deepseek_v3_small.yaml",
                      overrides={"parallel.expert_parallel_size": 1, "model.mtp_depth": 0}).model
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = DeepSeekV3(cfg)
    model_dir = work / "small_hf"
    save_hf_model(model.to(torch.bfloat16), model_dir)
    del model
    torch.cuda.empty_cache()
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda().eval()
    rows = []
    text = "The history of the city begins with a small settlement by the river, "
    for batch in args.gen_batches:
        prompts = [f"{i:04d} " + text[: args.prompt_chars - 5] for i in range(batch)]  # equal byte lengths
        file = work / f"prompts{batch}.txt"
        file.write_text("\n".join(prompts) + "\n", encoding="utf-8")
        proc = lit("generate", "--model", str(model_dir), "--prompts_file", str(file), "--batch_size", str(batch),
                   "--max_new_tokens", str(args.new_tokens), "--ignore_eos", "--timing", "--output",
                   str(work / f"out{batch}.jsonl"), cwd=work, timeout=300)
        ours = json.loads(proc.stderr.strip().splitlines()[-1])
        ids = torch.tensor([list(p.encode()) for p in prompts], device="cuda")

        def hf_generate(n: int, ids: torch.Tensor = ids) -> torch.Tensor:
            return hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                               min_new_tokens=n, pad_token_id=0, eos_token_id=None)

        with torch.no_grad():
            hf_generate(2)
            torch.cuda.synchronize()
            start = time.perf_counter()
            out = hf_generate(args.new_tokens)
            torch.cuda.synchronize()
            hf_seconds = time.perf_counter() - start
        hf_tps = batch * args.new_tokens / hf_seconds
        ours_text = [json.loads(line)["completion"] for line in (work / f"out{batch}.jsonl").read_text().splitlines()]
        hf_text = [bytes(t for t in row[ids.shape[1]:].tolist() if t < 256).decode("utf-8", "replace") for row in out]
        agree = sum(a == b for a, b in zip(ours_text, hf_text, strict=True)) / batch
        row = {"batch": batch, "new_tokens": args.new_tokens, "ours_tok_s": ours["tokens_per_s"],
               "hf_tok_s": hf_tps, "speedup": ours["tokens_per_s"] / hf_tps, "same_text": agree}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


# ------------------------------------------------------------------------------------ FP8 perplexity
def demo_checkpoint(args: argparse.Namespace, work: Path) -> tuple[str, str]:
    """(config, checkpoint) of configs/cpu_demo.yaml trained by `lit-deepseek fit` (once per invocation)."""
    demo = str(ROOT / "configs" / "cpu_demo.yaml")
    run_dir = work / "demo_run"
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    if not ckpt.is_file():
        accel = "gpu" if args.device == "cuda" else "cpu"
        lit("fit", "--config", demo, "--training.max_steps", str(args.fit_steps), "--training.val_every_n_steps",
            "100000", "--checkpoint.every_n_steps", str(args.fit_steps), "--logging.run_dir", str(run_dir),
            "--logging.progress_bar", "false", "--logging.heatmap_every_n_steps", "0", "--trainer.accelerator",
            accel, "--trainer.devices", "1", *args.fit_args.split(), cwd=work, timeout=args.fit_timeout_s)
    return demo, str(ckpt)


def fp8_phase(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    from lit_deepseek.data.datamodule import DeepSeekDataModule
    from lit_deepseek.generate import cached_perplexity, load_for_generation

    demo, ckpt = demo_checkpoint(args, work)
    cfg = load_config(demo)
    cfg.data.cache_dir = str(work / ".lit_deepseek_data")  # the corpus the fit run wrote
    data = DeepSeekDataModule(cfg.data, seq_length=args.ppl_seq, micro_batch_size=args.ppl_batch,
                              global_batch_size=args.ppl_batch, seed=0, val_batches=args.ppl_batches)
    data.prepare_data()
    data.setup("validate")
    batches = [b["input_ids"] for _, b in zip(range(args.ppl_batches), data.val_dataloader(), strict=False)]
    ids = torch.cat([b.reshape(-1, args.ppl_seq) for b in batches]).to(args.device)
    rows = []
    for dtype in ([torch.bfloat16, torch.float32] if args.device == "cuda" else [torch.float32]):
        model, _ = load_for_generation([demo], ckpt, device=args.device, dtype=dtype)
        full = cached_perplexity(model, ids, chunk=args.ppl_chunk)
        fp8 = cached_perplexity(model, ids, chunk=args.ppl_chunk, use_fp8_kv=True)
        row = {"model_dtype": str(dtype).removeprefix("torch."), "tokens": ids.numel(), "ppl_cache": full,
               "ppl_fp8_cache": fp8, "diff_pct": 100 * (fp8 / full - 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


# ------------------------------------------------------------------------------------ speculative decoding
def speculative_phase(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    """Greedy decoding of the trained demo model (batch 1) plain vs self-speculative with its MTP module."""
    from lit_deepseek.data.tokenizer import ByteTokenizer
    from lit_deepseek.generate import generate, generate_speculative, load_for_generation

    demo, ckpt = demo_checkpoint(args, work)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model, _ = load_for_generation([demo], ckpt, device=args.device, dtype=dtype)
    tok = ByteTokenizer()
    prompts = ["def __init__(self", "The module provides", "import os\nimport sys\n", "Return the number of"]
    n = args.spec_tokens

    def timed(fn: Any) -> tuple[float, Any]:
        if args.device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if args.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, out

    rows = []
    for graph in ([True, False] if args.device == "cuda" else [False]):
        plain_s, spec_s, acceptance, same = 0.0, 0.0, [], 0
        for prompt in prompts:
            ids = torch.tensor([tok.encode(prompt)], device=args.device)
            generate(model, ids, 4, cuda_graph=graph)  # warm-up
            generate_speculative(model, ids, 4)
            t_plain, plain = timed(lambda ids=ids, graph=graph: generate(model, ids, n, cuda_graph=graph))
            t_spec, (spec, stats) = timed(lambda ids=ids: generate_speculative(model, ids, n))
            plain_s, spec_s = plain_s + t_plain, spec_s + t_spec
            acceptance.append(stats["acceptance"])
            same += int(torch.equal(plain, spec))
        row = {"plain": "CUDA graph" if graph else "eager", "new_tokens": n * len(prompts),
               "plain_tok_s": n * len(prompts) / plain_s, "spec_tok_s": n * len(prompts) / spec_s,
               "acceptance": sum(acceptance) / len(acceptance), "same_tokens": same / len(prompts)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


# ------------------------------------------------------------------------------------ report
def markdown(results: dict[str, list[dict[str, Any]]], env: str) -> str:
    out = [f"## bench_generate ({env})", ""]
    if results.get("attention"):
        out += ["| kernel | cache | batch | context | time (us) | GB/s | % of copy | setting | max rel err |",
                "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in results["attention"]:
            s = r["setting"]
            setting = f"h{s['block_h']} n{s['block_n']} w{s['num_warps']} s{s['num_stages']}" if s else ""
            out.append(f"| {r['kernel']} | {r['cache']} | {r['batch']} | {r['context']} | {r['us']:.0f} | "
                       f"{r['gb_s']:.0f} | {r['pct_copy']:.0f}% | {setting} | {r['max_rel_err']:.1e} |")
        out.append("")
    if results.get("generate"):
        out += ["| batch | new tokens | lit-deepseek generate tok/s | HF generate tok/s | speedup | same greedy text |",
                "| --- | --- | --- | --- | --- | --- |"]
        for r in results["generate"]:
            out.append(f"| {r['batch']} | {r['new_tokens']} | {r['ours_tok_s']:.0f} | {r['hf_tok_s']:.0f} | "
                       f"{r['speedup']:.2f}x | {100 * r['same_text']:.0f}% |")
        out.append("")
    if results.get("fp8"):
        out += ["| model dtype | held-out tokens | ppl (cache in model dtype) | ppl (FP8 cache) | difference |",
                "| --- | --- | --- | --- | --- |"]
        for r in results["fp8"]:
            out.append(f"| {r['model_dtype']} | {r['tokens']} | {r['ppl_cache']:.4f} | {r['ppl_fp8_cache']:.4f} | "
                       f"{r['diff_pct']:+.3f}% |")
        out.append("")
    if results.get("speculative"):
        out += ["| plain decoding | new tokens | plain tok/s | MTP self-speculative tok/s | draft acceptance | "
                "identical output |", "| --- | --- | --- | --- | --- | --- |"]
        for r in results["speculative"]:
            out.append(f"| {r['plain']} | {r['new_tokens']} | {r['plain_tok_s']:.0f} | {r['spec_tok_s']:.0f} | "
                       f"{100 * r['acceptance']:.0f}% | {100 * r['same_tokens']:.0f}% |")
        out.append("")
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--phases", default="attention,generate,fp8,speculative")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batches", type=int, nargs="+", default=[64, 128])
    p.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384, 32768])
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--no_sweep", dest="sweep", action="store_false", help="only the default kernel settings")
    p.add_argument("--attention_budget_s", type=float, default=150)
    p.add_argument("--gen_batches", type=int, nargs="+", default=[1, 64])
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--prompt_chars", type=int, default=64)
    p.add_argument("--fit_steps", type=int, default=200)
    p.add_argument("--fit_timeout_s", type=float, default=240)
    p.add_argument("--fit_args", default="", help="extra `lit-deepseek fit` flags, e.g. '--training.seq_length 64'")
    p.add_argument("--ppl_seq", type=int, default=512)
    p.add_argument("--ppl_batch", type=int, default=8)
    p.add_argument("--ppl_batches", type=int, default=4)
    p.add_argument("--ppl_chunk", type=int, default=64)
    p.add_argument("--spec_tokens", type=int, default=128, help="new tokens per prompt (speculative phase)")
    p.add_argument("--out", default=None, help="folder for bench_generate.md (default: print only)")
    args = p.parse_args()
    phases = [x.strip() for x in args.phases.split(",") if x.strip()]
    if args.device != "cuda" and set(phases) & {"attention", "generate"}:
        p.error("the attention and generate phases need a CUDA GPU; use --phases fp8,speculative on CPU")
    results: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_generate_") as tmp:
        work = Path(tmp)
        for phase in phases:
            start = time.perf_counter()
            if phase == "attention":
                results[phase] = attention_phase(args)
            elif phase == "generate":
                results[phase] = generate_phase(args, work)
            elif phase == "fp8":
                results[phase] = fp8_phase(args, work)
            elif phase == "speculative":
                results[phase] = speculative_phase(args, work)
            else:
                p.error(f"unknown phase {phase}")
            print(f"phase {phase}: {time.perf_counter() - start:.0f} s", flush=True)
    env = f"torch {torch.__version__}"
    if torch.cuda.is_available():
        env += f", {torch.cuda.get_device_name()}"
    text = markdown(results, env)
    print(text)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "bench_generate.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
