"""DeepSeekDataModule: packed token sequences from webdataset shards, one global order, exact resume.

The global stream
    Epoch e reads the training shards in an order shuffled by ``(seed, e)``; documents keep their
    order inside a shard and each is followed by EOS. Epochs follow one another without a break, so
    the token stream is endless. Global sequence j is stream tokens ``[j*S, j*S + S + 1)`` (S =
    seq_length; neighbours share one token, so every token is a target once); the model gets
    ``tokens[:-1]`` and the targets are ``tokens[1:]``. Documents run across sequence boundaries.

One global batch order, whatever the data-parallel size
    Optimizer step k consumes global sequences ``[k*G, (k+1)*G)`` (G = global_batch_size) counted
    from the run's start position. With D data-parallel ranks and A = G / (micro * D) accumulation
    steps, rank r's micro-step m takes the ``micro`` sequences starting at ``k*G + (r*A + m)*micro``:
    each rank owns one contiguous block of A*micro sequences per step, and the blocks of all ranks
    tile the global batch exactly. The mean loss over a step is therefore the same for any D. Every
    rank reads the whole stream and materialises only its slice, so a run with fewer shards than
    ranks x workers is fine (no shard is split). Tensor- and pipeline-parallel peers of one replica
    must get the same data: the parallel strategy calls ``set_data_parallel(rank, size)`` with the
    replica's coordinates from its resolved layout (EP x DP ranks read different data). Without that
    call the attached trainer's global rank / world size are used, else 0 / 1. A is checked by the
    one global-batch rule, `lit_deepseek.parallel.layout.accumulation_steps`.

Items
    With ``batch_per_step=True`` (the default: one ``training_step`` = one optimizer step) an item
    holds this rank's A micro-batches of one step, ``{"input_ids": LongTensor[A*micro, S],
    "labels": LongTensor[A*micro, S]}`` (micro-batch m = rows ``m*micro ... (m+1)*micro``), plus
    ``"doc_ids"`` (0 for the first document of each row, +1 at each new document) when
    ``data.document_mask`` is on. With ``batch_per_step=False`` each item is one micro-batch
    (``[micro, S]``), for Lightning's automatic optimisation with ``accumulate_grad_batches = A``.

Workers
    With ``data.num_workers = W`` worker w builds items w, w+W, ...; the DataLoader returns items
    in that round-robin order, so the sequence order does not depend on W.

Exact resume
    ``state_dict()`` stores the stream position in tokens: the position restored at the start of
    this run plus (optimizer steps since then) x G x S. Steps come from ``trainer.global_step``
    when a Lightning trainer is attached (what was *trained on*, not what the DataLoader
    prefetched); engines without a trainer call ``on_steps_consumed(n)`` after each optimizer step.
    ``load_state_dict()`` makes the next ``train_dataloader()`` start exactly at the next global
    batch, also under another data-parallel size or worker count. Resuming skips whole shards by
    the manifest's token counts (when the shard file's size matches it) and whole documents by
    their byte length, without decoding.

Validation
    The held-out shards in file order, unshuffled; the first ``ceil(val_batches / D) * D``
    micro-batches, micro-batch i going to rank ``i % D`` (every rank runs the same count, so
    collectives inside the model cannot hang). The val stream wraps around if it is shorter.

Bad input
    A corrupt or truncated shard is logged once per process with a warning naming it, the rest of
    it is skipped, and it is counted in ``skipped_shards``. No matching shards raise ConfigError
    naming ``data.train_shards`` / ``data.val_shards`` and the pattern.
"""

from __future__ import annotations

import glob
import logging
import math
import os
import random
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional, Protocol, runtime_checkable

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from lit_deepseek.config import ConfigError, DataConfig
from lit_deepseek.data.prepare import read_manifest
from lit_deepseek.data.tokenizer import load_tokenizer, same_tokenizer
from lit_deepseek.parallel.layout import accumulation_steps

log = logging.getLogger(__name__)

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")  # http:, https:, pipe:, s3:, gs:, file: ...
_FIELDS = {"tokens.u16": np.dtype("<u2"), "tokens.u32": np.dtype("<u4")}


# --------------------------------------------------------------------------------------------
# Shards
# --------------------------------------------------------------------------------------------


