"""`lit-deepseek prepare-data`: text files -> tokenized webdataset shards + manifest.json.

Inputs (files or globs, mixed freely):

- ``.txt``: the whole file is one document;
- ``.jsonl``: one JSON object per line, the document is its ``text_field``;
- ``.parquet``: the ``text_field`` column, streamed in record batches;
- ``.txt.gz`` / ``.jsonl.gz``: the same, gzip-compressed.

Every document becomes one tar sample ``<doc index>.tokens.u16`` (or ``.u32`` when the vocabulary
does not fit 16 bits): its token ids as raw little-endian integers, without EOS (the packer adds it).
A seeded random choice of documents goes to ``val-%06d.tar``, the rest to ``train-%06d.tar``; a
shard is closed once it holds ``shard_tokens`` tokens. ``manifest.json`` lists every shard with its
document and token counts and byte size, the totals, the tokenizer identity, the inputs and the time.
The DataModule uses the manifest to skip whole shards without reading them when resuming.

API: ``prepare_data(inputs, output_dir, ...) -> manifest`` and ``prepare_data_cli(argv) -> exit code``.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import os
import random
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from lit_deepseek.config import ConfigError
from lit_deepseek.data.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer

MANIFEST = "manifest.json"
FORMAT = "lit-deepseek-shards/1"
SUFFIXES = (".txt", ".jsonl", ".parquet", ".txt.gz", ".jsonl.gz")
_BATCH_DOCS = 256


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files named by `inputs` (paths or globs), each pattern's matches sorted, duplicates dropped."""
    files: list[Path] = []
    for pattern in inputs:
        matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        matches = [m for m in matches if os.path.isfile(m)]
        if not matches:
            raise ValueError(f"--inputs: no files match {pattern!r}")
        for m in matches:
            p = Path(m)
            if _kind(p) is None:
                raise ValueError(f"--inputs: {m} has an unsupported extension (use {', '.join(SUFFIXES)})")
            if p not in files:
                files.append(p)
    return files


def _kind(path: Path) -> Optional[str]:
    """The input kind (a SUFFIXES entry) of a file name, or None."""
    name = path.name.lower()
    return next((s for s in SUFFIXES if name.endswith(s)), None)


def _open_text(path: Path, mode: str = "rt") -> Any:
    """Text is strict UTF-8 (an undecodable file is reported, never turned into replacement characters)."""
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, mode, encoding="utf-8") if "t" in mode else gzip.open(path, mode)
    return open(path, mode, encoding="utf-8") if "t" in mode else open(path, mode)


class NotTextError(ValueError):
    """An input file that is binary or not UTF-8."""


def count_documents(path: Path, text_field: str) -> int:
    """Documents in one input, without parsing them (the first pass that fixes the val split)."""
    kind = _kind(path)
    if kind in (".txt", ".txt.gz"):
        return 1
    if kind in (".jsonl", ".jsonl.gz"):
        with _open_text(path, "rb") as f:
            return sum(1 for line in f if line.strip())
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    if text_field not in pf.schema_arrow.names:
        raise ValueError(f"--text_field: column {text_field!r} not in {path} (columns: {', '.join(pf.schema_arrow.names)})")
    return pf.metadata.num_rows


def iter_documents(path: Path, text_field: str) -> Iterator[str]:
    """The documents of one input file, streamed."""
    kind = _kind(path)
    if kind in (".txt", ".txt.gz"):
        with _open_text(path) as f:
            try:
                text = f.read()
            except UnicodeDecodeError as exc:
                raise NotTextError(f"{path}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
        if "\x00" in text:
            raise NotTextError(f"{path}: binary (NUL bytes)")
        yield text
    elif kind in (".jsonl", ".jsonl.gz"):
        with _open_text(path) as f:
            lines = enumerate(f, 1)
            while True:
                try:
                    lineno, line = next(lines)
                except StopIteration:
                    break
                except UnicodeDecodeError as exc:
                    raise NotTextError(f"{path}: not UTF-8 ({exc.reason})") from None
                if "\x00" in line:
                    raise NotTextError(f"{path}:{lineno}: binary (NUL bytes)")
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"--inputs: {path}:{lineno} is not valid JSON: {exc}") from None
                if not isinstance(record, dict) or text_field not in record:
                    raise ValueError(f"--text_field: {path}:{lineno} has no field {text_field!r}")
                yield str(record[text_field] or "")
    else:
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        for batch in pf.iter_batches(batch_size=1024, columns=[text_field]):
            for value in batch.column(0).to_pylist():
                yield str(value or "")


