"""MxML (METHODS.md M1): mixing weights sum to 1, one meta-learner is that learner, the weights read
only the support set (order-free), the learners stay frozen while the gate trains, and on two
synthetic domains the trained gate picks each domain's own learner."""
import pytest
import torch

from moekit.meta import (
    DomainEpisodes,
    MixtureOfMetaLearners,
    TaskDomain,
    episode_log_probs,
    evaluate_domain,
    meta_train_domains,
    train_gate,
)
from moekit.models import dense_proto_net, moe_proto_net


def _domain(name, informative: slice, offset: float, seed: int, n_classes=6, per_class=30, X=20):
    """Gaussian classes whose means differ only in the `informative` features; `offset` shifts the rest."""
    g = torch.Generator().manual_seed(seed)
    means = torch.zeros(n_classes, X)
    means[:, informative] = 2.0 * torch.randn(n_classes, informative.stop - informative.start, generator=g)
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    x = means[labels] + torch.randn(len(labels), X, generator=g)
    rest = torch.ones(X, dtype=torch.bool)
    rest[informative] = False
    x[:, rest] += offset
    return TaskDomain(name, x, labels, tuple(range(n_classes)))


def _episode(domain, seed=0, n_way=3):
    return DomainEpisodes([domain], n_way=n_way, shots=2, queries=4, seed=seed).sample()[1]


def test_weights_sum_to_one_and_read_only_the_support_set():
    torch.manual_seed(0)
    dom = _domain("a", slice(0, 10), 0.0, 0)
    mix = MixtureOfMetaLearners([dense_proto_net(in_features=20, d_model=8, d_hidden=16) for _ in range(4)],
                                in_features=20, d_hidden=16)
    ep = _episode(dom)
    xs, ys, xq = dom.x_BX[ep.support_idx_P], ep.support_y_P, dom.x_BX[ep.query_idx_Q]
    w = mix.mixing_weights(xs)
    assert w.shape == (4,) and (w >= 0).all()
    torch.testing.assert_close(w.sum(), torch.tensor(1.0))
    perm = torch.randperm(len(xs))
    torch.testing.assert_close(mix.mixing_weights(xs[perm]), w, rtol=1e-6, atol=1e-7)
    mix.eval()
    out = mix(xs, ys, xq, 3)
    torch.testing.assert_close(mix(xs[perm], ys[perm], xq, 3), out, rtol=1e-5, atol=1e-6)
    # the queries do not move the weights: replacing them changes only their own predictions
    captured = []
    hook = mix.gate.register_forward_hook(lambda m, i, o: captured.append(o.detach()))
    mix(xs, ys, torch.randn_like(xq), 3)
    hook.remove()
    torch.testing.assert_close(captured[0], w)
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(len(xq)))       # a distribution per query


@pytest.mark.parametrize("build", [dense_proto_net, moe_proto_net])
def test_one_meta_learner_is_that_learner(build):
    torch.manual_seed(0)
    dom = _domain("a", slice(0, 10), 0.0, 1)
    net = build(in_features=20, d_model=8, d_hidden=16)
    mix = MixtureOfMetaLearners([net], in_features=20).eval()
    for seed in range(3):
        ep = _episode(dom, seed)
        torch.testing.assert_close(episode_log_probs(mix, dom.x_BX, ep, 3), episode_log_probs(net, dom.x_BX, ep, 3),
                                   rtol=0, atol=1e-6)
    # and M copies of one learner equal it too, whatever the weights
    copies = MixtureOfMetaLearners([net, net, net], in_features=20).eval()
    ep = _episode(dom, 5)
    torch.testing.assert_close(episode_log_probs(copies, dom.x_BX, ep, 3), episode_log_probs(net, dom.x_BX, ep, 3),
                               rtol=0, atol=1e-5)


