"""projects/continual_split_fmnist: the task split, the per-seed run and the summary, on tiny synthetic data."""
import argparse
import math

import numpy as np
import pytest
import torch

from projects.continual_split_fmnist.data import TASK_CLASSES, split_tasks
from projects.continual_split_fmnist.run import parse_args, run_seed, summarise


def _images(n, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, 4, 5), dtype=np.uint8), rng.integers(0, 10, size=n)


def test_split_tasks_standardises_with_shared_statistics_and_keeps_tasks_disjoint():
    (xtr, ytr), (xte, yte) = _images(400, 0), _images(100, 1)
    tasks, x_test, y_test = split_tasks(xtr, ytr, xte, yte, per_task=7)
    assert len(tasks) == 5 and x_test.shape == (100, 20) and torch.equal(y_test, torch.as_tensor(yte))
    mean, std = xtr.mean() / 255, xtr.std() / 255        # numpy: float64, population std
    for (x, y, xt, yt), cs in zip(tasks, TASK_CLASSES):
        assert len(y) == 7 and set(y.tolist()) <= set(cs) and set(yt.tolist()) <= set(cs)
        assert len(yt) == int(np.isin(yte, cs).sum())        # every test image of the task
        first = np.flatnonzero(np.isin(ytr, cs))[:7]
        torch.testing.assert_close(x, torch.from_numpy((xtr[first].reshape(7, -1) / 255 - mean) / std).float())
    all_x = torch.cat([t[0] for t in tasks])
    assert all_x.dtype == torch.float32
    with pytest.raises(ValueError, match="per_task must be a positive int, got 0"):
        split_tasks(xtr, ytr, xte, yte, per_task=0)


def test_quick_flag_and_seeds():
    args = parse_args(["--quick", "--seeds", "0", "3"])
    assert (args.train_per_task, args.epochs, args.seeds) == (500, 1, [0, 3])


def _synthetic_tasks(d=12, n=60, seed=0):
    """5 two-class tasks, each a linear rule on inputs shifted by a task-specific offset."""
    g = torch.Generator().manual_seed(seed)
    tasks = []
    for t, (a, b) in enumerate(TASK_CLASSES):
        w, shift = torch.randn(d, generator=g), 3 * torch.randn(d, generator=g)
        x = torch.randn(2 * n, d, generator=g) + shift
        y = torch.where((x - shift) @ w > 0, b, a)
        tasks.append((x[:n], y[:n], x[n:], y[n:]))
    return tasks, torch.cat([t[2] for t in tasks]), torch.cat([t[3] for t in tasks])


def test_run_seed_on_synthetic_tasks():
    tasks, x_test, y_test = _synthetic_tasks()
    args = argparse.Namespace(**{**vars(parse_args([])), **dict(
        epochs=3, expert_hidden=4, experts_per_task=2, lr=1e-2, batch_size=16, gate_hidden=4, gate_epochs=3,
        train_per_task=60, seed_hidden=8, seed_latent=3, c5_hidden=4, c3_dim=8, c3_blocks=1, c3_experts=4,
        c3_adapter=4, c3_ae_hidden=4, c3_pretrain_epochs=2)})
    g = torch.Generator().manual_seed(5)
    x_pre = torch.randn(200, 12, generator=g)
    y_pre = (x_pre[:, :10].argmax(-1))
    pretrain = (x_pre[:150], y_pre[:150], x_pre[150:], y_pre[150:])
    res = run_seed(tasks, x_test, y_test, args, seed=0, pretrain=pretrain)
    assert set(res) == {"fine-tune (dense)", "MoE grow+freeze", "MoE grow, no freeze", "Task-MoE (E fixed)",
                        "C2 input-routed, no KL", "C2 input-routed + KL", "C3 MoE adapters + DDAS", "C4 SEED",
                        "C5 locality MoE",
                        "MoE grow+freeze + Expert Gate", "joint (dense, upper bound)"}
    assert res["MoE grow+freeze"]["F"] == 0.0          # an old task's path is bit-identical
    assert res["MoE grow+freeze + Expert Gate"]["A"] == res["MoE grow+freeze"]["A"]
    assert res["MoE grow+freeze + Expert Gate"]["params"] > res["MoE grow+freeze"]["params"]
    assert math.isnan(res["joint (dense, upper bound)"]["F"])
    # what the last task trained: SEED one expert (784 → 8 → 3 here: 12·8 + 8 + 8·3 + 3 entries at most),
    # fine-tuning (nearly) everything, joint all
    assert 0 < res["C4 SEED"]["trained"] <= 12 * 8 + 8 + 8 * 3 + 3
    assert res["joint (dense, upper bound)"]["trained"] == res["joint (dense, upper bound)"]["params"]
    assert res["MoE grow+freeze"]["trained"] < res["fine-tune (dense)"]["trained"]
    assert all(0 <= r["A"] <= 1 and 0 <= r["CIL"] <= 1 for r in res.values())
    c3 = res["C3 MoE adapters + DDAS"]
    # the system keeps a held-out digit's backbone prediction only where the selector says OOD
    assert c3["zs_system"] <= c3["zs_backbone"] and c3["zs_system"] <= c3["ood_mnist"]
    # C3 trains only adapters, routers, a head and an auto-encoder: far fewer entries than it holds
    assert 0 < c3["trained"] < c3["params"] / 2
    # equal final size: the dense MLP of T·n·F hidden units vs 10 experts of F (plus the router)
    assert abs(res["fine-tune (dense)"]["params"] - res["MoE grow+freeze"]["params"]) < 300
    s = summarise([res, res])
    assert s["MoE grow+freeze"]["A"] == (res["MoE grow+freeze"]["A"], 0.0)
    assert all(math.isnan(v) for v in s["joint (dense, upper bound)"]["F"])
