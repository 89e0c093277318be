"""M3oE on MovieLens-1M: the released code's domains, tasks and split on a tiny synthetic file,
per-cell logloss, and one variant trained end to end (no download)."""
import math
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

from projects.m3oe_movielens import run as R
from projects.m3oe_movielens.data import AGE_GROUPS, encode

AGES = [1, 18, 25, 35, 45, 50, 56]


def synthetic(n=200, seed=0):
    rng = np.random.default_rng(seed)
    users = [[f"u{i}", str(AGES[i % 7]), "MF"[i % 2], str(i % 5), f"{i % 9:05d}"] for i in range(30)]
    items = [[f"m{j}", f"movie {j}", "1990", ["Comedy Drama", "Action", "Drama Romance"][j % 3]] for j in range(20)]
    inter = [[f"u{rng.integers(30)}", f"m{rng.integers(20)}", str(rng.integers(1, 6)), "0"] for _ in range(n)]
    return inter, users, items


def test_domains_tasks_and_split_as_released():
    inter, users, items = synthetic()
    data = encode(inter, users, items)
    assert (len(data.train), len(data.val), len(data.test)) == (160, 20, 20)
    cat = np.concatenate([data.train.cat, data.val.cat, data.test.cat])
    dom = np.concatenate([data.train.domain_ids, data.val.domain_ids, data.test.domain_ids])
    labels = np.concatenate([data.train.labels, data.val.labels, data.test.labels])
    age_of = {u[0]: int(u[1]) for u in users}
    for row, d, y, raw in zip(cat, dom, labels, inter):
        assert age_of[raw[0]] in AGE_GROUPS[d] and row[-1] == d                  # domain id is also an input
        r = int(raw[2])
        assert y.tolist() == [float(r > 3), float(r > 4)]
    assert data.vocab_sizes[-1] == 3 and data.vocab_sizes[5] == 3                # genres: first word only
    assert all(int(cat[:, c].max()) < v for c, v in enumerate(data.vocab_sizes))
    num = np.concatenate([data.train.num, data.val.num, data.test.num])
    assert num.min() >= 0 and num.max() <= 1


def test_cell_logloss_is_the_per_cell_bce():
    torch.manual_seed(0)
    logits, y = torch.randn(12, 2), torch.randint(0, 2, (12, 2)).float()
    dom = torch.tensor([0, 1] * 6)
    out = R.cell_logloss(logits, y, dom, 3)
    rows = dom == 1
    assert math.isclose(out[1][0], float(F.binary_cross_entropy_with_logits(logits[rows, 0], y[rows, 0])),
                        rel_tol=1e-6)
    assert all(math.isnan(v) for v in out[2])


def test_a_variant_trains_and_an_ablation_stays_pinned():
    data = encode(*synthetic(600, 1))
    args = SimpleNamespace(embed_dim=4, budget=2_000, epochs=1, patience=1, lr=3e-3, batch_size=64,
                           structure_lr=1e-2)
    r = R.run_variant(data, "m3oe_no_domain", 0, args)
    assert r["structure"]["b_domain"] == 0.0 and r["structure"]["b_task"] != 0.0
    assert len(r["auc"]) == 3 and len(r["logloss"][0]) == 2
    assert all(math.isfinite(v) for row in r["logloss"] for v in row)
    r = R.run_variant(data, "star", 0, args)
    assert r["structure"] is None and abs(r["params"] - 2_000) < 600
