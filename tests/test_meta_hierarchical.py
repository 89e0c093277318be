"""Hierarchical expert networks (METHODS.md M5): the free-energy selector is the argmax of the utility
as the selector's cost vanishes (β1 → ∞, cost weight 1/β1 → 0) and the prior as β1 → 0; the closed
form maximises the free energy; both information terms are ≥ 0 and equal a numpy reference on random
joints; one expert is a single learner step for step; the selector reads only the support set; and
training sends each task to the expert the free-energy-optimal selection picks."""
import math

import numpy as np
import pytest
import torch
from test_meta_mxml import _domain as mxml_domain

from moekit.analysis import mutual_information as mi_from_counts
from moekit.meta import (
    DomainEpisodes,
    HierarchicalExpertNetwork,
    blahut_arimoto,
    conditional_mutual_information,
    evaluate_domain,
    information_objective,
    meta_train_domains,
    mutual_information,
    optimal_selector,
    train_hierarchical_experts,
)
from moekit.models import dense_proto_net


def _simplex(g, *shape):
    return torch.distributions.Dirichlet(torch.ones(shape[-1], dtype=torch.float64)).sample(shape[:-1]) \
        if g is None else torch.softmax(2 * torch.randn(*shape, generator=g, dtype=torch.float64), -1)


def _np_entropy(p):
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


@pytest.mark.parametrize("seed", range(4))
def test_mutual_information_equals_numpy_reference_on_random_joints(seed):
    g = torch.Generator().manual_seed(seed)
    B, M, Y = 7, 4, 5
    p_x = torch.softmax(torch.randn(B, generator=g, dtype=torch.float64), 0)
    p_m_x = _simplex(g, B, M)
    p_y_xm = _simplex(g, B, M, Y)
    joint = (p_x[:, None, None] * p_m_x[:, :, None] * p_y_xm).numpy()       # p(x, m, y)
    # I(X; M) = H(X) + H(M) - H(X, M); I(X; Y | M) = H(X, M) + H(M, Y) - H(M) - H(X, M, Y)
    p_xm, p_my, p_m = joint.sum(2), joint.sum(0), joint.sum((0, 2))
    ref_xm = _np_entropy(p_x.numpy()) + _np_entropy(p_m) - _np_entropy(p_xm)
    ref_xy_m = _np_entropy(p_xm) + _np_entropy(p_my) - _np_entropy(p_m) - _np_entropy(joint)
    got_xm = mutual_information(p_m_x, weights_B=p_x)
    got_xy_m = conditional_mutual_information(p_m_x, p_y_xm, weights_B=p_x)
    assert got_xm.item() == pytest.approx(ref_xm, abs=1e-10)
    assert got_xy_m.item() == pytest.approx(ref_xy_m, abs=1e-10)
    assert got_xm.item() == pytest.approx(mi_from_counts(p_xm)[0], abs=1e-10)     # the analysis module agrees
    assert got_xm >= 0 and got_xy_m >= 0


def test_information_terms_are_non_negative_and_bounded():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        B, M, Y = int(torch.randint(1, 9, (1,), generator=g)), int(torch.randint(1, 5, (1,), generator=g)), 3
        p_m_x, p_y_xm = _simplex(g, B, M), _simplex(g, B, M, Y)
        i1, i2 = mutual_information(p_m_x), conditional_mutual_information(p_m_x, p_y_xm)
        assert 0 <= i1 <= math.log(M) + 1e-12 and 0 <= i2 <= math.log(Y) + 1e-12
        prior = _simplex(g, M)
        assert mutual_information(p_m_x, prior_M=prior) >= i1 - 1e-12          # any other prior: an upper bound
    # independence: every x chooses alike and every expert answers alike ⇒ both terms are exactly 0
    same = torch.tensor([[0.2, 0.8]], dtype=torch.float64).expand(5, 2)
    assert mutual_information(same) == 0
    assert conditional_mutual_information(same, torch.full((5, 2, 3), 1 / 3, dtype=torch.float64)) == 0
    # deterministic one-to-one selection of M equally likely experts: I = log M
    assert mutual_information(torch.eye(3, dtype=torch.float64)).item() == pytest.approx(math.log(3))


