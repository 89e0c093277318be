"""Hierarchical mixture of experts (METHODS.md F2) and the piecewise-linear recovery of R3."""
import pytest
import torch

from moekit.layers.hme import HierarchicalMoE, irls_multinomial

SLOPES = torch.tensor([[2.0, 1.0], [-1.0, 0.5], [3.0, -1.0], [0.0, 0.0]], dtype=torch.float64)
NOISE = 0.05



def piecewise_linear(n, g):
    """R3: x ~ U[−1, 1], four regimes on equal-width intervals, noise N(0, 0.05²)."""
    x = torch.rand(n, 1, generator=g, dtype=torch.float64) * 2 - 1
    regime = ((x[:, 0] + 1) / 0.5).long().clamp(max=3)
    y = SLOPES[regime, :1] * x + SLOPES[regime, 1:] + NOISE * torch.randn(n, 1, generator=g, dtype=torch.float64)
    return x, y


def linear_baseline_mse(x, y, xt, yt):
    X, Xt = torch.cat([x, torch.ones_like(x[:, :1])], 1), torch.cat([xt, torch.ones_like(xt[:, :1])], 1)
    beta = torch.linalg.lstsq(X, y).solution
    return (Xt @ beta - yt).square().mean().item()


def test_responsibilities_sum_to_one_and_prediction_is_gate_weighted_mean():
    m = HierarchicalMoE(d_model=3, d_out=2, branching=(3, 2)).double()
    x, y = torch.randn(50, 3, dtype=torch.float64), torch.randn(50, 2, dtype=torch.float64)
    h = m.responsibilities(x, y)
    torch.testing.assert_close(h.sum((1, 2)), torch.ones(50, dtype=torch.float64))
    log_top, log_nested = m.log_gates(x)
    torch.testing.assert_close(log_nested.exp().sum(-1), torch.ones(50, 3, dtype=torch.float64))
    manual = sum(log_top[:, i:i + 1].exp() * log_nested[:, i, j:j + 1].exp() * m.leaf_means(x)[:, i, j]
                 for i in range(3) for j in range(2))
    torch.testing.assert_close(m(x), manual)
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        m(torch.randn(5, 4))


def test_irls_reaches_the_weighted_logistic_optimum():
    g = torch.Generator().manual_seed(0)
    X = torch.cat([torch.randn(200, 2, generator=g, dtype=torch.float64), torch.ones(200, 1, dtype=torch.float64)], 1)
    C = torch.softmax(torch.randn(200, 3, generator=g, dtype=torch.float64), -1) * torch.rand(200, 1, generator=g,
                                                                                          dtype=torch.float64)
    W = irls_multinomial(torch.zeros(3, 3, dtype=torch.float64), X, C, steps=50)
    p = torch.softmax(X @ W.t(), -1)
    grad = (C - C.sum(-1, keepdim=True) * p).t() @ X
    assert grad.abs().max().item() < 1e-8


def test_em_log_likelihood_is_monotone():
    g = torch.Generator().manual_seed(1)
    x, y = piecewise_linear(400, g)
    torch.manual_seed(1)
    m = HierarchicalMoE(d_model=1, d_out=1, branching=(2, 2)).double()
    history = m.fit_em(x, y, iters=30, irls_steps=20, tol=0.0)
    assert len(history) == 31
    assert all(b >= a - 1e-8 for a, b in zip(history, history[1:])), history
    assert history[-1] > history[0] + 1.0


