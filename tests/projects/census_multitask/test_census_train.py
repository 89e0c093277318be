"""The Census-Income multi-task study's training code (projects/census_multitask/train.py, run.py):
the rank AUC against a pairwise count, the budget search, early stopping, a short training on the
committed slice of the real data, and the --quick path end to end on that slice."""
import itertools
import math
from pathlib import Path

import pytest
import torch

from moekit.models.multitask import ARCHS, MultiTaskConfig
from projects.census_multitask import run as census_run
from projects.census_multitask.data import encode_census, read_census_csv
from projects.census_multitask.train import (
    BestEpoch,
    binary_auc,
    config_for_budget,
    evaluate_auc,
    predict_logits,
    train_multitask,
)

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def data():
    return encode_census(read_census_csv(DATA / "train.csv"), read_census_csv(DATA / "test.csv"), val_fraction=0.2,
                         seed=1)


def _build(data, arch, **kw):
    return MultiTaskConfig(arch=arch, **kw).build(vocab_sizes=data.vocab_sizes, num_continuous=7, num_tasks=2)


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


def test_trainer_refuses_bad_arguments(data):
    m = _build(data, "mmoe", expert_hidden=4, num_experts=2)
    with pytest.raises(ValueError, match="epochs must be"):
        train_multitask(m, data.train, data.val, epochs=0)
    with pytest.raises(ValueError, match="patience must be"):
        BestEpoch(patience=0)


def test_quick_run_end_to_end_on_the_slice(data, capsys):
    args = census_run.parse_args(["--quick", "--budget", "2000", "--batch-size", "64"])
    assert args.seeds == [0] and args.epochs == 2
    results = census_run.run(data, args)
    assert list(results) == list(ARCHS) and all(len(r) == 1 for r in results.values())
    for (r,) in results.values():
        assert r.epochs_run <= 2 and len(r.test_auc) == 2 and all(0 <= a <= 1 for a in r.test_auc)
    out = capsys.readouterr().out
    assert "| MMoE |" in out and "| PLE |" in out and "wall time" in out