def resolve_shards(pattern: str, field_name: str) -> list[str]:
    """Shard URLs/paths for a pattern: '::'-separated parts, braces, local globs; error if none."""
    from webdataset.shardlists import expand_urls

    shards: list[str] = []
    for part in expand_urls(pattern):
        if _URL.match(part) and not os.path.exists(part):
            shards.append(part)
        elif glob.has_magic(part):
            shards.extend(sorted(p for p in glob.glob(os.path.expanduser(part)) if os.path.isfile(p)))
        elif os.path.isfile(os.path.expanduser(part)):
            shards.append(os.path.expanduser(part))
    if not shards:
        raise ConfigError(f"{field_name}: no shards match {pattern!r}")
    return shards


def shard_lengths(shards: list[str], tokenizer_identity: dict[str, Any], field_name: str) -> dict[str, int]:
    """Stream tokens (document tokens + one EOS per document) of local shards that a manifest vouches for.

    A shard counts only if its manifest entry's byte size equals the file's: a truncated or
    rewritten shard is read instead. Also checks that the shards were made with our tokenizer.
    """
    lengths: dict[str, int] = {}
    seen: dict[Path, Optional[dict]] = {}
    for shard in shards:
        if _URL.match(shard) and not os.path.exists(shard):
            continue
        path = Path(shard).resolve()
        folder = path.parent
        if folder not in seen:
            seen[folder] = manifest = read_manifest(folder)
            if manifest is not None and not same_tokenizer(manifest.get("tokenizer", {}), tokenizer_identity):
                raise ConfigError(
                    f"data.tokenizer: shards in {folder} ({field_name}) were tokenized with "
                    f"{manifest['tokenizer'].get('kind')} {manifest['tokenizer'].get('path') or ''} but data.tokenizer "
                    f"is {tokenizer_identity['kind']} {tokenizer_identity.get('path') or ''}; re-run prepare-data or fix data.tokenizer"
                )
        manifest = seen[folder]
        if manifest is None:
            continue
        for split in ("train", "val"):
            for entry in manifest.get(split, {}).get("shards", []):
                if entry["path"] == path.name and entry.get("bytes") == path.stat().st_size:
                    lengths[shard] = entry["tokens"] + entry["docs"]
    return lengths


class _ShardReader:
    """Reads one shard's documents as token arrays; a broken shard is warned about, counted and cut short."""

    def __init__(self, skipped: torch.Tensor, count_here: bool, vocab_size: Optional[int] = None,
                 field_name: str = "data.train_shards"):
        self.skipped = skipped
        self.count_here = count_here
        self.vocab_size, self.field_name = vocab_size, field_name
        self.bad: set[str] = set()

    def documents(self, url: str) -> Iterator[np.ndarray]:
        from webdataset.tariterators import tarfile_samples

        errors: list[Exception] = []

        def stop(exn: Exception) -> bool:
            errors.append(exn)
            return False

        try:
            for sample in tarfile_samples([{"url": url}], handler=stop):
                field = next((f for f in _FIELDS if f in sample), None)
                if field is None:
                    raise ValueError(f"sample {sample.get('__key__')} has no tokens.u16 / tokens.u32 entry")
                data = sample[field]
                if len(data) % _FIELDS[field].itemsize:
                    raise ValueError(f"sample {sample.get('__key__')} has a partial token")
                tokens = np.frombuffer(data, dtype=_FIELDS[field])
                if self.vocab_size is not None and tokens.size and int(tokens.max()) >= self.vocab_size:
                    raise ConfigError(
                        f"{self.field_name}: shard {url} holds token id {int(tokens.max())} (sample "
                        f"{sample.get('__key__')}), but token ids must be < model.vocab_size ({self.vocab_size}); "
                        f"re-run prepare-data with the model's tokenizer or raise model.vocab_size")
                yield tokens
        except ConfigError:
            raise
        except Exception as exn:  # noqa: BLE001 - any reading error means a broken shard
            errors.append(exn)
        if not errors and not _ends_like_a_tar(url):
            errors.append(ValueError("truncated: the file ends without the tar end-of-archive blocks"))
        if errors:
            self._report(url, errors[0])

    def _report(self, url: str, exn: Exception) -> None:
        if url in self.bad:
            return
        self.bad.add(url)
        log.warning("skipping the rest of corrupt or truncated shard %s: %s", url, str(exn).split(" @ ")[0])
        if self.count_here:
            self.skipped += 1


