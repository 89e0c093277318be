"""Prototypical Networks: episode sampler invariants, prototypes and logits against hand/loop references,
the dense/MoE active-parameter relation, and meta-learning on held-out synthetic classes."""
import numpy as np
import pytest
import torch

from moekit.models import (
    EpisodeSampler,
    active_ffn_params,
    dense_proto_net,
    evaluate_episodes,
    meta_train,
    moe_proto_net,
    proto_logits,
    prototypes,
)


def test_sampler_episode_invariants():
    labels = torch.arange(10).repeat_interleave(23)[torch.randperm(230)]
    allowed = [1, 3, 4, 7, 8]
    sampler = EpisodeSampler(labels, allowed, n_way=4, shots=3, queries=5, seed=0)
    for _ in range(20):
        ep = sampler.sample()
        classes = ep.classes_W.tolist()
        assert len(set(classes)) == 4 and set(classes) <= set(allowed)
        assert ep.support_idx_P.shape == (12,) and ep.query_idx_Q.shape == (20,)
        assert not set(ep.support_idx_P.tolist()) & set(ep.query_idx_Q.tolist())
        assert len(set(ep.support_idx_P.tolist())) == 12 and len(set(ep.query_idx_Q.tolist())) == 20
        # episode label w really is original class classes[w]
        assert torch.equal(labels[ep.support_idx_P], ep.classes_W[ep.support_y_P])
        assert torch.equal(labels[ep.query_idx_Q], ep.classes_W[ep.query_y_Q])
        assert torch.equal(torch.bincount(ep.support_y_P), torch.full((4,), 3))
        assert torch.equal(torch.bincount(ep.query_y_Q), torch.full((4,), 5))


def test_sampler_is_seeded():
    labels = np.repeat(np.arange(6), 30)
    a, b, c = (EpisodeSampler(labels, range(6), n_way=3, shots=2, queries=4, seed=s) for s in (7, 7, 8))
    ea, eb, ec = a.sample(), b.sample(), c.sample()
    assert torch.equal(ea.support_idx_P, eb.support_idx_P) and torch.equal(ea.query_idx_Q, eb.query_idx_Q)
    assert not torch.equal(ea.query_idx_Q, ec.query_idx_Q)


def test_prototypes_are_class_means_by_hand():
    z = torch.tensor([[1.0, 2.0], [3.0, 4.0], [10.0, 0.0], [-1.0, 5.0], [0.0, 0.0], [2.0, 2.0]])
    y = torch.tensor([0, 0, 1, 2, 2, 2])
    expected = torch.tensor([[2.0, 3.0], [10.0, 0.0], [1.0 / 3.0, 7.0 / 3.0]])
    torch.testing.assert_close(prototypes(z, y, 3), expected)


def test_proto_logits_against_distance_loop():
    torch.manual_seed(0)
    z, c = torch.randn(97, 13, dtype=torch.float64), torch.randn(5, 13, dtype=torch.float64)
    ref = torch.empty(97, 5, dtype=torch.float64)
    for q in range(97):
        for w in range(5):
            ref[q, w] = -sum((z[q, d] - c[w, d]) ** 2 for d in range(13))
    torch.testing.assert_close(proto_logits(z, c), ref)


@pytest.mark.parametrize("d_model,d_hidden,num_experts,top_k", [(64, 256, 8, 2), (24, 96, 6, 3), (16, 32, 4, 1)])
def test_moe_active_params_equal_dense_plus_router(d_model, d_hidden, num_experts, top_k):
    dense = dense_proto_net(in_features=30, d_model=d_model, d_hidden=d_hidden)
    moe = moe_proto_net(in_features=30, d_model=d_model, d_hidden=d_hidden, num_experts=num_experts, top_k=top_k)
    (d_active, d_total), (m_active, m_total) = active_ffn_params(dense), active_ffn_params(moe)
    assert d_active == d_total == 2 * d_model * d_hidden
    router = sum(p.numel() for p in moe.ffn.router.parameters())
    assert router == d_model * num_experts
    assert m_active == d_active + router
    assert m_total == router + num_experts // top_k * d_active       # E experts of F/K each
    # everything outside the FFN is shared
    outside = [sum(p.numel() for p in net.parameters()) - active_ffn_params(net)[1] for net in (dense, moe)]
    assert outside[0] == outside[1]


def _clusters(num_classes, per_class, seed):
    """Gaussian clusters whose class signal lives in 4 of 32 dims, drowned by high-variance nuisance dims."""
    g = torch.Generator().manual_seed(seed)
    means = torch.zeros(num_classes, 32)
    means[:, :4] = 2.0 * torch.randn(num_classes, 4, generator=g)
    noise = torch.randn(num_classes * per_class, 32, generator=g)
    noise[:, :4] *= 0.5
    noise[:, 4:] *= 1.5
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    return means[labels] + noise, labels


@pytest.mark.parametrize("build", [dense_proto_net, moe_proto_net])
def test_meta_training_beats_chance_and_untrained_on_held_out_classes(build):
    torch.manual_seed(0)
    x, labels = _clusters(24, 40, seed=0)
    train_classes, test_classes = range(16), range(16, 24)
    net = build(in_features=32, d_model=32, d_hidden=64)
    kw = dict(n_way=4, shots=1, queries=5, episodes=100, seed=1)
    before, _, _ = evaluate_episodes(net, x, labels, test_classes, **kw)
    losses = meta_train(net, x, labels, train_classes, n_way=4, shots=1, queries=5, steps=150, lr=3e-3, seed=0)
    after, ci, _ = evaluate_episodes(net, x, labels, test_classes, **kw)
    assert np.mean(losses[-20:]) < np.mean(losses[:20])
    assert after - ci > 0.45         # chance is 0.25
    assert after > before + 0.1


def test_clear_errors():
    labels = np.repeat(np.arange(4), [10, 10, 10, 5])
    with pytest.raises(ValueError, match="class 3 has 5 examples"):
        EpisodeSampler(labels, range(4), n_way=2, shots=3, queries=3)
    with pytest.raises(ValueError, match="n_way=5 exceeds"):
        EpisodeSampler(labels, range(4), n_way=5, shots=1, queries=1)
    with pytest.raises(ValueError, match="distinct"):
        EpisodeSampler(labels, [0, 0, 1], n_way=2, shots=1, queries=1)
    with pytest.raises(ValueError, match="shots must be a positive int"):
        EpisodeSampler(labels, range(4), n_way=2, shots=0, queries=1)
    with pytest.raises(ValueError, match="1-D integer"):
        EpisodeSampler(labels.astype(float), range(4), n_way=2, shots=1, queries=1)
    with pytest.raises(ValueError, match="classes \\[1\\] have none"):
        prototypes(torch.randn(3, 2), torch.tensor([0, 2, 2]), 3)
    with pytest.raises(ValueError, match="must lie in"):
        prototypes(torch.randn(2, 2), torch.tensor([0, 3]), 3)
    with pytest.raises(ValueError, match="prototypes \\(W, D\\)"):
        proto_logits(torch.randn(4, 3), torch.randn(2, 5))
    with pytest.raises(ValueError, match="multiple of top_k"):
        moe_proto_net(in_features=8, d_model=8, d_hidden=15, top_k=2)