def test_zero_probabilities_give_finite_values_and_gradients():
    logits = torch.tensor([[0.0, -200.0, 5.0], [1.0, 2.0, -300.0]], requires_grad=True)
    p = torch.softmax(logits, -1)
    assert (p == 0).any()
    total = mutual_information(p) + conditional_mutual_information(p, p[:, :, None].expand(-1, -1, 2).softmax(-1))
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(logits.grad).all()


def test_selector_becomes_the_argmax_of_utility_as_its_cost_vanishes():
    g = torch.Generator().manual_seed(0)
    U = torch.randn(16, 5, generator=g, dtype=torch.float64)
    prior = _simplex(g, 5)
    argmax = torch.nn.functional.one_hot(U.argmax(1), 5).to(U.dtype)
    assert torch.equal(optimal_selector(U, math.inf, prior), argmax)                 # β1 = ∞: deterministic argmax
    torch.testing.assert_close(optimal_selector(U, 1e4, prior), argmax, atol=1e-8, rtol=0)
    # the gap 1 - p*(argmax | x) shrinks monotonically in β1 (d log p*_a / dβ = U_a - E_p*[U] ≥ 0)
    gaps = [(optimal_selector(U, b, prior) - argmax).abs().max().item() for b in (0.1, 1.0, 10.0, 100.0, 1e4)]
    assert gaps == sorted(gaps, reverse=True) and gaps[0] > 0.5 and gaps[-1] < 1e-8
    torch.testing.assert_close(optimal_selector(U, 1e-12, prior), prior.expand(16, 5))  # β1 → 0: the prior
    # ties go to the lowest index, and experts without prior mass are never chosen
    tied = torch.tensor([[1.0, 1.0, 0.0], [0.0, 2.0, 2.0]])
    assert optimal_selector(tied, math.inf).argmax(1).tolist() == [0, 1]
    assert optimal_selector(tied, math.inf, torch.tensor([0.0, 0.5, 0.5])).argmax(1).tolist() == [1, 1]


def test_closed_form_maximises_the_free_energy_for_a_fixed_prior():
    g = torch.Generator().manual_seed(1)
    U = torch.randn(6, 4, generator=g, dtype=torch.float64)
    prior = _simplex(g, 4)
    beta = 2.5

    def free_energy(p):   # per-x objective with a fixed prior, summed over x
        return ((p * U).sum(1) - (1 / beta) * (p * (p / prior).log()).sum(1)).sum()

    best = free_energy(optimal_selector(U, beta, prior))
    for _ in range(200):
        assert free_energy(_simplex(g, 6, 4)) <= best + 1e-12
    # and gradient ascent on free selector logits converges to it
    logits = torch.zeros(6, 4, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=0.1)
    for _ in range(1500):
        opt.zero_grad()
        (-free_energy(torch.softmax(logits, -1))).backward()
        opt.step()
    torch.testing.assert_close(torch.softmax(logits, -1), optimal_selector(U, beta, prior), atol=1e-3, rtol=0)


def test_blahut_arimoto_is_self_consistent_and_trades_utility_for_information():
    g = torch.Generator().manual_seed(2)
    U = torch.randn(12, 4, generator=g, dtype=torch.float64)
    out = {}
    for beta in (0.05, 1.0, 50.0):
        cond, prior = blahut_arimoto(U, beta, iterations=2000)
        torch.testing.assert_close(prior, cond.mean(0))
        torch.testing.assert_close(cond, optimal_selector(U, beta, prior), atol=1e-5, rtol=0)
        terms = information_objective(U, cond, beta_selector=beta)
        out[beta] = (terms.utility.item(), terms.mi_selector.item())
    (u0, i0), (u1, i1), (u2, i2) = out[0.05], out[1.0], out[50.0]
    assert u0 < u1 < u2 and i0 < i1 < i2                       # more resources: more utility, more information
    assert i0 < 1e-3 and u2 == pytest.approx((U.max(1).values).mean().item(), abs=1e-2)


