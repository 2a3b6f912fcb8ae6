"""Data: tokenizers, `prepare-data` (text -> webdataset shards), the demo corpus and the DataModule.

Names are imported on first use, so tools that only need a tokenizer (`generate`) do not pay for
importing Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "ensure_default_corpus": "corpus",
    "DeepSeekDataModule": "datamodule", "PackedSequenceDataset": "datamodule", "TokenStream": "datamodule",
    "resolve_shards": "datamodule",
    "prepare_data": "prepare", "prepare_data_cli": "prepare", "read_manifest": "prepare",
    "ByteTokenizer": "tokenizer", "HFTokenizer": "tokenizer", "Tokenizer": "tokenizer", "load_tokenizer": "tokenizer",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'lit_deepseek.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"lit_deepseek.data.{_WHERE[name]}"), name)