class _ShardSink:
    """Writes samples into `<prefix>-%06d.tar`, starting a new shard after `shard_tokens` tokens."""

    def __init__(self, out: Path, prefix: str, shard_tokens: int):
        self.out, self.prefix, self.shard_tokens = out, prefix, shard_tokens
        self.shards: list[dict[str, Any]] = []
        self._writer: Any = None
        self._file: Any = None

    def write(self, key: str, field: str, tokens: np.ndarray) -> None:
        import webdataset as wds

        if self._writer is None:
            name = f"{self.prefix}-{len(self.shards):06d}.tar"
            self._file = open(self.out / name, "wb")
            self._writer = wds.TarWriter(self._file, encoder=False, mtime=0.0)
            self.shards.append({"path": name, "docs": 0, "tokens": 0, "bytes": 0})
        self._writer.write({"__key__": key, field: tokens.tobytes()})
        entry = self.shards[-1]
        entry["docs"] += 1
        entry["tokens"] += int(tokens.size)
        if entry["tokens"] >= self.shard_tokens:
            self.close()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._file.close()
            self.shards[-1]["bytes"] = (self.out / self.shards[-1]["path"]).stat().st_size
            self._writer = self._file = None

    def summary(self) -> dict[str, Any]:
        return {"shards": self.shards, "docs": sum(s["docs"] for s in self.shards),
                "tokens": sum(s["tokens"] for s in self.shards)}


def _encode(tokenizer: Tokenizer, texts: list[str], dtype: np.dtype) -> list[np.ndarray]:
    if isinstance(tokenizer, ByteTokenizer):  # no Python list per byte
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(dtype) for t in texts]
    return [np.asarray(ids, dtype=dtype) for ids in tokenizer.encode_batch(texts)]