def test_information_objective_terms():
    g = torch.Generator().manual_seed(3)
    B, N, M, Y = 5, 3, 2, 4
    U, sel, pol = torch.randn(B, M, generator=g), _simplex(g, B, M).float(), _simplex(g, B, N, M, Y).float()
    t = information_objective(U, sel, pol, beta_selector=2.0, beta_expert=4.0)
    torch.testing.assert_close(t.utility, (sel * U).sum(1).mean())
    torch.testing.assert_close(t.mi_selector, mutual_information(sel))
    cmi = conditional_mutual_information(sel.repeat_interleave(N, 0), pol.flatten(0, 1))
    torch.testing.assert_close(t.mi_expert, cmi)
    torch.testing.assert_close(t.objective, t.utility - t.mi_selector / 2 - t.mi_expert / 4)
    free = information_objective(U, sel, pol, beta_selector=math.inf, beta_expert=math.inf)
    torch.testing.assert_close(free.objective, free.utility)
    with pytest.raises(ValueError, match="beta_selector"):
        information_objective(U, sel, beta_selector=0.0)
    with pytest.raises(ValueError, match="p_m_given_x"):
        information_objective(U, sel[:, :1], beta_selector=1.0)
    for bad in (torch.zeros(sel.shape[0]), torch.full((sel.shape[0],), math.nan), -torch.ones(sel.shape[0])):
        with pytest.raises(ValueError, match="weights"):
            mutual_information(sel, weights_B=bad)


def _domain(name, informative: slice, seed: int):
    """Gaussian classes whose means differ only in the `informative` features (MxML's test domains)."""
    return mxml_domain(name, informative, 3.0 if informative.start else -3.0, seed)


def _net(seed, X=20):
    torch.manual_seed(seed)
    return dense_proto_net(in_features=X, d_model=8, d_hidden=16)


