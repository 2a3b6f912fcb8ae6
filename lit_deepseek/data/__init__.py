"""Data: tokenizers, `prepare-data` (text -> webdataset shards), the demo corpus and the DataModule."""

from lit_deepseek.data.corpus import ensure_default_corpus
from lit_deepseek.data.datamodule import DeepSeekDataModule, PackedSequenceDataset, TokenStream, resolve_shards
from lit_deepseek.data.prepare import prepare_data, prepare_data_cli, read_manifest
from lit_deepseek.data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer

__all__ = [
    "ByteTokenizer", "DeepSeekDataModule", "HFTokenizer", "PackedSequenceDataset", "TokenStream", "Tokenizer",
    "ensure_default_corpus", "load_tokenizer", "prepare_data", "prepare_data_cli", "read_manifest", "resolve_shards",
]
