"""projects/continual_moe_theory: the R2 task generator and the run's metrics on a short sequence."""
import torch

from projects.continual_moe_theory.data import make_tasks
from projects.continual_moe_theory.run import main, parse_args, run_variant


def test_make_tasks_follows_the_recipe():
    tasks, w_true, clusters = make_tasks(num_clusters=3, d=12, num_tasks=30, samples=5, beta=2.0, seed=0)
    assert len(tasks) == 30 and w_true.shape == (3, 12) and clusters.shape == (30,)
    torch.testing.assert_close(w_true.norm(dim=1), torch.ones(3, dtype=torch.float64))
    for (X, y), n in zip(tasks, clusters.tolist()):
        assert X.shape == (12, 5) and y.shape == (5,)
        torch.testing.assert_close(y, X.T @ w_true[n])
        norms = X.norm(dim=0)
        assert torch.isclose(norms, torch.tensor(2.0, dtype=torch.float64)).sum() == 1     # the cluster column


def test_quick_flag():
    args = parse_args(["--quick"])
    assert (args.num_tasks, args.t1, args.experts, args.plot_dir) == (600, 200, [8], "")


def test_single_expert_forgets_and_moe_metrics_are_consistent():
    args = parse_args(["--num-tasks", "200", "--t1", "100", "--plot-dir", ""])
    tasks, w_true, clusters = make_tasks(num_tasks=200, seed=0, beta=args.beta)
    single = run_variant(tasks, w_true, clusters, experts=1, t1=None, args=args, seed=0)
    moe = run_variant(tasks, w_true, clusters, experts=4, t1=100, args=args, seed=0)
    assert single["purity"] <= 0.5 and single["F"] > 0.1
    assert moe["G"] < single["G"] and moe["router_moves_after_t1"]
    assert moe["chosen"].shape == (200,) and 0 <= moe["purity"] <= 1


def test_quick_main_runs(capsys):
    out = main(["--quick", "--seeds", "0"])
    assert set(out[0]) >= {"single expert", "MoE M=8, no termination", "MoE M=8, T1=200"}
    assert "G_T" in capsys.readouterr().out
