"""The built-in demo corpus: the English help topics that ship with Python (`pydoc_data.topics`).

It needs no download, so a CPU demo or a test can train on real text anywhere. The topics are
cut into paragraph groups of <= 4000 characters (~170 documents) and written once per tokenizer to
``<cache_dir>/pydoc-topics-<tokenizer tag>/`` as 8-9 train shards and one val shard (3% of the
documents); later calls reuse them when the manifest matches the tokenizer and the text.
Concurrent first calls (several ranks on one node) build in private temporary folders and the first
atomic rename wins; the others discard their copy.

API: ``ensure_default_corpus(cache_dir, tokenizer) -> (train_pattern, val_pattern)``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Union

from lit_deepseek.data.prepare import prepare_data, read_manifest
from lit_deepseek.data.tokenizer import Tokenizer, same_tokenizer

TRAIN_SHARDS = 8
VAL_FRACTION = 0.03
DOC_CHARS = 4000


def _chunks(text: str) -> list[str]:
    """Paragraph groups of up to DOC_CHARS characters: many even documents instead of a few huge ones."""
    chunks: list[str] = []
    current = ""
    for paragraph in text.split("\n\n"):
        if current and len(current) + len(paragraph) > DOC_CHARS:
            chunks.append(current)
            current = ""
        current = f"{current}\n\n{paragraph}" if current else paragraph
    if current.strip():
        chunks.append(current)
    return chunks


def _topics_jsonl() -> tuple[str, str]:
    """The topics as JSONL text (sorted by name) and its sha256."""
    from pydoc_data.topics import topics

    lines = []
    for name, text in sorted(topics.items()):
        for part, chunk in enumerate(_chunks(text)):
            lines.append(json.dumps({"name": f"{name}/{part}", "text": chunk}))
    body = "\n".join(lines) + "\n"
    return body, hashlib.sha256(body.encode("utf-8")).hexdigest()


def _patterns(folder: Path) -> tuple[str, str]:
    return str(folder / "train-*.tar"), str(folder / "val-*.tar")


def _usable(folder: Path, tokenizer: Tokenizer, source_sha256: str) -> bool:
    manifest = read_manifest(folder)
    return (manifest is not None and manifest.get("source_sha256") == source_sha256
            and same_tokenizer(manifest.get("tokenizer", {}), tokenizer.identity())
            and all((folder / s["path"]).is_file() for split in ("train", "val") for s in manifest[split]["shards"]))


def ensure_default_corpus(cache_dir: Union[str, os.PathLike], tokenizer: Tokenizer) -> tuple[str, str]:
    """Shard patterns (train, val) of the demo corpus for `tokenizer`, building them on first use."""
    identity = tokenizer.identity()
    tag = identity["kind"] if identity["sha256"] is None else f"{identity['kind']}-{identity['sha256'][:12]}"
    cache = Path(cache_dir).expanduser()
    folder = cache / f"pydoc-topics-{tag}"
    body, source_sha256 = _topics_jsonl()
    if _usable(folder, tokenizer, source_sha256):
        return _patterns(folder)

    cache.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=cache))
    try:
        source = work / "topics.jsonl"
        source.write_text(body, encoding="utf-8")
        texts = [json.loads(line)["text"] for line in body.splitlines()]
        total_tokens = sum(len(ids) for ids in tokenizer.encode_batch(texts))
        shard_tokens = max(1, int(total_tokens * (1 - VAL_FRACTION) / TRAIN_SHARDS))
        shards = work / "shards"
        manifest = prepare_data([str(source)], shards, tokenizer=tokenizer, shard_tokens=shard_tokens,
                                val_fraction=VAL_FRACTION, seed=0, progress=False)
        manifest["source_sha256"] = source_sha256
        manifest["inputs"] = ["pydoc_data.topics"]
        (shards / "manifest.json").write_text(json.dumps(manifest, indent=1))
        if folder.exists():  # stale (other text or tokenizer): move it aside, then swap in ours
            if _usable(folder, tokenizer, source_sha256):
                return _patterns(folder)
            stale = Path(tempfile.mkdtemp(prefix=".stale-", dir=cache))
            try:
                os.replace(folder, stale / "old")
            except OSError:
                pass
        try:
            os.replace(shards, folder)
        except OSError:  # another process won the race; its copy is as good as ours
            if not _usable(folder, tokenizer, source_sha256):
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
        for stale in cache.glob(".stale-*"):
            shutil.rmtree(stale, ignore_errors=True)
    return _patterns(folder)
