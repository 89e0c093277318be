"""The hierarchical-experts study (projects/hierarchical_experts): the parameter-matched single learner,
the --quick settings, and the run end to end on tiny synthetic domains (the method:
tests/test_meta_hierarchical.py)."""
import numpy as np
import torch

from moekit.meta import TaskDomain
from projects.hierarchical_experts import run as hen_run


def _domains(seed=0, X=12, per_class=20):
    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for i, name in enumerate(("a", "b", "c")):
        means = 2 * torch.randn(10, X, generator=g) + i
        labels = torch.arange(10).repeat_interleave(per_class)
        x = means[labels] + torch.randn(len(labels), X, generator=g)
        tr, te = labels < 6, labels >= 6
        train.append(TaskDomain(name, x[tr], labels[tr], tuple(range(6))))
        test.append(TaskDomain(name, x[te], labels[te], tuple(range(6, 10))))
    return train, test


def test_wide_single_learner_matches_the_hierarchy_in_parameters():
    args = hen_run.parse_args([])
    hen = hen_run.build("hen", args, 784, 64, 0)
    wide = hen_run.build("single-wide", args, 784, 64, 0)
    single = hen_run.build("single", args, 784, 64, 0)
    n_hen, n_wide = hen_run.n_params(hen), hen_run.n_params(wide)
    assert abs(n_wide - n_hen) / n_hen < 0.05 and hen_run.n_params(single) < n_hen / 3
    assert hen.beta_selector == args.beta_selector
    assert hen_run.build("hen-no-info", args, 784, 64, 0).beta_selector == float("inf")


def test_quick_run_end_to_end(capsys):
    args = hen_run.parse_args(["--quick"])
    assert args.seeds == [0] and args.steps == 30 and args.episodes == 20 and args.threads == 1
    args.seeds, args.steps, args.episodes, args.tasks, args.experts = [0, 1], 4, 3, 2, 2
    train, test = _domains()
    out = hen_run.run(train, test, args, d_model=8)
    for name in hen_run.MODELS:
        for d in ("a", "b", "c"):
            for shots in (1, 5):
                a = out[name, d, shots]
                assert a.shape == (2, 3) and ((a >= 0) & (a <= 1)).all()
                assert np.allclose(a * 60, np.round(a * 60))            # 4-way, 15 queries per class
    for name in ("hen", "hen-no-info"):
        mi = out["mi", name, 1]
        assert mi.shape == (2, 2) and (mi >= 0).all() and (mi[:, 1] <= 1 + 1e-9).all()
        assert (out["counts", name, 1].sum(-1) == 3).all()              # every test episode chose one expert
    text = capsys.readouterr().out
    assert "I(domain; expert)" in text and "single-wide" in text