def prepare_data(
    inputs: list[str],
    output_dir: Union[str, os.PathLike],
    tokenizer: Union[None, str, os.PathLike, Tokenizer] = None,
    shard_tokens: int = 2**25,
    val_fraction: float = 0.01,
    val_docs: Optional[int] = None,
    text_field: str = "text",
    seed: int = 1234,
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Tokenize `inputs` into train/val webdataset shards under `output_dir`; returns the manifest.

    `val_docs` (a count) takes precedence over `val_fraction`; a non-zero fraction of a corpus with
    at least two documents always holds out at least one, and at least one document stays in train.
    """

    if shard_tokens <= 0:
        raise ValueError(f"--shard_tokens: must be positive, got {shard_tokens}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"--val_fraction: must be in [0, 1), got {val_fraction}")
    if val_docs is not None and val_docs < 0:
        raise ValueError(f"--val_docs: must be >= 0, got {val_docs}")
    tok = tokenizer if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)) else load_tokenizer(tokenizer)
    files = expand_inputs(list(inputs))
    final = Path(output_dir)
    existing = sorted(p.name for p in final.iterdir() if p.name == MANIFEST or p.suffix == ".tar") if final.is_dir() else []
    if existing and not overwrite:
        raise ValueError(f"--output: {final} already holds shards ({existing[0]}, ...); choose another folder or pass --overwrite")
    # All or nothing: shards and manifest are written to a hidden sibling folder and published at the end.
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".{glob.escape(final.name)}.prepare-*"):  # left by a killed run
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(stale, ignore_errors=True)
    out = final.parent / f".{final.name}.prepare-{os.getpid()}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    try:
        manifest = _prepare_into(out, files, tok, shard_tokens, val_fraction, val_docs, text_field, seed, progress)
        _publish(out, final, existing)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return manifest


def _publish(out: Path, final: Path, existing: list[str]) -> None:
    """Move the finished shards into `final` (replacing `existing` ones), the manifest last."""
    if not final.exists() or (final.is_dir() and not any(final.iterdir())):
        if final.exists():
            final.rmdir()
        os.rename(out, final)
        return
    for name in existing:
        (final / name).unlink()
    for p in sorted(out.iterdir(), key=lambda p: p.name == MANIFEST):
        os.replace(p, final / p.name)


def _prepare_into(out: Path, files: list[Path], tok: Tokenizer, shard_tokens: int, val_fraction: float,
                  val_docs: Optional[int], text_field: str, seed: int, progress: bool) -> dict[str, Any]:
    from tqdm.auto import tqdm

    counts = [count_documents(f, text_field) for f in files]
    total_docs = sum(counts)
    if total_docs == 0:
        raise ValueError(f"--inputs: no documents found in {len(files)} file(s)")
    if val_docs is not None:
        n_val = min(val_docs, total_docs - 1)
    else:
        n_val = round(val_fraction * total_docs)
        if val_fraction > 0 and total_docs >= 2:
            n_val = min(max(n_val, 1), total_docs - 1)
    val_index = set(random.Random(seed).sample(range(total_docs), n_val))

    dtype = np.dtype("<u2") if tok.vocab_size <= 2**16 else np.dtype("<u4")
    field = "tokens.u16" if dtype.itemsize == 2 else "tokens.u32"
    sinks = {"train": _ShardSink(out, "train", shard_tokens), "val": _ShardSink(out, "val", shard_tokens)}
    empty_docs = 0
    doc_index = 0
    bar = tqdm(total=total_docs, unit="doc", desc="prepare-data", disable=not progress)
    try:
        batch: list[str] = []

        def flush() -> None:
            nonlocal doc_index, empty_docs
            for tokens in _encode(tok, batch, dtype):
                if tokens.size == 0:
                    empty_docs += 1
                else:
                    split = "val" if doc_index in val_index else "train"
                    sinks[split].write(f"{doc_index:010d}", field, tokens)
                doc_index += 1
            bar.update(len(batch))
            batch.clear()

        not_text: list[str] = []
        for path in files:
            try:
                for text in iter_documents(path, text_field):
                    batch.append(text)
                    if len(batch) >= _BATCH_DOCS:
                        flush()
            except NotTextError as exc:
                not_text.append(str(exc))
        flush()
    finally:
        for sink in sinks.values():
            sink.close()
        bar.close()
    if not_text:
        raise ValueError(f"--inputs: {len(not_text)} of {len(files)} file(s) are binary or not UTF-8 text "
                         f"({'; '.join(not_text[:3])}{'; ...' if len(not_text) > 3 else ''}); nothing was written")
    if doc_index - empty_docs == 0:
        raise ValueError(f"--inputs: the {len(files)} input file(s) hold no non-empty document; nothing was written")

    manifest = {
        "format": FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "inputs": [str(f.resolve()) for f in files],
        "tokenizer": tok.identity(),
        "dtype": dtype.str,
        "field": field,
        "text_field": text_field,
        "seed": seed,
        "shard_tokens": shard_tokens,
        "empty_docs_dropped": empty_docs,
        "train": sinks["train"].summary(),
        "val": sinks["val"].summary(),
    }
    manifest["total_tokens"] = manifest["train"]["tokens"] + manifest["val"]["tokens"]
    manifest["total_docs"] = manifest["train"]["docs"] + manifest["val"]["docs"]
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out / MANIFEST)
    return manifest


def read_manifest(folder: Union[str, os.PathLike]) -> Optional[dict[str, Any]]:
    """The manifest of a shard folder, or None when it has none (or an unreadable one)."""
    path = Path(folder) / MANIFEST
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == FORMAT else None


def prepare_data_cli(argv: Optional[list[str]] = None) -> int:
    """`lit-deepseek prepare-data` entry point; returns the process exit code."""
    parser = argparse.ArgumentParser(prog="lit-deepseek prepare-data",
                                     description="Tokenize .txt/.jsonl/.parquet files into webdataset shards.")
    parser.add_argument("--inputs", nargs="+", required=True, help="input files or globs")
    parser.add_argument("--output", required=True, help="output folder for the shards and manifest.json")
    parser.add_argument("--tokenizer", default=None, help="tokenizers JSON file (default: byte-level)")
    parser.add_argument("--shard_tokens", type=int, default=2**25, help="tokens per shard")
    parser.add_argument("--val_fraction", type=float, default=0.01, help="fraction of documents held out")
    parser.add_argument("--val_docs", type=int, default=None, help="number of documents held out (overrides --val_fraction)")
    parser.add_argument("--text_field", default="text", help="JSONL field / parquet column holding the text")
    parser.add_argument("--seed", type=int, default=1234, help="seed of the validation split")
    parser.add_argument("--overwrite", action="store_true", help="replace shards already in --output")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        manifest = prepare_data(args.inputs, args.output, tokenizer=args.tokenizer, shard_tokens=args.shard_tokens,
                                val_fraction=args.val_fraction, val_docs=args.val_docs, text_field=args.text_field,
                                seed=args.seed, progress=not args.no_progress, overwrite=args.overwrite)
    except (ValueError, ConfigError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    t, v = manifest["train"], manifest["val"]
    print(f"wrote {len(t['shards'])} train shards ({t['docs']} docs, {t['tokens']} tokens) and "
          f"{len(v['shards'])} val shards ({v['docs']} docs, {v['tokens']} tokens) to {args.output}")
    return 0