def test_em_recovers_the_piecewise_linear_regimes():
    """R3: depth-2 HME (2×2) by EM reaches the noise floor, with breakpoints within ±0.05."""
    g = torch.Generator().manual_seed(2)
    x, y = piecewise_linear(2000, g)
    xt, yt = piecewise_linear(2000, g)
    torch.manual_seed(2)
    m = HierarchicalMoE(d_model=1, d_out=1, branching=(2, 2)).double()
    m.fit_em(x, y, iters=100, n_init=5, init_iters=25, generator=torch.Generator().manual_seed(2))
    mse = (m(xt) - yt).square().mean().item()
    assert mse < 3 * NOISE ** 2, mse                          # noise floor 0.0025
    assert linear_baseline_mse(x, y, xt, yt) > 20 * mse
    grid = torch.linspace(-1, 1, 4001, dtype=torch.float64).unsqueeze(-1)
    leaf = m.leaf_assignment(grid)
    breaks = grid[1:, 0][leaf[1:] != leaf[:-1]]
    assert breaks.numel() == 3
    torch.testing.assert_close(breaks, torch.tensor([-0.5, 0.0, 0.5], dtype=torch.float64), atol=0.05, rtol=0)
    # Every regime is served by one leaf, and different regimes by different leaves.
    regime = ((xt[:, 0] + 1) / 0.5).long().clamp(max=3)
    leaves = m.leaf_assignment(xt)
    purity = sum((leaves[regime == r].bincount(minlength=4).max()).item() for r in range(4)) / 2000
    assert purity > 0.97
    assert leaves.unique().numel() == 4


def test_gradient_training_lowers_nll_and_beats_linear():
    g = torch.Generator().manual_seed(3)
    x, y = piecewise_linear(1000, g)
    xt, yt = piecewise_linear(1000, g)
    x, y, xt, yt = x.float(), y.float(), xt.float(), yt.float()
    torch.manual_seed(5)
    m = HierarchicalMoE(d_model=1, d_out=1, branching=(2, 2))
    opt = torch.optim.Adam(m.parameters(), lr=0.05)
    start = m.nll(x, y).item()
    for _ in range(300):
        loss = m.nll(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())
    assert loss.item() < start - 1.0
    mse = (m(xt) - yt).square().mean().item()
    assert mse < 0.5 * linear_baseline_mse(x.double(), y.double(), xt.double(), yt.double())


def test_em_recovers_quadrant_regimes_in_2d():
    """R3's 2-D variant: x ∈ U[−1, 1]², one linear regime per quadrant; the 2×2 tree's top gate
    splits on one axis and the nested gates on the other."""
    A = torch.tensor([[2.0, -1.0, 1.0], [-1.0, 1.0, 0.5], [3.0, 0.0, -1.0], [0.0, 2.0, 0.0]], dtype=torch.float64)

    def quadrants(n, g):
        x = torch.rand(n, 2, generator=g, dtype=torch.float64) * 2 - 1
        q = (x[:, 0] > 0).long() * 2 + (x[:, 1] > 0).long()
        y = (A[q, :2] * x).sum(-1, keepdim=True) + A[q, 2:] + NOISE * torch.randn(n, 1, generator=g,
                                                                                   dtype=torch.float64)
        return x, y, q

    g = torch.Generator().manual_seed(4)
    x, y, _ = quadrants(1200, g)
    xt, yt, qt = quadrants(1200, g)
    torch.manual_seed(4)
    m = HierarchicalMoE(d_model=2, d_out=1, branching=(2, 2)).double()
    m.fit_em(x, y, iters=60, n_init=4, init_iters=20, generator=torch.Generator().manual_seed(4))
    leaves = m.leaf_assignment(xt)
    purity = sum(leaves[qt == r].bincount(minlength=4).max().item() for r in range(4)) / 1200
    assert purity > 0.98 and leaves.unique().numel() == 4
    mse = (m(xt) - yt).square().mean().item()
    assert mse < 6 * NOISE ** 2, mse
    assert linear_baseline_mse(x, y, xt, yt) > 20 * mse


