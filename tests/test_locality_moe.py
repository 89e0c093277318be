"""METHODS.md C5 (theory-driven MoE for continual learning, Li et al. 2024/ICLR 2025): the
minimum-norm expert update, the locality and balance losses, router termination, and the same
strategy on deep experts."""
import pytest
import torch

from moekit.continual import (
    ContinualLinearMoE,
    LocalityRouter,
    assigned_task_net,
    learn_task_locality,
    min_norm_update,
)
from projects.continual_moe_theory.data import make_tasks


def test_min_norm_update_is_the_closest_interpolator():
    g = torch.Generator().manual_seed(0)
    w, X, y = (torch.randn(12, generator=g, dtype=torch.float64), torch.randn(12, 5, generator=g, dtype=torch.float64),
               torch.randn(5, generator=g, dtype=torch.float64))
    new = min_norm_update(w, X, y)
    torch.testing.assert_close(X.T @ new, y)
    torch.testing.assert_close(new, w + torch.linalg.pinv(X.T) @ (y - X.T @ w))
    with pytest.raises(ValueError, match="s <= d"):
        min_norm_update(w[:4], X[:4], y)


def test_locality_loss_counts_only_the_expert_that_moved_and_balance_uses_the_history():
    torch.manual_seed(0)
    r = LocalityRouter(6, 3, alpha=0.7)
    with torch.no_grad():
        r.weight.copy_(torch.randn(3, 6, dtype=torch.float64))
        r.counts.copy_(torch.tensor([3.0, 1.0, 0.0], dtype=torch.float64))
    z = torch.randn(6, dtype=torch.float64)
    pi = torch.softmax(r.weight @ z, -1)
    loc, aux = r.losses(z, 1, 2.5)
    torch.testing.assert_close(loc, pi[1] * 2.5)
    f = torch.tensor([3.0, 2.0, 0.0], dtype=torch.float64) / 5
    torch.testing.assert_close(aux, 0.7 * 3 * (f * pi).sum())
    assert r.losses(z, 2, 0.0)[0] == 0            # no expert moved: no locality loss
    # the GD step is -lr times the gradient of L_loc + L_aux
    w0 = r.weight.clone()
    wg = w0.clone().requires_grad_(True)
    pi_g = torch.softmax(wg @ z, -1)
    (grad,) = torch.autograd.grad(pi_g[1] * 2.5 + 0.7 * 3 * (f * pi_g).sum(), wg)
    out = r.step(z, 1, 2.5)
    assert out["updated"] and torch.allclose(r.weight, w0 - 0.1 * grad)
    assert r.counts.tolist() == [3.0, 2.0, 0.0]


def test_router_is_constant_after_termination():
    tasks, _, _ = make_tasks(num_tasks=60, d=20, samples=8, seed=1)
    moe = ContinualLinearMoE(20, 4, terminate_after=25, seed=1)
    snapshots = []
    for t, (X, y) in enumerate(tasks):
        moe.learn_task(X, y)
        snapshots.append(moe.router.weight.clone())
    assert not torch.equal(snapshots[23], snapshots[24])          # round 24 < T1 still learns
    assert all(torch.equal(snapshots[24], s) for s in snapshots[25:])
    assert moe.router.terminated and moe.router.counts.sum() == 60


def test_each_expert_ends_up_serving_one_cluster_with_termination():
    """R2 at a small size (seed 0): with termination each expert of the last tasks serves one
    cluster (its majority, all distinct; a few noisy tasks still stray) and the experts know
    their clusters; one expert alone cannot."""
    tasks, w_true, clusters = make_tasks(num_tasks=1200, seed=0, beta=5.0)
    ends = {}
    for M in (1, 4):
        moe = ContinualLinearMoE(50, M, terminate_after=600, lr=1.0, alpha=2.0, seed=0)
        chosen = torch.tensor([moe.learn_task(X, y) for X, y in tasks])
        tail = slice(900, 1200)
        counts_MN = torch.zeros(M, 4)
        counts_MN.index_put_((chosen[tail], clusters[tail]), torch.ones(300), accumulate=True)
        ends[M] = (counts_MN, float((moe.w[chosen[tail]] - w_true[clusters[tail]]).square().sum(1).mean()))
    counts_MN, err = ends[4]
    assert sorted(counts_MN.argmax(1).tolist()) == [0, 1, 2, 3]     # a bijection between experts and clusters
    assert counts_MN.max(1).values.sum() / 300 > 0.95
    assert err < 0.05 and ends[1][1] > 0.5


def test_deep_locality_trains_only_the_chosen_expert():
    g = torch.Generator().manual_seed(0)
    tc = [(0, 1), (2, 3), (4, 5)]
    net = assigned_task_net(d_in=6, d_expert=5, num_experts=3, num_classes=6, task_classes=tc)
    router = LocalityRouter(6, 3, lr=1.0, seed=0)
    for t, cs in enumerate(tc):
        x = torch.randn(40, 6, generator=g) + 2 * t
        y = torch.tensor(cs).repeat(20)
        before = [p.detach().clone() for p in net.body.experts.parameters()]
        m = learn_task_locality(net, router, x, y, t, epochs=1, batch_size=8, lr=1e-2)
        for p, q in zip(net.body.experts.parameters(), before):
            moved = [e for e in range(3) if not torch.equal(p[e], q[e])]
            assert moved == [m]
        assert net.body.router.task_experts(t)[0].tolist() == [m]
    assert router.counts.sum() == 3
    with pytest.raises(ValueError, match="assigned_task_net"):
        from moekit.continual import dense_task_net
        learn_task_locality(dense_task_net(d_in=6, d_hidden=4, num_classes=6, task_classes=tc), router, x, y, 0,
                            epochs=1, batch_size=8, lr=1e-2)
