"""Sampled top-1 routing (BTX's variant, METHODS.md T7): an exact draw from the router softmax
in training, the argmax in eval, gate exactly 1 with the Gumbel-softmax straight-through gradient."""
import pytest
import torch

import moekit
from moekit.routing import SampledTop1Router, build_router
from moekit.routing.sampled_top1 import gumbel_like

D, E = 8, 4


def test_training_draws_follow_the_router_softmax():
    torch.manual_seed(0)
    r = build_router("sampled_top1", d_model=D, num_experts=E).train()
    with torch.no_grad():
        r.weight.mul_(30)
    x = torch.randn(1, D).expand(40000, D)           # one token, many draws
    routing = r(x)
    p = torch.softmax(r.logits(x[:1]), -1)[0]
    freq = torch.bincount(routing.expert_ids, minlength=E).float() / 40000
    se = (p * (1 - p) / 40000).sqrt()
    assert bool((p < 0.9).all()) and bool((p > 0.01).sum() >= 2)      # a real distribution
    assert bool(((freq - p).abs() <= 5 * se + 1e-4).all()), (freq, p)
    # One pair per token, gate exactly 1 in the forward pass.
    assert routing.num_pairs == 40000 and bool((routing.weights == 1.0).all())


def test_eval_is_the_argmax_with_gate_one_and_deterministic():
    torch.manual_seed(1)
    r = build_router("sampled_top1", d_model=D, num_experts=E).eval()
    x = torch.randn(50, D)
    a, b = r(x), r(x)
    assert torch.equal(a.expert_ids, b.expert_ids)
    assert torch.equal(a.expert_ids, r.logits(x).argmax(-1))
    assert bool((a.weights == 1.0).all())


def test_router_gradient_is_the_gumbel_softmax_straight_through_gradient():
    torch.manual_seed(2)
    tau = 0.7
    r = SampledTop1Router(D, E, temperature=tau).train()
    x = torch.randn(30, D)
    c = torch.randn(30)
    torch.manual_seed(5)
    routing = r(x)
    (routing.weights * c).sum().backward()
    # Reference: the same noise, the relaxed sample's probability of the drawn expert.
    W = r.weight.detach().clone().requires_grad_(True)
    h = x @ W.T
    torch.manual_seed(5)
    g = gumbel_like(h.detach())
    i = (h + g).argmax(-1)
    assert torch.equal(routing.expert_ids, i)
    s = torch.softmax((h + g) / tau, -1).gather(1, i[:, None])[:, 0]
    (s * c).sum().backward()
    torch.testing.assert_close(r.weight.grad, W.grad)
    assert r.weight.grad.abs().sum() > 0


def test_soft_gate_option():
    torch.manual_seed(3)
    tau = 2.0
    r = SampledTop1Router(D, E, temperature=tau, straight_through=False).eval()
    x = torch.randn(20, D)
    routing = r(x)
    h = r.logits(x)
    expect = torch.softmax(h / tau, -1).gather(1, h.argmax(-1, keepdim=True))[:, 0]
    torch.testing.assert_close(routing.weights, expect)
    r.train()
    w = r(x).weights
    assert bool((w > 0).all()) and bool((w < 1).all())


def test_degenerate_single_expert_is_the_expert_and_moe_identity():
    torch.manual_seed(4)
    moe = moekit.MoE(d_model=D, num_experts=1, router="sampled_top1", expert="mlp", d_hidden=16).train()
    x = torch.randn(9, D)
    torch.testing.assert_close(moe(x), moe.experts[0](x))
    moe = moekit.MoE(d_model=D, num_experts=E, router="sampled_top1", expert="mlp", d_hidden=16).train()
    assert moe.top_k == 1
    y = moe(x)
    r = moe.last_routing
    expect = torch.stack([moe.experts[e](x[t:t + 1])[0] for t, e in zip(r.token_ids.tolist(), r.expert_ids.tolist())])
    torch.testing.assert_close(y, expect)


def test_refuses_top_k_other_than_one():
    with pytest.raises(ValueError, match="top_k=2"):
        SampledTop1Router(D, E, top_k=2)


def test_btx_merge_accepts_sampled_top1():
    from torch import nn
    torch.manual_seed(6)
    base = nn.Sequential(nn.Linear(D, 16), nn.GELU(), nn.Linear(16, D))
    branches = [base, nn.Sequential(nn.Linear(D, 16), nn.GELU(), nn.Linear(16, D))]
    merged = moekit.recipes.btx(base, branches, top_k=1, router="sampled_top1")
    assert isinstance(merged.router, SampledTop1Router)


def test_moe_layer_selection_frequencies_match_the_router_softmax_monte_carlo():
    """Through the public layer (`moekit.MoE(router="sampled_top1")`, as `btx(..., router=...)`
    builds it): over many training passes, the tokens each expert receives match Σ_t p_te."""
    torch.manual_seed(7)
    T, draws = 64, 300
    moe = moekit.MoE(d_model=D, num_experts=E, router="sampled_top1", expert="mlp", d_hidden=16).train()
    with torch.no_grad():
        moe.router.weight.mul_(4)                      # spread the probabilities away from uniform
    x = torch.randn(T, D)
    p_TE = torch.softmax(moe.router.logits(x), -1).detach()
    counts = torch.zeros(E)
    with torch.no_grad():
        for _ in range(draws):
            moe(x)
            counts += moe.last_stats.tokens_per_expert.float()
    expect = draws * p_TE.sum(0)
    sd = (draws * (p_TE * (1 - p_TE)).sum(0)).sqrt()
    assert float(p_TE.max(-1).values.mean()) < 0.9 and float(p_TE.max(-1).values.min()) < 0.6     # not argmax-like
    assert counts.sum() == T * draws
    assert bool(((counts - expect).abs() <= 5 * sd).all()), (counts, expect, sd)
    # Eval is the argmax, not a draw.
    moe.eval()
    moe(x)
    torch.testing.assert_close(moe.last_stats.tokens_per_expert.float(),
                               torch.bincount(p_TE.argmax(-1), minlength=E).float())
