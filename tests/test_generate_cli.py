"""`lit-deepseek generate` on checkpoints of a real `lit-deepseek fit` run: streaming, JSONL, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "cpu_demo.yaml")
FAST = ["--training.seq_length", "64", "--training.micro_batch_size", "2", "--training.global_batch_size", "4",
        "--training.val_every_n_steps", "2", "--training.val_batches", "1", "--logging.progress_bar", "false", "--logging.heatmap_every_n_steps",
        "0", "--logging.async_logging", "false", "--training.max_steps", "2", "--checkpoint.every_n_steps", "2",
        "--training.learning_rate", "0.03", "--training.lr_warmup_steps", "0", "--trainer.accelerator", "cpu"]

SAMPLE_PROMPTS = ["def main():", "The quick brown"]


def lit(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    return subprocess.run([sys.executable, "-m", "lit_deepseek", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("fit")
    proc = lit("fit", "--config", DEMO, *FAST, "--logging.run_dir", str(run / "run"), "--logging.sample_prompts",
               json.dumps(SAMPLE_PROMPTS), "--logging.sample_max_new_tokens", "16", cwd=run)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run / "run" / "checkpoints" / "last.ckpt").is_file()
    return run


def test_generate_streams_one_prompt_and_writes_jsonl_for_many(trained: Path, tmp_path: Path) -> None:
    from lit_deepseek.data.tokenizer import ByteTokenizer
    from lit_deepseek.generate import generate, load_for_generation
    from lit_deepseek.parallel.checkpoint import save_checkpoint

    ckpt = trained / "run" / "checkpoints" / "last.ckpt"
    prompt = "The Python "
    one = lit("generate", "--config", DEMO, "--ckpt_path", str(ckpt), "--prompt", prompt, "--max_new_tokens", "12",
              "--device", "cpu", cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    assert one.stdout.startswith(prompt)

    # the same weights through the Python API give the same text
    model, _ = load_for_generation([DEMO], str(ckpt))
    tok = ByteTokenizer()
    ids = torch.tensor([tok.encode(prompt)])
    out = generate(model, ids, 12, eos_id=tok.eos_id, pad_id=tok.pad_id)[0, ids.shape[1]:].tolist()
    expected = tok.decode([t for t in out if t not in (tok.eos_id, tok.pad_id)])
    assert one.stdout == prompt + expected + "\n"

    # a distributed checkpoint folder (the parallel strategy's format) of the same weights, prompts from a file
    folder = save_checkpoint(tmp_path / "dist", [model])
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("import os\n" + prompt + "\n\nclass A:\n", encoding="utf-8")
    jsonl = tmp_path / "out.jsonl"
    many = lit("generate", "--config", DEMO, "--ckpt_path", str(folder), "--prompts_file", str(prompts),
               "--max_new_tokens", "12", "--batch_size", "2", "--output", str(jsonl), "--device", "cpu",
               cwd=tmp_path)
    assert many.returncode == 0, many.stderr[-3000:]
    records = [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines()]
    assert [r["prompt"] for r in records] == ["import os", prompt, "class A:"]
    assert records[1]["completion"] == expected  # batched with other prompt lengths: same greedy text
    assert all(0 < r["new_tokens"] <= 12 or r["completion"] == "" for r in records)

    # sampling flags: a seeded top-k draw per prompt, printed as JSONL (several prompts)
    sampled = lit("generate", "--config", DEMO, "--ckpt_path", str(ckpt), "--prompts_file", str(prompts),
                  "--max_new_tokens", "8", "--temperature", "1.0", "--top_k", "20", "--top_p", "0.9", "--seed", "3",
                  "--ignore_eos", "--device", "cpu", cwd=tmp_path)
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    lines = [json.loads(line) for line in sampled.stdout.splitlines()]
    assert [r["new_tokens"] for r in lines] == [8, 8, 8]  # --ignore_eos: never stops early


@pytest.mark.parametrize("args,needle", [
    (["--prompt", "x"], "--ckpt_path is required"),
    (["--ckpt_path", "missing.ckpt", "--prompt", "x"], "missing.ckpt: no such checkpoint"),
    (["--ckpt_path", "last", "--logging.run_dir", "nowhere", "--prompt", "x"], "no such checkpoint"),
    (["--ckpt_path", "x.ckpt", "--prompt", "x", "--top_p", "0"], "--top_p"),
    (["--ckpt_path", "x.ckpt"], "no prompts"),
    (["--ckpt_path", "x.ckpt", "--prompt", "x", "--max_new_tokens", "5000"], "max_context_length"),
])
def test_bad_input_is_one_line_before_loading(tmp_path: Path, args: list[str], needle: str) -> None:
    (tmp_path / "x.ckpt").write_bytes(b"")
    proc = lit("generate", "--config", DEMO, *args, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("lit-deepseek: error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert needle in lines[0], lines[0]


def test_validation_samples_are_logged_to_mlflow(trained: Path, tmp_path: Path) -> None:
    import mlflow

    from lit_deepseek.data.tokenizer import ByteTokenizer
    from lit_deepseek.generate import generate, load_for_generation

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{trained / 'run' / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("cpu-demo").experiment_id])[0]
    files = [a.path for a in client.list_artifacts(run.info.run_id, "samples")]
    assert files == ["samples/step0000002.txt"], files
    text = Path(client.download_artifacts(run.info.run_id, files[0], str(tmp_path))).read_text(encoding="utf-8")
    # validation ran after the last step, so the logged samples are the final weights' greedy continuations
    model, _ = load_for_generation([DEMO], str(trained / "run" / "checkpoints" / "last.ckpt"))
    tok = ByteTokenizer()
    for prompt in SAMPLE_PROMPTS:
        ids = torch.tensor([tok.encode(prompt)])
        new = generate(model, ids, 16, eos_id=tok.eos_id)[0, ids.shape[1]:].tolist()
        new = new[:new.index(tok.eos_id)] if tok.eos_id in new else new
        assert f"{prompt}\n## continuation\n{tok.decode(new)}\n" in text + "\n"
