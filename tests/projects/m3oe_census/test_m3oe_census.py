"""The M3oE Census-Income study (projects/m3oe_census): its trainer on synthetic domains, the budget
search and per-cell AUC, the Census-Income age domains on the committed slice (no network), and
the --quick path end to end on that slice."""
import csv
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from moekit.models.multidomain import ARCHS, MultiDomainConfig, MultiDomainModel
from moekit.models.multitask import TabularEmbedding
from projects.census_multitask.data import (
    AGE_EDGES,
    age_domain_ids,
    age_domain_names,
    encode_census,
    read_census_csv,
    with_age_domains,
)
from projects.census_multitask.train import binary_auc
from projects.m3oe_census import run as m3oe_run
from projects.m3oe_census.train import config_for_budget, domain_task_auc, evaluate_cells, train_multidomain

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from test_m3oe import _small, _synthetic  # noqa: E402  (the library tests' synthetic domains)

CENSUS = Path(__file__).parent.parent / "census_multitask" / "data"


def test_training_on_synthetic_domains_lowers_the_loss():
    train, val, test = _synthetic(1200, 0), _synthetic(300, 1), _synthetic(300, 2)
    torch.manual_seed(0)
    m = _small("m3oe")
    before = m.structure()
    r = train_multidomain(m, train, val, test, epochs=4, batch_size=64, lr=1e-2, structure_lr=5e-2, patience=4)
    losses = [h["train_loss"] for h in r.history]
    assert losses[-1] < 0.6 * losses[0], losses
    assert len(r.test_auc) == 3 and all(len(row) == 2 for row in r.test_auc)
    assert min(a for row in r.test_auc for a in row) > 0.8, r.test_auc
    assert r.test_auc == evaluate_cells(m, test)                          # the best epoch is restored
    assert r.structure == m.structure() != before
    # structure_lr = 0 leaves the structure weights where they started (which parameter each optimiser
    # moves is checked step by step in tests/test_m3oe.py)
    torch.manual_seed(0)
    frozen = _small("m3oe")
    start = frozen.backbone.structure_logits.detach().clone()
    train_multidomain(frozen, train, val, epochs=1, batch_size=64, lr=1e-2, structure_lr=0.0)
    assert torch.equal(frozen.backbone.structure_logits, start)


def test_config_for_budget_and_cell_auc():
    for arch in ARCHS:
        cfg = config_for_budget(MultiDomainConfig(arch=arch), 20_000, d_in=135, num_domains=3, num_tasks=2)
        n = cfg.build(vocab_sizes=[5] * 32, num_continuous=7, num_domains=3, num_tasks=2).backbone_parameters()
        assert abs(n - 20_000) < 0.03 * 20_000, (arch, cfg.width, n)
    with pytest.raises(ValueError, match="arch must be one of"):
        MultiDomainConfig(arch="dcn")
    s = torch.tensor([0.1, 0.9, 0.3, 0.2, 0.8, 0.4])
    y = torch.tensor([[0, 1], [1, 1], [0, 1], [1, 0], [1, 1], [0, 0]])
    ids = torch.tensor([0, 0, 0, 1, 1, 1])
    auc = domain_task_auc(torch.stack([s, s], 1), y, ids, num_domains=3)
    assert auc[0][0] == binary_auc(s[:3], y[:3, 0]) and math.isnan(auc[0][1])     # one class only
    assert auc[1] == [binary_auc(s[3:], y[3:, 0]), binary_auc(s[3:], y[3:, 1])]
    assert all(math.isnan(a) for a in auc[2])                                          # empty domain


# ---------------------------------------------------------------- Census-Income age domains (committed slice)
@pytest.fixture(scope="module")
def census():
    raw = read_census_csv(CENSUS / "train.csv"), read_census_csv(CENSUS / "test.csv")
    return with_age_domains(encode_census(*raw, val_fraction=0.2, seed=1))


def test_census_age_domains_come_from_the_raw_age_column(census):
    with open(CENSUS / "test.csv", newline="") as f:
        ages = [int(r[0]) for r in csv.reader(f)]                 # an independent parse
    np.testing.assert_array_equal(census.test.age, ages)
    np.testing.assert_array_equal(census.test.domain_ids, [0 if a < 30 else 1 if a < 50 else 2 for a in ages])
    for s in (census.train, census.val):                          # and the age input is the same person's
        np.testing.assert_allclose(s.num[:, 0] * census.num_std[0] + census.num_mean[0], s.age, atol=1e-3)
        assert s.domain_ids.dtype == np.int64 and set(np.unique(s.domain_ids)) == {0, 1, 2}
    assert AGE_EDGES == (30, 50) and age_domain_names() == ("age<30", "30-49", "age>=50")
    assert age_domain_names((18, 40, 65)) == ("age<18", "18-39", "40-64", "age>=65")
    np.testing.assert_array_equal(age_domain_ids(np.array([0, 17, 18, 64, 65, 90]), (18, 65)), [0, 0, 1, 1, 2, 2])
    with pytest.raises(ValueError, match="strictly increasing"):
        age_domain_ids(np.array([1]), (50, 30))


def test_m3oe_trains_on_the_census_slice(census):
    """The data path end to end; 240 training rows are far too few for meaningful per-cell AUCs."""
    torch.manual_seed(0)
    cfg = MultiDomainConfig(arch="m3oe", embed_dim=2, width=8, tower_hidden=4, num_shared_experts=2)
    m = cfg.build(vocab_sizes=census.vocab_sizes, num_continuous=7, num_domains=3, num_tasks=2)
    assert isinstance(m, MultiDomainModel) and isinstance(m.embedding, TabularEmbedding)
    r = train_multidomain(m, census.train, census.val, census.test, epochs=6, batch_size=32, lr=1e-2, patience=6)
    losses = [h["train_loss"] for h in r.history]
    assert r.epochs_run == 6 and losses[-1] < 0.7 * losses[0], losses
    # nobody under 30 in the slice's test rows earns > 50K: that cell has no AUC, every other one has
    assert census.test.labels[census.test.domain_ids == 0, 0].sum() == 0
    assert math.isnan(r.test_auc[0][0])
    assert all(0 <= a <= 1 for d, row in enumerate(r.test_auc) for t, a in enumerate(row) if (d, t) != (0, 0))
    assert math.isclose(r.test_mean, np.nanmean(np.array(r.test_auc)))


def test_trainer_refuses_an_empty_validation_split():
    empty = _synthetic(0, 1)
    with pytest.raises(ValueError, match="train and val must hold at least one row, got 200 and 0"):
        train_multidomain(_small("m3oe"), _synthetic(200, 0), empty, epochs=1)


def test_quick_run_end_to_end_on_the_slice(census, capsys):
    args = m3oe_run.parse_args(["--quick", "--budget", "2000", "--batch-size", "64", "--jobs", "1",
                                "--archs", "mmoe", "m3oe", "m3oe_fixed"])
    assert args.seeds == [0] and args.epochs == 1
    results = m3oe_run.run(census, args)
    assert list(results) == ["mmoe", "m3oe", "m3oe_fixed"]
    assert results["m3oe_fixed"][0].structure == pytest.approx({k: 1 / (1 + math.exp(-1)) for k in
                                                                results["m3oe"][0].structure})
    assert results["m3oe"][0].structure != results["m3oe_fixed"][0].structure
    out = capsys.readouterr().out
    assert "| M3oE |" in out and "fusion weights" in out
