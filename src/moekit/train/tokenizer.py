"""Tokenizers that need no download: characters of the training corpus, or raw UTF-8 bytes.

Both are tiny, deterministic and serialisable into a checkpoint as plain JSON, so a saved
model can be sampled from without the corpus at hand.
"""
from __future__ import annotations

from typing import Iterable

import torch

__all__ = ["CharTokenizer", "ByteTokenizer", "build_tokenizer", "tokenizer_from_dict", "TOKENIZERS"]

TOKENIZERS = ("char", "byte")


class CharTokenizer:
    """One id per distinct character of the corpus (sorted), plus id 0 for unseen characters."""

    UNK = "\ufffd"
    unknown_id = 0               # never sampled (`TransformerLM.generate(suppress_ids=...)`)

    def __init__(self, chars: str):
        chars = "".join(sorted(set(chars) - {self.UNK}))
        self.chars = chars
        self.itos = [self.UNK] + list(chars)
        self.stoi = {ch: i for i, ch in enumerate(self.itos)}

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> "CharTokenizer":
        seen: set[str] = set()
        for t in texts:
            seen.update(t)
        return cls("".join(seen))

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor([self.stoi.get(ch, 0) for ch in text], dtype=torch.long)

    def decode(self, ids) -> str:
        return "".join(self.itos[int(i)] if 0 <= int(i) < len(self.itos) else self.UNK for i in ids)

    def token_str(self, i: int) -> str:
        return self.itos[i]

    def to_dict(self) -> dict:
        return {"kind": "char", "chars": self.chars}


class ByteTokenizer:
    """UTF-8 bytes, vocabulary 256; any text round-trips. Bytes that are not valid UTF-8 (a
    model's sample can hold them) decode as ``\\xNN`` escapes, never as U+FFFD."""

    vocab_size = 256
    unknown_id = None

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> "ByteTokenizer":
        return cls()

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="backslashreplace")

    def token_str(self, i: int) -> str:
        return chr(i) if 32 <= i < 127 or i == 10 else f"\\x{i:02x}"

    def to_dict(self) -> dict:
        return {"kind": "byte"}


def build_tokenizer(kind: str, texts: Iterable[str]):
    if kind == "char":
        return CharTokenizer.from_texts(texts)
    if kind == "byte":
        return ByteTokenizer()
    raise ValueError(f"tokenizer must be one of {TOKENIZERS}, got {kind!r}")


def tokenizer_from_dict(d: dict):
    kind = d.get("kind")
    if kind == "char":
        return CharTokenizer(d["chars"])
    if kind == "byte":
        return ByteTokenizer()
    raise ValueError(f"tokenizer kind must be one of {TOKENIZERS}, got {kind!r}")