def _ends_like_a_tar(url: str) -> bool:
    """A local tar file ends with two zero blocks; a file cut at a member boundary does not (remote: True)."""
    if not os.path.isfile(url):
        return True
    size = os.path.getsize(url)
    if size < 1024 or size % 512:
        return False
    with open(url, "rb") as f:
        f.seek(size - 1024)
        return not any(f.read(1024))


# --------------------------------------------------------------------------------------------
# The endless token stream
# --------------------------------------------------------------------------------------------


class TokenStream:
    """A forward-only cursor over the endless stream: epochs of seeded shard orders, documents + EOS."""

    def __init__(self, shards: list[str], eos_id: int, seed: int, shuffle: bool,
                 lengths: Optional[dict[str, int]] = None, reader: Optional[_ShardReader] = None,
                 field_name: str = "data.train_shards"):
        self.shards, self.eos_id, self.seed, self.shuffle = list(shards), eos_id, seed, shuffle
        self.lengths = lengths or {}
        self.reader = reader or _ShardReader(torch.zeros(1, dtype=torch.int64), False)
        self.field_name = field_name
        self.epoch = -1
        self.order: list[str] = []
        self.next_shard = 0
        self.epoch_tokens = 1
        self.docs: Optional[Iterator[np.ndarray]] = None
        self.doc = np.zeros(0, dtype=np.uint32)  # current document's tokens; EOS follows at index doc.size
        self.doc_size = 0  # doc.size + 1 (EOS), 0 before the first document
        self.offset = 0  # index into the current document, EOS included
        self.position = 0  # stream index of the token at self.offset
        self.doc_number = -1
        self._start_epoch()

    def _start_epoch(self) -> None:
        if self.epoch_tokens == 0:
            raise RuntimeError(f"{self.field_name}: every shard is empty or unreadable ({len(self.shards)} shards)")
        self.epoch += 1
        self.order = list(self.shards)
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(self.order)
        self.next_shard = 0
        self.epoch_tokens = 0

    def _upcoming_shard(self) -> str:
        if self.next_shard == len(self.order):
            self._start_epoch()
        return self.order[self.next_shard]

    def _load_next_document(self) -> bool:
        """Make the next document current; False when a shard just ended (a chance to skip the next)."""
        if self.docs is None:
            url = self._upcoming_shard()
            self.next_shard += 1
            self.docs = self.reader.documents(url)
        tokens = next(self.docs, None)
        if tokens is None:
            self.docs = None
            return False
        self.doc, self.doc_size, self.offset = tokens, tokens.size + 1, 0
        self.doc_number += 1
        self.epoch_tokens += self.doc_size
        return True

    def seek(self, position: int) -> None:
        """Move forward to stream index `position`, skipping whole shards and documents cheaply."""
        if position < self.position:
            raise ValueError(f"cannot seek backwards from {self.position} to {position}")
        while self.position < position:
            left = self.doc_size - self.offset
            if left == 0:
                if self.docs is None:
                    url = self._upcoming_shard()
                    length = self.lengths.get(url)
                    if length is not None and self.position + length <= position:
                        self.next_shard += 1
                        self.position += length
                        self.epoch_tokens += length
                        self.doc_number += 1
                        continue
                self._load_next_document()
                continue
            step = min(left, position - self.position)
            self.offset += step
            self.position += step

    def take(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The next n tokens and the stream's document number of each; advances by n."""
        tokens = np.empty(n, dtype=np.int64)
        docs = np.empty(n, dtype=np.int64)
        filled = 0
        while filled < n:
            left = self.doc_size - self.offset
            if left == 0:
                self._load_next_document()
                continue
            step = min(left, n - filled)
            end = self.offset + step
            from_doc = min(end, self.doc.size) - self.offset
            tokens[filled:filled + from_doc] = self.doc[self.offset:self.offset + from_doc]
            if from_doc < step:  # the step reaches the document's EOS
                tokens[filled + from_doc] = self.eos_id
            docs[filled:filled + step] = self.doc_number
            filled += step
            self.offset += step
            self.position += step
        return tokens, docs

    def peek(self) -> int:
        """The next token, without advancing."""
        while self.offset == self.doc_size:
            self._load_next_document()
        return int(self.doc[self.offset]) if self.offset < self.doc.size else self.eos_id


# --------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------


class PackedSequenceDataset(IterableDataset):
    """This rank's items of the global sequence order (see the module docstring for the layout)."""

    def __init__(self, shards: list[str], eos_id: int, seq_length: int, micro_batch_size: int,
                 global_batch_size: int, seed: int, dp_rank: int = 0, dp_size: int = 1,
                 start_token: int = 0, shuffle: bool = True, document_mask: bool = False,
                 batch_per_step: bool = False, max_items: Optional[int] = None,
                 lengths: Optional[dict[str, int]] = None, skipped: Optional[torch.Tensor] = None,
                 field_name: str = "data.train_shards", vocab_size: Optional[int] = None):
        super().__init__()
        self.vocab_size = vocab_size
        self.accumulation_steps = accumulation_steps(global_batch_size, micro_batch_size, dp_size)
        self.shards, self.eos_id, self.seq_length = shards, eos_id, seq_length
        self.micro_batch_size, self.global_batch_size, self.seed = micro_batch_size, global_batch_size, seed
        self.dp_rank, self.dp_size, self.start_token = dp_rank, dp_size, start_token
        self.shuffle, self.document_mask, self.batch_per_step = shuffle, document_mask, batch_per_step
        self.max_items, self.lengths, self.field_name = max_items, lengths or {}, field_name
        self.skipped = skipped if skipped is not None else torch.zeros(1, dtype=torch.int64)

    def item_span(self, index: int) -> tuple[int, int]:
        """(first global sequence, number of sequences) of this rank's item `index`."""
        a, micro = self.accumulation_steps, self.micro_batch_size
        if self.batch_per_step:
            return index * self.global_batch_size + self.dp_rank * a * micro, a * micro
        step, m = divmod(index, a)
        return step * self.global_batch_size + (self.dp_rank * a + m) * micro, micro

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        reader = _ShardReader(self.skipped, count_here=worker == 0, vocab_size=self.vocab_size,
                              field_name=self.field_name)
        stream = TokenStream(self.shards, self.eos_id, self.seed, self.shuffle, self.lengths, reader, self.field_name)
        s = self.seq_length
        index = worker
        while self.max_items is None or index < self.max_items:
            first, n = self.item_span(index)
            stream.seek(self.start_token + first * s)
            tokens, docs = stream.take(n * s)
            following = stream.peek()
            labels = np.empty_like(tokens)
            labels[:-1] = tokens[1:]
            labels[-1] = following
            item = {"input_ids": torch.from_numpy(tokens.reshape(n, s)),
                    "labels": torch.from_numpy(labels.reshape(n, s))}
            if self.document_mask:
                rows = docs.reshape(n, s)
                item["doc_ids"] = torch.from_numpy(rows - rows[:, :1])
            yield item
            index += workers


# --------------------------------------------------------------------------------------------
# DataModule
# --------------------------------------------------------------------------------------------


@runtime_checkable
class DataParallelData(Protocol):
    """A data module that slices the global batch itself; the parallel strategy tells it its slice."""

    def set_data_parallel(self, rank: int, size: int) -> None: ...


class DeepSeekDataModule(pl.LightningDataModule):
    """Webdataset shards -> packed, data-parallel-sliced micro-batches with exact resume."""

    def __init__(self, data: DataConfig, seq_length: int, micro_batch_size: int, global_batch_size: int,
                 seed: int = 1234, val_batches: int = 50, batch_per_step: bool = True):
        super().__init__()
        for name, value in (("training.seq_length", seq_length), ("training.micro_batch_size", micro_batch_size),
                            ("training.global_batch_size", global_batch_size)):
            if value <= 0:
                raise ConfigError(f"{name}: must be positive, got {value}")
        accumulation_steps(global_batch_size, micro_batch_size, 1)
        if val_batches < 0:
            raise ConfigError(f"val_batches: must be >= 0, got {val_batches}")
        if data.num_workers < 0:
            raise ConfigError(f"data.num_workers: must be >= 0, got {data.num_workers}")
        self.data = data
        self.seq_length, self.micro_batch_size, self.global_batch_size = seq_length, micro_batch_size, global_batch_size
        self.seed = data.seed if data.seed is not None else seed
        self.val_batches, self.batch_per_step = val_batches, batch_per_step
        self.tokenizer = load_tokenizer(data.tokenizer)
        self._dp: Optional[tuple[int, int]] = None
        self._start_token = 0  # stream position this run started from (restored by load_state_dict)
        self._start_step = 0  # trainer.global_step at that position
        self._restored = False
        self._manual_steps = 0
        self._skipped_steps = 0  # step batches consumed without an optimizer step since _start_token
        self._skipped = torch.zeros(1, dtype=torch.int64).share_memory_()
        self._train_shards: Optional[list[str]] = None
        self._val_shards: Optional[list[str]] = None
        self._lengths: dict[str, int] = {}
        self.vocab_size: Optional[int] = None  # set by check_vocab: larger token ids are refused

    # -- layout ------------------------------------------------------------------------------

    def set_data_parallel(self, rank: int, size: int) -> None:
        """Called by the parallel strategy: this replica's data-parallel rank and the number of replicas."""
        if size < 1 or not 0 <= rank < size:
            raise ValueError(f"set_data_parallel: need 0 <= rank < size, got rank {rank}, size {size}")
        accumulation_steps(self.global_batch_size, self.micro_batch_size, size)
        self._dp = (rank, size)

    @property
    def data_parallel(self) -> tuple[int, int]:
        """(rank, size) used for slicing: set_data_parallel's, else the trainer's, else (0, 1)."""
        if self._dp is not None:
            return self._dp
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        return 0, 1

    @property
    def accumulation_steps(self) -> int:
        """Micro-batches per optimizer step on each data-parallel rank (Lightning's accumulate_grad_batches)."""
        return accumulation_steps(self.global_batch_size, self.micro_batch_size, self.data_parallel[1])

    @property
    def skipped_shards(self) -> int:
        """Corrupt or truncated shards met so far (log it as a metric)."""
        return int(self._skipped.item())

    def check_vocab(self, model_vocab_size: int) -> None:
        """ConfigError if the tokenizer's ids do not fit model.vocab_size."""
        self.tokenizer.check_vocab(model_vocab_size)
        self.vocab_size = model_vocab_size

    def check_cache_dir(self) -> None:
        """ConfigError if the built-in corpus is needed and data.cache_dir cannot hold it."""
        if self.data.train_shards is not None:
            return
        from lit_deepseek.training.run_guard import write_error

        cache = Path(self.data.cache_dir).expanduser()
        exc = write_error(cache)
        if exc is not None:
            from lit_deepseek.data.corpus import ensure_default_corpus

            try:  # a read-only cache that already holds the corpus is fine
                ensure_default_corpus(cache, self.tokenizer)
            except OSError:
                raise ConfigError(f"data.cache_dir: cannot write the built-in corpus to {cache} "
                                  f"({exc.strerror or exc}); point data.cache_dir at a writable folder or set "
                                  f"data.train_shards") from None

    # -- shards ------------------------------------------------------------------------------

    def prepare_data(self) -> None:
        if self.data.train_shards is None:
            from lit_deepseek.data.corpus import ensure_default_corpus

            ensure_default_corpus(self._cache_dir(), self.tokenizer)

    def _cache_dir(self) -> str:
        if self.data.cache_dir is not None:
            return self.data.cache_dir
        from lit_deepseek.config import DeepSeekConfig

        return DeepSeekConfig(data=self.data).data_cache_dir()  # the default run directory's data/

    def setup(self, stage: Optional[str] = None) -> None:
        if self._train_shards is not None:
            return
        train, val = self.data.train_shards, self.data.val_shards
        if train is None:
            from lit_deepseek.data.corpus import ensure_default_corpus

            train, default_val = ensure_default_corpus(self._cache_dir(), self.tokenizer)
            val = val if val is not None else default_val
        identity = self.tokenizer.identity()
        self._train_shards = resolve_shards(train, "data.train_shards")
        self._lengths = shard_lengths(self._train_shards, identity, "data.train_shards")
        if val is not None:
            self._val_shards = resolve_shards(val, "data.val_shards")
            self._lengths.update(shard_lengths(self._val_shards, identity, "data.val_shards"))

    # -- loaders -----------------------------------------------------------------------------

    def train_dataset(self) -> PackedSequenceDataset:
        """This rank's endless training items, starting at the restored position."""
        self.setup()
        assert self._train_shards is not None
        if not self._restored and self.trainer is not None and self.trainer.global_step > 0:
            # A checkpoint without our state: assume a constant global batch since step 0.
            log.warning("no data position in the checkpoint; resuming the data stream at global_step x "
                        "global_batch_size x seq_length")
            self._start_step = self.trainer.global_step
            self._start_token = self._start_step * self.global_batch_size * self.seq_length
            self._restored = True
        rank, size = self.data_parallel
        return PackedSequenceDataset(
            self._train_shards, self.tokenizer.eos_id, self.seq_length, self.micro_batch_size, self.global_batch_size,
            self.seed, rank, size, start_token=self._start_token, shuffle=True, document_mask=self.data.document_mask,
            batch_per_step=self.batch_per_step, lengths=self._lengths, skipped=self._skipped,
            vocab_size=self.vocab_size)

    def val_dataset(self, test: bool = False) -> Optional[PackedSequenceDataset]:
        """This rank's fixed validation (or test) items, or None without held-out shards."""
        self.setup()
        shards, field_name = self._val_shards, "data.val_shards"
        if test:
            if self.data.test_shards is None:
                raise ConfigError("data.test_shards: `test` needs held-out test shards (the validation shards are "
                                  "not a test set); set data.test_shards")
            field_name = "data.test_shards"
            shards = resolve_shards(self.data.test_shards, field_name)
            self._lengths.update(shard_lengths(shards, self.tokenizer.identity(), field_name))
        if shards is None or self.val_batches == 0:
            return None
        rank, size = self.data_parallel
        micro = self.micro_batch_size
        return PackedSequenceDataset(
            shards, self.tokenizer.eos_id, self.seq_length, micro, micro * size, self.seed, rank, size,
            shuffle=False, document_mask=self.data.document_mask, max_items=math.ceil(self.val_batches / size),
            lengths=self._lengths, skipped=self._skipped, field_name=field_name, vocab_size=self.vocab_size)

    def train_dataloader(self) -> DataLoader:
        workers = self.data.num_workers
        return DataLoader(self.train_dataset(), batch_size=None, num_workers=workers,
                          pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0)

    def val_dataloader(self) -> Any:
        dataset = self.val_dataset()
        if dataset is None:
            return []
        return DataLoader(dataset, batch_size=None, num_workers=0, pin_memory=torch.cuda.is_available())

    def test_dataloader(self) -> Any:
        """The first `val_batches` micro-batches of data.test_shards (required)."""
        dataset = self.val_dataset(test=True)
        if dataset is None:
            return []
        return DataLoader(dataset, batch_size=None, num_workers=0, pin_memory=torch.cuda.is_available())

    # -- position ----------------------------------------------------------------------------

    def on_steps_consumed(self, steps: int = 1) -> None:
        """For engines without a Lightning trainer: count optimizer steps actually trained on."""
        self._manual_steps += steps

    def on_step_skipped(self, steps: int = 1) -> None:
        """A step batch was read but no optimizer step taken (a non-finite loss): the stream moves on."""
        self._skipped_steps += steps

    def _steps_since_start(self) -> int:
        if self.trainer is not None:
            return self.trainer.global_step - self._start_step + self._skipped_steps
        return self._manual_steps + self._skipped_steps

    @property
    def consumed_tokens(self) -> int:
        """Stream position after the optimizer steps trained so far (tokens, EOS included)."""
        return self._start_token + self._steps_since_start() * self.global_batch_size * self.seq_length

    def state_dict(self) -> dict[str, Any]:
        step = self.trainer.global_step if self.trainer is not None else self._start_step + self._manual_steps
        return {"consumed_tokens": self.consumed_tokens, "global_step": step, "seed": self.seed,
                "seq_length": self.seq_length, "global_batch_size": self.global_batch_size,
                "tokenizer": self.tokenizer.identity()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue at the saved stream position (also under another DP size, batch size or sequence length)."""
        if state_dict.get("seed", self.seed) != self.seed:
            log.warning("data seed changed from %s to %s: the resumed run reads another order",
                        state_dict.get("seed"), self.seed)
        self._start_token = int(state_dict["consumed_tokens"])
        self._skipped_steps = 0
        self._start_step = int(state_dict.get("global_step", 0))
        self._manual_steps = 0
        self._restored = True