def test_domain_episodes_are_seeded_and_cover_every_domain():
    doms = [_domain(n, slice(0, 10), o, s) for n, o, s in (("a", 0.0, 0), ("b", 3.0, 1), ("c", -3.0, 2))]
    a, b = (DomainEpisodes(doms, n_way=3, shots=2, queries=4, seed=7) for _ in range(2))
    seen = set()
    for _ in range(30):
        (ia, ea), (ib, eb) = a.sample(), b.sample()
        assert ia == ib and torch.equal(ea.support_idx_P, eb.support_idx_P)
        seen.add(ia)
    assert seen == {0, 1, 2}


def test_gate_learns_to_pick_each_domains_learner_and_learners_stay_frozen():
    torch.manual_seed(0)
    doms = [_domain("a", slice(0, 10), 0.0, 10), _domain("b", slice(10, 20), 4.0, 11)]
    learners = []
    for d in doms:
        net = dense_proto_net(in_features=20, d_model=16, d_hidden=32)
        meta_train_domains(net, DomainEpisodes([d], n_way=3, shots=2, queries=4, seed=0), steps=80, lr=3e-3)
        learners.append(net)
    mix = MixtureOfMetaLearners(learners, in_features=20, d_hidden=16)
    before = {k: v.clone() for k, v in mix.learners.state_dict().items()}
    gate_before = [p.clone() for p in mix.gate.parameters()]
    losses = train_gate(mix, DomainEpisodes(doms, n_way=3, shots=2, queries=4, seed=1), steps=150, lr=1e-2)
    assert all(torch.equal(before[k], v) for k, v in mix.learners.state_dict().items())
    assert any(not torch.equal(a, b) for a, b in zip(gate_before, mix.gate.parameters()))
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10
    mix.eval()
    with torch.no_grad():
        for m, d in enumerate(doms):
            w = torch.stack([mix.mixing_weights(d.x_BX[_episode(d, s).support_idx_P]) for s in range(10)])
            assert w[:, m].mean() > 0.8, (m, w.mean(0))
    # the mixture is as good as each domain's own learner on that domain (same test episodes)
    for m, d in enumerate(doms):
        acc_mix = evaluate_domain(mix, d, n_way=3, shots=2, queries=4, episodes=30, seed=5)[0]
        acc_own = evaluate_domain(learners[m], d, n_way=3, shots=2, queries=4, episodes=30, seed=5)[0]
        acc_other = evaluate_domain(learners[1 - m], d, n_way=3, shots=2, queries=4, episodes=30, seed=5)[0]
        assert acc_mix >= acc_own - 0.05 and acc_own > acc_other, (m, acc_mix, acc_own, acc_other)


def test_bad_inputs():
    dom = _domain("a", slice(0, 10), 0.0, 0)
    with pytest.raises(ValueError, match="learners"):
        MixtureOfMetaLearners([], in_features=20)
    with pytest.raises(TypeError, match=r"learners\[1\]"):
        MixtureOfMetaLearners([torch.nn.Identity(), "net"], in_features=20)
    with pytest.raises(ValueError, match="domains"):
        DomainEpisodes([], n_way=2, shots=1, queries=1)
    with pytest.raises(TypeError, match=r"domains\[0\]"):
        DomainEpisodes([(dom.x_BX, dom.labels)], n_way=2, shots=1, queries=1)
    with pytest.raises(ValueError, match="labels"):
        TaskDomain("bad", dom.x_BX, dom.labels[:5], dom.classes)
    mix = MixtureOfMetaLearners([dense_proto_net(in_features=20, d_model=8, d_hidden=16)], in_features=20)
    with pytest.raises(ValueError, match="x_query"):
        mix(dom.x_BX[:6], torch.arange(3).repeat(2), dom.x_BX[:4, :10], 3)
    with pytest.raises(TypeError, match="mixture"):
        train_gate(dense_proto_net(in_features=20), DomainEpisodes([dom], n_way=2, shots=1, queries=1), steps=1)