def test_irls_step_is_the_newton_step_of_the_weighted_multinomial_log_likelihood():
    """One IRLS step = one Newton step on Q(W) = Σ_n Σ_k C_nk log softmax(W x_n)_k, with the
    gradient and Hessian taken by autograd. Q is invariant to adding one vector to every row of
    W, so its Hessian is singular; the gradient is orthogonal to that null space and the Newton
    step is the pseudo-inverse solve (which the damped solve approaches), compared after removing
    the row mean (the component along the null space, which no softmax sees)."""
    g = torch.Generator().manual_seed(7)
    N, K, Q = 12, 3, 3
    X = torch.cat([torch.randn(N, Q - 1, generator=g, dtype=torch.float64), torch.ones(N, 1, dtype=torch.float64)], 1)
    C = torch.softmax(torch.randn(N, K, generator=g, dtype=torch.float64), -1) * torch.rand(N, 1, generator=g,
                                                                                          dtype=torch.float64)
    W0 = 0.3 * torch.randn(K, Q, generator=g, dtype=torch.float64)

    def objective(w_flat):
        return (C * torch.log_softmax(X @ w_flat.view(K, Q).t(), -1)).sum()

    grad = torch.autograd.functional.jacobian(objective, W0.reshape(-1))
    hess = torch.autograd.functional.hessian(objective, W0.reshape(-1))
    assert torch.linalg.matrix_rank(hess).item() == (K - 1) * Q           # one null direction per input
    newton = W0 - (torch.linalg.pinv(hess) @ grad).view(K, Q)
    got = irls_multinomial(W0, X, C, steps=1, damping=1e-12)

    def centred(w):
        return w - w.mean(0, keepdim=True)

    torch.testing.assert_close(centred(got), centred(newton), atol=1e-8, rtol=0)
    # With visible damping it is exactly the damped Newton system, still solved from autograd's terms.
    lam = 1e-2 * (-hess).diagonal().abs().max()
    damped = W0 + torch.linalg.solve(-hess + lam * torch.eye(K * Q, dtype=torch.float64), grad).view(K, Q)
    torch.testing.assert_close(irls_multinomial(W0, X, C, steps=1, damping=1e-2), damped, atol=1e-10, rtol=0)
    assert objective(got.reshape(-1)) > objective(W0.reshape(-1))


def test_depth_one_hme_is_the_flat_mixture_under_em():
    """A tree (E, 1) (E top branches, one leaf each) and a tree (1, E) (one branch, E leaves)
    are the same flat mixture of E linear experts: with matched parameters the EM iterates and
    the log-likelihood histories agree."""
    g = torch.Generator().manual_seed(8)
    x, y = piecewise_linear(300, g)
    torch.manual_seed(8)
    wide = HierarchicalMoE(d_model=1, d_out=1, branching=(4, 1)).double()
    deep = HierarchicalMoE(d_model=1, d_out=1, branching=(1, 4)).double()
    with torch.no_grad():
        deep.nested_gates[0].copy_(wide.top_gate)
        deep.top_gate.zero_()
        deep.experts[0].copy_(wide.experts[:, 0])
        deep.log_var[0].copy_(wide.log_var[:, 0])
    torch.testing.assert_close(deep(x), wide(x))
    h_wide, h_deep = wide.fit_em(x, y, iters=15, tol=0.0), deep.fit_em(x, y, iters=15, tol=0.0)
    torch.testing.assert_close(torch.tensor(h_deep), torch.tensor(h_wide), atol=1e-9, rtol=0)
    torch.testing.assert_close(deep.experts[0], wide.experts[:, 0], atol=1e-7, rtol=0)
    torch.testing.assert_close(deep(x), wide(x), atol=1e-8, rtol=0)


def test_em_history_with_restarts_is_the_chosen_starts_whole_trajectory():
    g = torch.Generator().manual_seed(9)
    x, y = piecewise_linear(300, g)
    torch.manual_seed(9)
    m = HierarchicalMoE(d_model=1, d_out=1, branching=(2, 2)).double()
    history = m.fit_em(x, y, iters=12, n_init=3, init_iters=6, tol=0.0, generator=torch.Generator().manual_seed(9))
    assert len(history) == 1 + 6 + 12
    assert all(b >= a - 1e-8 for a, b in zip(history, history[1:])), history
    assert history[-1] > history[0]                               # it starts at the start's own init
    with torch.no_grad():
        assert history[-1] == pytest.approx(float(m.log_likelihood(x, y)), abs=1e-12)
