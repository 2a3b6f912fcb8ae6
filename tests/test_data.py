"""Data pipeline on real shards on disk: prepare-data, packing, DP slicing, resume, bad input, tokenizers."""

from __future__ import annotations

import gzip
import json
import logging
import multiprocessing as mp
import random
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from lit_deepseek.config import ConfigError, DataConfig
from lit_deepseek.data.corpus import ensure_default_corpus
from lit_deepseek.data.datamodule import DeepSeekDataModule
from lit_deepseek.data.prepare import prepare_data, prepare_data_cli
from lit_deepseek.data.tokenizer import ByteTokenizer, load_tokenizer

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()
EOS = ByteTokenizer.eos_id


def random_doc(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 120)))


def write_inputs(root: Path, rng: random.Random) -> list[str]:
    """Ten .txt files, two .jsonl files (one gzipped) and a three-row-group parquet file; returns all texts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs: list[str] = []
    (root / "txt").mkdir(parents=True)
    for i in range(10):
        text = random_doc(rng) + " ünïcode"
        (root / "txt" / f"doc{i}.txt").write_text(text, encoding="utf-8")
        docs.append(text)
    for j in range(2):
        lines = []
        for _ in range(15):
            text = random_doc(rng)
            lines.append(json.dumps({"text": text, "other": 1}))
            docs.append(text)
        body = "\n".join(lines) + "\n\n"
        if j == 0:
            (root / f"part{j}.jsonl").write_text(body)
        else:
            with gzip.open(root / f"part{j}.jsonl.gz", "wt", encoding="utf-8") as f:
                f.write(body)
    texts = [random_doc(rng) for _ in range(20)]
    pq.write_table(pa.table({"text": texts, "id": list(range(20))}), root / "data.parquet", row_group_size=7)
    docs.extend(texts)
    return docs


def read_shard(path: Path) -> list[np.ndarray]:
    """Samples of a shard read with the standard library (independent of the pipeline's reader)."""
    out = []
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            dtype = "<u2" if member.name.endswith(".u16") else "<u4"
            out.append(np.frombuffer(tar.extractfile(member).read(), dtype=dtype))
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("corpus")
    docs = write_inputs(root, random.Random(0))
    prepare_data([str(root / "txt" / "*.txt"), str(root / "*.jsonl*"), str(root / "*.parquet")], root / "shards",
                 shard_tokens=1500, val_fraction=0.1, progress=False)
    return root / "shards", docs


def make_dm(folder: Path, seq_length: int = 32, micro: int = 2, global_batch: int = 8, seed: int = 7,
            dp: tuple[int, int] | None = (0, 1), batch_per_step: bool = False, **data_kw: object) -> DeepSeekDataModule:
    """A DataModule over `folder`'s shards; items are micro-batches unless batch_per_step."""
    data = DataConfig(train_shards=str(folder / "train-*.tar"), val_shards=str(folder / "val-*.tar"), **data_kw)
    dm = DeepSeekDataModule(data, seq_length=seq_length, micro_batch_size=micro, global_batch_size=global_batch,
                            seed=seed, val_batches=4, batch_per_step=batch_per_step)
    if dp is not None:
        dm.set_data_parallel(*dp)
    return dm


def items(dm: DeepSeekDataModule, n: int, loader: bool = False) -> list[dict[str, torch.Tensor]]:
    source = dm.train_dataloader() if loader else dm.train_dataset()
    it = iter(source)
    return [next(it) for _ in range(n)]


def global_batches(folder: Path, dp_size: int, steps: int, **kw: object) -> list[torch.Tensor]:
    """Rows of each global batch, gathered from every data-parallel rank's items in (rank, micro-step) order."""
    per_rank = []
    for rank in range(dp_size):
        dm = make_dm(folder, dp=(rank, dp_size), **kw)
        per_rank.append((dm.accumulation_steps, items(dm, steps * dm.accumulation_steps)))
    out = []
    for k in range(steps):
        rows = [item["input_ids"] for a, its in per_rank for item in its[k * a:(k + 1) * a]]
        out.append(torch.cat(rows))
    return out


# --------------------------------------------------------------------------------------------
# prepare-data
# --------------------------------------------------------------------------------------------


def test_prepare_data_manifest_counts_match_shards(shards: tuple[Path, list[str]]) -> None:
    folder, docs = shards
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["total_docs"] == len(docs) == 60
    assert manifest["val"]["docs"] == 6 and len(manifest["train"]["shards"]) > 3
    decoded = []
    for split in ("train", "val"):
        for entry in manifest[split]["shards"]:
            samples = read_shard(folder / entry["path"])
            assert entry["docs"] == len(samples)
            assert entry["tokens"] == sum(s.size for s in samples)
            assert entry["bytes"] == (folder / entry["path"]).stat().st_size
            decoded += [bytes(s.astype(np.uint8)).decode("utf-8") for s in samples]
    assert Counter(decoded) == Counter(docs)
    assert manifest["total_tokens"] == sum(len(d.encode("utf-8")) for d in docs)
    assert manifest["tokenizer"]["kind"] == "bytes"


def test_prepare_data_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_inputs(tmp_path / "in", random.Random(1))
    out = tmp_path / "out"
    rc = prepare_data_cli(["--inputs", str(tmp_path / "in" / "*.jsonl"), "--output", str(out), "--val_fraction", "0",
                           "--shard_tokens", "100000", "--no_progress"])
    assert rc == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["train"]["docs"] == 15 and manifest["val"]["docs"] == 0
    assert prepare_data_cli(["--inputs", str(tmp_path / "missing*.txt"), "--output", str(tmp_path / "o2")]) == 2
    assert "--inputs: no files match" in capsys.readouterr().err
    assert prepare_data_cli(["--inputs", str(tmp_path / "in" / "*.jsonl"), "--output", str(out)]) == 2
    assert "already holds shards" in capsys.readouterr().err
    rc = prepare_data_cli(["--inputs", str(tmp_path / "in" / "*.parquet"), "--output", str(tmp_path / "o3"),
                           "--text_field", "body"])
    assert rc == 2 and "--text_field" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# packing
# --------------------------------------------------------------------------------------------


def test_packing_covers_every_shard_once_per_epoch_with_eos(shards: tuple[Path, list[str]]) -> None:
    folder, _ = shards
    S = 32
    train = sorted(folder.glob("train-*.tar"))
    shard_streams = {p.name: np.concatenate([np.append(s.astype(np.int64), EOS) for s in read_shard(p)]) for p in train}
    epoch_tokens = sum(v.size for v in shard_streams.values())
    n_seq = 2 * epoch_tokens // S + 8
    dm = make_dm(folder, seq_length=S, micro=2, global_batch=2)
    its = items(dm, n_seq // 2)
    inputs = torch.cat([b["input_ids"] for b in its])
    labels = torch.cat([b["labels"] for b in its])
    assert torch.equal(inputs[:, 1:], labels[:, :-1])
    assert torch.equal(inputs[1:, 0], labels[:-1, -1])  # neighbours share one token
    stream = torch.cat([inputs.reshape(-1), labels[-1, -1:]]).numpy()
    orders = []
    pos = 0
    for _ in range(2):  # two epochs: each a permutation of the shards
        remaining = dict(shard_streams)
        order = []
        while remaining:
            name = next(n for n, toks in remaining.items() if np.array_equal(stream[pos:pos + toks.size], toks))
            pos += remaining.pop(name).size
            order.append(name)
        orders.append(order)
    assert orders[0] != orders[1]  # a new shard order each epoch


def test_doc_ids_restart_after_eos(shards: tuple[Path, list[str]]) -> None:
    folder, _ = shards
    dm = make_dm(folder, seq_length=64, document_mask=True)
    for b in items(dm, 12):
        ids, doc = b["input_ids"], b["doc_ids"]
        assert doc.shape == ids.shape and (doc[:, 0] == 0).all()
        assert torch.equal(doc[:, 1:] - doc[:, :-1], (ids[:, :-1] == EOS).long())
    assert "doc_ids" not in items(make_dm(folder), 1)[0]


# --------------------------------------------------------------------------------------------
# one global order
# --------------------------------------------------------------------------------------------


def test_data_parallel_slices_tile_the_global_batch(shards: tuple[Path, list[str]]) -> None:
    folder, _ = shards
    reference = global_batches(folder, 1, steps=4)
    for dp_size in (2, 4):
        got = global_batches(folder, dp_size, steps=4)
        for k in range(4):
            assert Counter(map(tuple, got[k].tolist())) == Counter(map(tuple, reference[k].tolist()))
            assert torch.equal(got[k], reference[k])  # rank-major, micro-step-minor layout
    with pytest.raises(ConfigError, match="training.global_batch_size"):
        make_dm(folder, micro=2, global_batch=8, dp=(0, 3))


def test_data_parallel_slice_from_the_strategy_overrides_the_trainer(shards: tuple[Path, list[str]]) -> None:
    from types import SimpleNamespace

    folder, _ = shards
    dm = make_dm(folder, dp=None, batch_per_step=True)
    assert dm.data_parallel == (0, 1)
    dm.trainer = SimpleNamespace(global_rank=5, world_size=8, global_step=0)
    assert dm.data_parallel == (5, 8)  # plain data parallelism: every process reads its own slice
    dm.set_data_parallel(1, 2)  # what the parallel strategy calls with its layout's dp_ep coordinates
    assert dm.data_parallel == (1, 2) and dm.accumulation_steps == 2
    step = items(dm, 1)[0]["input_ids"]
    assert torch.equal(step, global_batches(folder, 1, steps=1)[0][4:])  # rank 1's half of the global batch


def test_batch_per_step_equals_concatenated_micro_batches(shards: tuple[Path, list[str]]) -> None:
    folder, _ = shards
    for rank in range(2):
        micro = items(make_dm(folder, dp=(rank, 2)), 6)
        steps = items(make_dm(folder, dp=(rank, 2), batch_per_step=True), 3)
        for k in range(3):
            assert torch.equal(steps[k]["input_ids"], torch.cat([b["input_ids"] for b in micro[2 * k:2 * k + 2]]))


def test_seed_determinism_and_workers(shards: tuple[Path, list[str]]) -> None:
    folder, _ = shards
    a = torch.cat([b["input_ids"] for b in items(make_dm(folder, seed=3), 40)])
    b = torch.cat([b["input_ids"] for b in items(make_dm(folder, seed=3, num_workers=2), 40, loader=True)])
    c = torch.cat([b["input_ids"] for b in items(make_dm(folder, seed=4), 40)])
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


# --------------------------------------------------------------------------------------------
# exact resume
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dp_before,dp_after", [(1, 1), (2, 4), (4, 1)])
def test_resume_continues_with_the_next_global_batch(shards: tuple[Path, list[str]], dp_before: int,
                                                    dp_after: int) -> None:
    folder, _ = shards
    steps_before = 7  # far enough to skip whole shards on resume
    reference = global_batches(folder, 1, steps=steps_before + 2)
    dm = make_dm(folder, dp=(0, dp_before))
    items(dm, 3 * dm.accumulation_steps)  # prefetching more than was trained on must not matter
    dm.on_steps_consumed(steps_before)
    state = dm.state_dict()
    assert state["consumed_tokens"] == steps_before * 8 * 32
    resumed = []
    for rank in range(dp_after):
        fresh = make_dm(folder, dp=(rank, dp_after))
        fresh.load_state_dict(state)
        resumed.append((fresh.accumulation_steps, items(fresh, 2 * fresh.accumulation_steps)))
    for k in range(2):
        rows = torch.cat([it["input_ids"] for a, its in resumed for it in its[k * a:(k + 1) * a]])
        assert torch.equal(rows, reference[steps_before + k])


def test_resume_without_manifest_reads_the_same_stream(shards: tuple[Path, list[str]], tmp_path: Path) -> None:
    folder, _ = shards
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    (copy / "manifest.json").unlink()
    state = {"consumed_tokens": 12 * 8 * 32, "global_step": 12, "seed": 7}
    out = []
    for f in (folder, copy):
        dm = make_dm(f)
        dm.load_state_dict(state)
        out.append(torch.cat([b["input_ids"] for b in items(dm, 8)]))
    assert torch.equal(out[0], out[1])


class _Recorder:
    """A tiny LightningModule factory that records the rows it trains on."""

    @staticmethod
    def build():
        import lightning.pytorch as pl

        class Recorder(pl.LightningModule):
            def __init__(self) -> None:
                super().__init__()
                self.emb = torch.nn.Embedding(258, 4)
                self.seen: list[torch.Tensor] = []

            def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
                self.seen.append(batch["input_ids"].clone())
                return self.emb(batch["input_ids"]).mean()

            def configure_optimizers(self) -> torch.optim.Optimizer:
                return torch.optim.SGD(self.parameters(), lr=0.1)

        return Recorder()


def test_lightning_checkpoint_resume_is_exact(shards: tuple[Path, list[str]], tmp_path: Path) -> None:
    import lightning.pytorch as pl

    folder, _ = shards

    def fit(max_steps: int, ckpt: str | None = None, save: str | None = None) -> list[torch.Tensor]:
        module = _Recorder.build()
        dm = make_dm(folder, dp=None, num_workers=1)  # the trainer's rank and world size
        trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, accumulate_grad_batches=4,
                             logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, limit_val_batches=0)
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt)
        if save:
            trainer.save_checkpoint(save)
        return module.seen

    whole = fit(5)
    ckpt = str(tmp_path / "step3.ckpt")
    first = fit(3, save=ckpt)
    assert torch.load(ckpt, weights_only=False)["DeepSeekDataModule"]["consumed_tokens"] == 3 * 8 * 32
    second = fit(5, ckpt=ckpt, save=str(tmp_path / "step5.ckpt"))
    assert len(whole) == 5 * 4 and len(first) == 3 * 4
    assert torch.equal(torch.cat(first + second), torch.cat(whole))
    state = torch.load(tmp_path / "step5.ckpt", weights_only=False)["DeepSeekDataModule"]
    assert state["consumed_tokens"] == 5 * 8 * 32 and state["global_step"] == 5


