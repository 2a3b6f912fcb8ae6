"""Tokenizers: a byte-level default and any Hugging Face `tokenizers` JSON file.

API::

    tok = load_tokenizer(None)              # ByteTokenizer: ids 0..255 = bytes, eos 256, pad 257
    tok = load_tokenizer("tokenizer.json")  # HFTokenizer (e.g. DeepSeek-V3's tokenizer.json)
    ids = tok.encode("text"); tok.decode(ids); tok.eos_id; tok.vocab_size
    tok.identity()  # {"kind", "path", "sha256", "eos_id", "vocab_size"} recorded in shard manifests
    tok.check_vocab(model_vocab_size)       # ConfigError if the ids do not fit the embedding

Documents are encoded without special tokens; the packer appends `eos_id` after every document.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Optional, Protocol, Union

from lit_deepseek.config import ConfigError

# End-of-document tokens of common tokenizers, in order of preference.
EOS_CANDIDATES = (
    "<｜end▁of▁sentence｜>",  # DeepSeek-V2/V3
    "<|endoftext|>",  # GPT-2, Qwen
    "</s>",  # Llama-2, Mistral, T5
    "<|end_of_text|>",  # Llama-3
    "<eos>",  # Gemma
    "<|eos|>",
    "[SEP]",  # BERT-style WordPiece
)


class Tokenizer(Protocol):
    """What the data pipeline needs from a tokenizer."""

    eos_id: int
    pad_id: int

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...

    def decode(self, ids: list[int]) -> str: ...

    def identity(self) -> dict[str, Any]: ...

    def check_vocab(self, model_vocab_size: int) -> None: ...


class _CheckVocab:
    vocab_size: int

    def check_vocab(self, model_vocab_size: int) -> None:
        """Fail before training if token ids could index past the model's embedding table."""
        if self.vocab_size > model_vocab_size:
            raise ConfigError(
                f"data.tokenizer: its vocabulary ({self.vocab_size} ids) exceeds model.vocab_size "
                f"({model_vocab_size}); raise model.vocab_size to at least {self.vocab_size}"
            )


class ByteTokenizer(_CheckVocab):
    """UTF-8 bytes as tokens: needs no file, works for any text, vocabulary 258."""

    eos_id = 256
    pad_id = 257

    @property
    def vocab_size(self) -> int:
        return 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def identity(self) -> dict[str, Any]:
        return {"kind": "bytes", "path": None, "sha256": None, "eos_id": self.eos_id, "vocab_size": self.vocab_size}


class HFTokenizer(_CheckVocab):
    """A Hugging Face `tokenizers` JSON file (tokenizer.json); EOS found among its special tokens."""

    def __init__(self, path: Union[str, os.PathLike]):
        from tokenizers import Tokenizer as _Tok

        self.path = str(Path(path).resolve())
        raw = Path(path).read_bytes()
        self.sha256 = hashlib.sha256(raw).hexdigest()
        try:
            self._tok = _Tok.from_str(raw.decode("utf-8"))
        except Exception as exc:
            raise ConfigError(f"data.tokenizer: {path} is not a `tokenizers` JSON file: {exc}") from None
        self.eos_id = self._find_eos(path)
        pad = next((self._tok.token_to_id(t) for t in ("<pad>", "[PAD]", "<｜▁pad▁｜>") if self._tok.token_to_id(t) is not None),
                   None)
        self.pad_id = self.eos_id if pad is None else pad

    def _find_eos(self, path: Union[str, os.PathLike]) -> int:
        special = {t.content: i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        for name in EOS_CANDIDATES:
            if name in special:
                return special[name]
        for name in EOS_CANDIDATES:  # some files list EOS as a plain vocabulary entry
            tid = self._tok.token_to_id(name)
            if tid is not None:
                return tid
        raise ConfigError(
            f"data.tokenizer: {path} has no end-of-document token (looked for {', '.join(EOS_CANDIDATES)}); "
            "add one as a special token"
        )

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def identity(self) -> dict[str, Any]:
        return {"kind": "tokenizers", "path": self.path, "sha256": self.sha256, "eos_id": self.eos_id,
                "vocab_size": self.vocab_size}


def load_tokenizer(path: Optional[Union[str, os.PathLike]] = None) -> Tokenizer:
    """The tokenizer for `data.tokenizer`: None = bytes; a file or a folder holding tokenizer.json."""
    if path is None or str(path) == "":
        return ByteTokenizer()
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise ConfigError(f"data.tokenizer: file not found: {p}")
    return HFTokenizer(p)


def same_tokenizer(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Identities match by kind and content hash (paths may differ between machines)."""
    return a.get("kind") == b.get("kind") and a.get("sha256") == b.get("sha256")
