"""Tokenizers that need no download: characters of the training corpus, raw UTF-8 bytes, or a
byte-level BPE trained on the training split.

All are deterministic and serialisable into a checkpoint as plain JSON (the BPE as the
`tokenizers` package's own JSON), so a saved model can be sampled from without the corpus at hand.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import torch

__all__ = ["CharTokenizer", "ByteTokenizer", "BPETokenizer", "build_tokenizer", "tokenizer_from_dict",
           "TOKENIZERS"]

TOKENIZERS = ("char", "byte", "bpe")


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


def _tokenizers():
    try:
        import tokenizers
    except ImportError as e:
        raise ImportError("the BPE tokenizer needs the `tokenizers` package: pip install 'moekit[train]'") from e
    return tokenizers


def _byte_alphabet() -> dict:
    """GPT-2's byte-level alphabet, inverted: printable character → the byte it stands for.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes take the code points
    256, 257, … in byte order (the `tokenizers` ByteLevel pre-tokenizer uses the same map)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    chars = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


class BPETokenizer:
    """Byte-level BPE (GPT-2's scheme: bytes mapped to printable characters, merges learned on
    the training text) held by a `tokenizers.Tokenizer`. Any text round-trips; no unknown id.
    Ids whose bytes are not valid UTF-8 (a model's sample can hold them) decode as ``\\xNN``
    escapes, never as U+FFFD."""

    unknown_id = None
    _BYTES = _byte_alphabet()

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        vocab = tokenizer.get_vocab()
        self._pieces = [""] * (max(vocab.values()) + 1 if vocab else 0)
        for piece, i in vocab.items():
            self._pieces[i] = piece

    @classmethod
    def train(cls, texts: Iterable[str], *, vocab_size: int, min_frequency: int = 2) -> "BPETokenizer":
        tk = _tokenizers()
        tok = tk.Tokenizer(tk.models.BPE())
        tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = tk.decoders.ByteLevel()
        trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                         initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
                                         special_tokens=[])
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @classmethod
    def from_json(cls, text: str) -> "BPETokenizer":
        return cls(_tokenizers().Tokenizer.from_str(text))

    def to_json(self) -> str:
        return self.tokenizer.to_str()

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor(self.tokenizer.encode(text).ids, dtype=torch.long)

    def encode_many(self, texts: list) -> list:
        """int32 id arrays of several texts at once (the `tokenizers` batch path, multi-threaded)."""
        return [np.asarray(e.ids, dtype=np.int32) for e in self.tokenizer.encode_batch(list(texts))]

    def _bytes(self, ids) -> bytes:
        return bytes(self._BYTES[c] for i in ids for c in self._pieces[int(i)])

    def decode(self, ids) -> str:
        return self._bytes(ids).decode("utf-8", errors="backslashreplace")

    def token_str(self, i: int) -> str:
        return self.decode([i])

    def to_dict(self) -> dict:
        return {"kind": "bpe", "tokenizer": json.loads(self.to_json())}


def _bpe_cache_key(texts: list, vocab_size: int) -> str:
    h = hashlib.sha256(f"bpe-bytelevel-v1 vocab={vocab_size} min_frequency=2 docs={len(texts)}".encode())
    for t in texts:
        h.update(hashlib.sha256(t.encode("utf-8", errors="surrogatepass")).digest())
    return h.hexdigest()[:24]


def build_bpe(texts: Iterable[str], *, vocab_size: int, cache_dir: Optional[os.PathLike] = None) -> BPETokenizer:
    """A byte-level BPE trained on `texts`, cached as ``<cache>/tokenizers/bpe-<key>.json``
    where the key hashes every text (in order) and the settings: the same training split
    gives the same tokenizer without retraining."""
    from moekit.train.fetch import default_cache_dir

    texts = list(texts)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = root / "tokenizers" / f"bpe-{_bpe_cache_key(texts, vocab_size)}.json"
    if path.exists():
        try:
            return BPETokenizer.from_json(path.read_text(encoding="utf-8"))
        except Exception:             # a damaged cache file: retrain and replace it
            pass
    tok = BPETokenizer.train(texts, vocab_size=vocab_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    tmp.write_text(tok.to_json(), encoding="utf-8")
    os.replace(tmp, path)
    return tok


def build_tokenizer(kind: str, texts: Iterable[str], *, vocab_size: int = 4096,
                    cache_dir: Optional[os.PathLike] = None):
    """The tokenizer `kind` built on the training `texts` (`vocab_size` and `cache_dir` are the BPE's)."""
    if kind == "char":
        return CharTokenizer.from_texts(texts)
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        return build_bpe(texts, vocab_size=vocab_size, cache_dir=cache_dir)
    raise ValueError(f"tokenizer must be one of {TOKENIZERS}, got {kind!r}")


def tokenizer_from_dict(d: dict):
    kind = d.get("kind")
    if kind == "char":
        return CharTokenizer(d["chars"])
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        return BPETokenizer.from_json(json.dumps(d["tokenizer"]))
    raise ValueError(f"tokenizer kind must be one of {TOKENIZERS}, got {kind!r}")