def _ddp_rank_batches(rank: int, world_size: int, folder: str) -> list[torch.Tensor]:
    """One rank of a real 2-process DDP Trainer (gloo): the step batches its training_step received."""
    import lightning.pytorch as pl

    module = _Recorder.build()
    dm = make_dm(Path(folder), dp=None, batch_per_step=True)  # layout from the trainer
    trainer = pl.Trainer(accelerator="cpu", devices=world_size, strategy="ddp", max_steps=3, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    return module.seen


@pytest.mark.timeout(180)
def test_ddp_ranks_tile_the_global_batch(shards: tuple[Path, list[str]]) -> None:
    from dist_utils import run_distributed

    folder, _ = shards
    per_rank = run_distributed(_ddp_rank_batches, 2, str(folder), timeout_s=150, init_process_group=False)
    reference = global_batches(folder, 1, steps=3)
    assert [len(r) for r in per_rank] == [3, 3]
    for k in range(3):
        assert per_rank[0][k].shape == (4, 32)
        assert torch.equal(torch.cat([per_rank[0][k], per_rank[1][k]]), reference[k])


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_corrupt_shards_are_skipped_counted_and_never_hang(shards: tuple[Path, list[str]], tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    folder, _ = shards
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    truncated = bad / "train-000001.tar"
    truncated.write_bytes(truncated.read_bytes()[:700])  # cut inside the second member
    (bad / "train-000002.tar").write_bytes(b"\x00garbage" * 300)
    caplog.set_level(logging.WARNING)
    dm = make_dm(bad, num_workers=2)
    batches = items(dm, 300, loader=True)  # several epochs
    assert len(batches) == 300
    assert dm.skipped_shards == 2
    messages = " ".join(r.getMessage() for r in caplog.records) if caplog.records else ""
    dm0 = make_dm(bad)
    items(dm0, 300)
    messages += " ".join(r.getMessage() for r in caplog.records)
    assert "train-000001.tar" in messages and "train-000002.tar" in messages
    assert dm0.skipped_shards == 2


def test_no_shards_and_vocab_errors(tmp_path: Path, shards: tuple[Path, list[str]]) -> None:
    pattern = str(tmp_path / "none-{000..003}.tar")
    dm = DeepSeekDataModule(DataConfig(train_shards=pattern), seq_length=8, micro_batch_size=1, global_batch_size=1)
    with pytest.raises(ConfigError, match=r"data\.train_shards: no shards match .*none-"):
        dm.setup()
    folder, _ = shards
    dm = make_dm(folder)
    dm.check_vocab(258)
    with pytest.raises(ConfigError, match=r"data\.tokenizer: .*258.*model\.vocab_size \(100\)"):
        dm.check_vocab(100)


def test_validation_is_fixed_and_split_over_ranks(shards: tuple[Path, list[str]]) -> None:
    folder, _ = shards
    single = [b["input_ids"] for b in make_dm(folder).val_dataloader()]
    assert len(single) == 4
    again = [b["input_ids"] for b in make_dm(folder, seed=99).val_dataloader()]
    assert all(torch.equal(x, y) for x, y in zip(single, again, strict=True))
    per_rank = [list(make_dm(folder, dp=(r, 2)).val_dataloader()) for r in range(2)]
    assert [len(p) for p in per_rank] == [2, 2]
    interleaved = [per_rank[i % 2][i // 2]["input_ids"] for i in range(4)]
    assert all(torch.equal(x, y) for x, y in zip(single, interleaved, strict=True))


# --------------------------------------------------------------------------------------------
# tokenizers
# --------------------------------------------------------------------------------------------


def build_wordlevel(path: Path, eos: str | None = "</s>") -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if eos:
        tok.add_special_tokens([eos])
    tok.save(str(path))


def test_tokenizers_json_end_to_end(tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.json"
    build_wordlevel(path)
    tok = load_tokenizer(path)
    assert tok.eos_id == len(WORDS) + 1 and tok.vocab_size == len(WORDS) + 2
    assert tok.decode(tok.encode("alpha beta")) == "alpha beta"
    assert tok.identity()["sha256"] and tok.identity()["kind"] == "tokenizers"
    rng = random.Random(5)
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps({"body": random_doc(rng)}) for _ in range(30)))
    manifest = prepare_data([str(tmp_path / "*.jsonl")], tmp_path / "shards", tokenizer=str(path), shard_tokens=200,
                            val_fraction=0.1, text_field="body", progress=False)
    assert manifest["tokenizer"]["sha256"] == tok.identity()["sha256"]
    data = DataConfig(train_shards=str(tmp_path / "shards" / "train-*.tar"), tokenizer=str(path))
    dm = DeepSeekDataModule(data, seq_length=16, micro_batch_size=2, global_batch_size=2)
    batch = items(dm, 20)
    assert batch[0]["input_ids"].shape == (2, 16)
    ids = torch.cat([b["input_ids"] for b in batch])
    assert int(ids.max()) == tok.eos_id and (ids == tok.eos_id).any()
    with pytest.raises(ConfigError, match="data.tokenizer"):  # shards made with another tokenizer
        make_dm(tmp_path / "shards").setup()


@pytest.mark.parametrize("eos", ["<｜end▁of▁sentence｜>", "<|endoftext|>", "<eos>"])
def test_eos_found_among_special_tokens(tmp_path: Path, eos: str) -> None:
    build_wordlevel(tmp_path / "t.json", eos=eos)
    tok = load_tokenizer(tmp_path / "t.json")
    assert tok.decode([tok.eos_id]) == eos


def test_tokenizer_without_eos_is_a_clear_error(tmp_path: Path) -> None:
    build_wordlevel(tmp_path / "t.json", eos=None)
    with pytest.raises(ConfigError, match=r"data\.tokenizer: .* no end-of-document token"):
        load_tokenizer(tmp_path / "t.json")
    with pytest.raises(ConfigError, match=r"data\.tokenizer: file not found"):
        load_tokenizer(tmp_path / "missing.json")


def test_byte_tokenizer_roundtrip() -> None:
    tok = ByteTokenizer()
    text = "naïve café — 日本"
    assert tok.decode(tok.encode(text) + [tok.eos_id]) == text
    assert tok.vocab_size == 258 and tok.pad_id == 257


# --------------------------------------------------------------------------------------------
# built-in corpus
# --------------------------------------------------------------------------------------------


def _build_corpus(cache: str) -> tuple[str, str]:
    return ensure_default_corpus(cache, ByteTokenizer())


def test_default_corpus_built_once_reused_and_race_safe(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with mp.get_context("fork").Pool(3) as pool:
        results = pool.map(_build_corpus, [str(cache)] * 3)
    assert len(set(results)) == 1
    train, val = results[0]
    folder = Path(train).parent
    assert [p.name for p in cache.iterdir()] == [folder.name]  # no temporary leftovers
    manifest = json.loads((folder / "manifest.json").read_text())
    assert 8 <= len(manifest["train"]["shards"]) <= 9 and len(manifest["val"]["shards"]) == 1
    stamp = (folder / "manifest.json").stat().st_mtime_ns
    assert _build_corpus(str(cache)) == (train, val)
    assert (folder / "manifest.json").stat().st_mtime_ns == stamp
    dm = DeepSeekDataModule(DataConfig(cache_dir=str(cache)), seq_length=128, micro_batch_size=2, global_batch_size=4)
    from pydoc_data.topics import topics

    row = items(dm, 1)[0]["input_ids"][0].tolist()
    pieces = dm.tokenizer.decode(row).split("\n\n")  # chunks of real help text, cut at paragraphs
    longest = max(pieces[1:-1] or pieces, key=len)
    assert len(longest) > 20 and any(longest in text for text in topics.values())