def test_one_expert_is_a_single_learner_step_for_step():
    dom = _domain("a", slice(0, 10), 0)
    single, inner = _net(0), _net(0)
    hen = HierarchicalExpertNetwork([inner], in_features=20, d_hidden=8, beta_selector=3.0)
    kw = dict(n_way=3, shots=2, queries=4, seed=5)
    ref = meta_train_domains(single, DomainEpisodes([dom], **kw), steps=12, lr=3e-3)
    hist = train_hierarchical_experts(hen, DomainEpisodes([dom], **kw), steps=12, tasks_per_step=1, lr=3e-3)
    np.testing.assert_allclose([h["loss"] for h in hist], ref, rtol=1e-5, atol=1e-6)
    assert all(h["mi_selector"] == 0 for h in hist)                  # one expert: the selector carries nothing
    for a, b in zip(single.parameters(), inner.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    single.eval()
    hen.eval()
    acc_s = evaluate_domain(single, dom, n_way=3, shots=2, queries=4, episodes=5, seed=9)[2]
    acc_h = evaluate_domain(hen, dom, n_way=3, shots=2, queries=4, episodes=5, seed=9)[2]
    np.testing.assert_allclose(acc_h, acc_s)


def test_selector_reads_only_the_support_set_and_hard_choice_uses_one_expert():
    torch.manual_seed(0)
    dom = _domain("a", slice(0, 10), 0)
    hen = HierarchicalExpertNetwork([_net(i) for i in range(3)], in_features=20, d_hidden=8).eval()
    ep = DomainEpisodes([dom], n_way=3, shots=2, queries=4, seed=0).sample()[1]
    xs, ys, xq = dom.x_BX[ep.support_idx_P], ep.support_y_P, dom.x_BX[ep.query_idx_Q]
    w = hen.mixing_weights(xs)
    torch.testing.assert_close(w.sum(), torch.tensor(1.0))
    perm = torch.randperm(len(xs))
    torch.testing.assert_close(hen.mixing_weights(xs[perm]), w, rtol=1e-6, atol=1e-7)
    all_BMQW = hen.expert_log_probs(xs[None], ys[None], xq[None], 3)
    torch.testing.assert_close(hen(xs, ys, xq, 3), all_BMQW[0, int(w.argmax())], rtol=1e-5, atol=1e-6)
    soft = hen.predict(xs[None], ys[None], xq[None], 3, hard=False)[0]
    torch.testing.assert_close(soft, torch.logsumexp(w.log()[:, None, None] + all_BMQW[0], 0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(soft.exp().sum(-1), torch.ones(len(xq)))


def test_running_priors_follow_the_batches_and_bound_the_mutual_information():
    torch.manual_seed(0)
    dom = _domain("a", slice(0, 10), 0)
    hen = HierarchicalExpertNetwork([_net(i) for i in range(2)], in_features=20, d_hidden=8, beta_selector=1.0,
                                    beta_expert=1.0, prior_momentum=0.9)
    eps = DomainEpisodes([dom], n_way=3, shots=2, queries=4, seed=0)
    batch = [eps.sample()[1] for _ in range(4)]
    args = (torch.stack([dom.x_BX[e.support_idx_P] for e in batch]), torch.stack([e.support_y_P for e in batch]),
            torch.stack([dom.x_BX[e.query_idx_Q] for e in batch]), torch.stack([e.query_y_Q for e in batch]), 3)
    before = hen.selector_prior_M.clone()
    t = hen.information_terms(*args)
    assert not torch.equal(hen.selector_prior_M, before) and hen.expert_prior_MY.shape == (2, 3)
    torch.testing.assert_close(hen.selector_prior_M.sum(), torch.tensor(1.0))
    torch.testing.assert_close(hen.expert_prior_MY.sum(1), torch.ones(2))
    exact = HierarchicalExpertNetwork(list(hen.experts), in_features=20, d_hidden=8, beta_selector=1.0, beta_expert=1.0)
    exact.selector.load_state_dict(hen.selector.state_dict())
    t0 = exact.information_terms(*args)
    assert t.mi_selector >= t0.mi_selector - 1e-6 and t.mi_expert >= t0.mi_expert - 1e-6
    hen.eval()
    frozen = hen.selector_prior_M.clone()
    hen.information_terms(*args)
    assert torch.equal(hen.selector_prior_M, frozen)                      # eval mode leaves the running priors


def test_training_sends_each_task_to_the_expert_the_free_energy_selects():
    dom = _domain("a", slice(0, 10), 0)
    eps = DomainEpisodes([dom], n_way=3, shots=2, queries=4, seed=0)
    ep = eps.sample()[1]
    args = (dom.x_BX[ep.support_idx_P][None], ep.support_y_P[None], dom.x_BX[ep.query_idx_Q][None],
            ep.query_y_Q[None], 3)
    for beta in (math.inf, 2.0):
        hen = HierarchicalExpertNetwork([_net(i) for i in range(3)], in_features=20, d_hidden=8, beta_selector=beta)
        loss, terms = hen.training_loss(*args)
        loss.backward()
        with torch.no_grad():
            lp_MQW = hen.expert_log_probs(*args[:3], 3)[0]
            utility_M = lp_MQW.gather(-1, ep.query_y_Q[None, :, None].expand(3, -1, 1))[..., 0].mean(-1)
        grads = [sum(p.grad.abs().sum() for p in e.parameters()).item() for e in hen.experts]
        best = int(utility_M.argmax())
        if math.isinf(beta):    # the winner takes the task: only its expert learns from it
            assert grads[best] > 0 and all(g == 0 for m, g in enumerate(grads) if m != best)
            torch.testing.assert_close(terms.utility, utility_M[best])
        else:                   # soft: every expert learns, the better ones more
            assert all(g > 0 for g in grads)
            target = optimal_selector(utility_M[None], beta, hen.selector_log_probs(args[0]).exp()[0].detach())[0]
            torch.testing.assert_close(terms.utility, (target * utility_M).sum())
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in hen.selector.parameters() if p.dim() > 1)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="experts"):
        HierarchicalExpertNetwork([], in_features=4)
    with pytest.raises(TypeError, match=r"experts\[0\]"):
        HierarchicalExpertNetwork(["net"], in_features=4)
    with pytest.raises(ValueError, match="beta_expert"):
        HierarchicalExpertNetwork([_net(0)], in_features=20, beta_expert=-1.0)
    with pytest.raises(ValueError, match="prior_momentum"):
        HierarchicalExpertNetwork([_net(0)], in_features=20, prior_momentum=1.0)
    with pytest.raises(ValueError, match="weights"):
        mutual_information(torch.full((2, 2), 0.5), weights_B=torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="p_y_given_xm"):
        conditional_mutual_information(torch.full((2, 2), 0.5), torch.full((2, 3, 2), 0.5))
    hen = HierarchicalExpertNetwork([_net(0)], in_features=20)
    with pytest.raises(ValueError, match="x_query"):
        hen.expert_log_probs(torch.randn(1, 3, 20), torch.arange(3)[None], torch.randn(1, 2, 19), 3)
