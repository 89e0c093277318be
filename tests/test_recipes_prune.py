"""Expert pruning and merging: usage counts, exactness where the method promises it, errors."""
import copy

import pytest
import torch
from torch import nn

import moekit
from moekit.recipes.prune import (
    GroupedRouter,
    expert_usage,
    merge_experts,
    prune_experts,
    prune_model,
    similar_expert_groups,
)


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        kw = dict(d_model=16, num_experts=6, d_hidden=12, router_kwargs={"bias": True})
        self.a = moekit.MoE(top_k=2, **kw)
        self.b = moekit.MoE(top_k=1, num_shared_experts=1, **kw)

    def forward(self, x):
        x = x + self.a(x)
        return x + self.b(x)


def model():
    torch.manual_seed(0)
    m = TwoLayer().eval()
    with torch.no_grad():
        for moe in (m.a, m.b):
            moe.router.weight.normal_(0, 0.5)
            moe.router.bias[5] = -50.0          # expert 5 is never chosen
    return m


def test_usage_counts_sum_to_pairs():
    m = model()
    xs = [torch.randn(3, 5, 16) for _ in range(3)]
    usage = expert_usage(m, xs)
    assert set(usage) == {"a", "b"}
    assert usage["a"].sum().item() == 3 * 15 * 2 and usage["b"].sum().item() == 3 * 15 * 1


def test_prune_unused_experts_is_exact():
    """A token whose top-K never held a dropped expert keeps its route and renormalised weights."""
    m = model()
    xs = [torch.randn(2, 5, 16) for _ in range(2)]
    usage = expert_usage(m, xs)
    with torch.no_grad():     # (a layer holding a graph in aux_loss cannot be deep-copied)
        ref = [m(x) for x in xs]
    keep_used = {k: [e for e in range(6) if usage[k][e] > 0] for k in usage}
    assert any(len(v) < 6 for v in keep_used.values())        # something is actually dropped
    pruned = copy.deepcopy(m)
    for k, idx in keep_used.items():
        setattr(pruned, k, prune_experts(getattr(pruned, k), idx))
    for x, r in zip(xs, ref):
        assert torch.allclose(pruned(x), r, atol=1e-6)
    assert pruned.a.num_experts == len(keep_used["a"]) == pruned.a.router.weight.shape[0]


def test_prune_model_keeps_most_used():
    m = model()
    xs = [torch.randn(4, 6, 16)]
    usage = expert_usage(m, xs)
    kept = prune_model(m, usage, keep=3)
    for k, idx in kept.items():
        top = sorted(range(6), key=lambda e: (-int(usage[k][e]), e))[:3]
        assert idx == sorted(top)
        assert getattr(m, k).num_experts == 3
    m(xs[0])                                                   # still runs
    assert m.b.top_k == 1 and m.a.top_k == 2


def test_prune_drops_used_expert_changes_output():
    m = model()
    x = torch.randn(4, 6, 16)
    usage = expert_usage(m, [x])
    most = int(usage["a"].argmax())
    m2 = copy.deepcopy(m)
    m2.a = prune_experts(m2.a, [e for e in range(6) if e != most])
    assert (m2(x) - m(x)).abs().max().item() > 1e-4


def test_merge_identical_experts_is_exact():
    torch.manual_seed(0)
    moe = moekit.MoE(d_model=16, num_experts=6, top_k=2, d_hidden=12).eval()
    with torch.no_grad():
        moe.router.weight.normal_(0, 1.0)
        for p in moe.experts.parameters():
            p[3] = p[1]
            p[5] = p[0]
    x = torch.randn(40, 16)
    ref = moe(x)
    groups = similar_expert_groups(moe, 4)
    assert [0, 5] in groups and [1, 3] in groups
    merged = merge_experts(moe, groups).eval()
    assert isinstance(merged.router, GroupedRouter) and merged.num_experts == 4
    assert merged.experts.down_proj.shape[0] == 4
    assert torch.allclose(merged(x), ref, atol=1e-6)
    # The defining identity holds for the merged layer too.
    r = merged.last_routing
    rhs = torch.zeros_like(x)
    for t, e, w in zip(r.token_ids.tolist(), r.expert_ids.tolist(), r.weights.tolist()):
        rhs[t] += w * merged.experts[e](x[t:t + 1])[0]
    assert torch.allclose(rhs, merged(x), atol=1e-6)
    # Group probabilities are sums and still sum to 1.
    assert torch.allclose(r.probs.sum(-1), torch.ones(40), atol=1e-6)
    assert torch.allclose(r.logits.softmax(-1), r.probs, atol=1e-6)


def test_merge_weighted_by_usage():
    torch.manual_seed(0)
    moe = moekit.MoE(d_model=8, num_experts=4, top_k=1, d_hidden=6)
    merged = merge_experts(moe, [[0, 1], [2], [3]], usage=torch.tensor([3.0, 1.0, 5.0, 0.0]))
    expect = 0.75 * moe.experts.down_proj[0] + 0.25 * moe.experts.down_proj[1]
    assert torch.allclose(merged.experts.down_proj[0], expect, atol=1e-7)
    assert torch.equal(merged.experts.down_proj[2], moe.experts.down_proj[3])


def test_errors():
    moe = moekit.MoE(d_model=8, num_experts=4, top_k=2, d_hidden=6)
    with pytest.raises(ValueError, match="keep"):
        prune_experts(moe, [0, 0])
    with pytest.raises(ValueError, match="keep"):
        prune_experts(moe, [7])
    with pytest.raises(ValueError, match="partition"):
        merge_experts(moe, [[0, 1], [2]])
    with pytest.raises(ValueError, match="num_groups"):
        similar_expert_groups(moe, 0)
    with pytest.raises(ValueError, match="no moekit MoE"):
        expert_usage(nn.Linear(2, 2), [])
    grouped = moekit.MoE(d_model=8, num_experts=4, top_k=2, d_hidden=6, router="sigmoid",
                         router_kwargs={"num_groups": 2, "topk_groups": 1})
    with pytest.raises(ValueError, match="group"):
        prune_experts(grouped, [0, 1, 2])
