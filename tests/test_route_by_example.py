"""Per-example routing, ``moekit.MoE(route_by="example")`` (METHODS.md L3).

Every token of an example goes to the example's experts (every token-choice router, dropless and
with capacity, eager and grouped_mm); with one token per example (or a 2-D input) the layer is the
token-routed layer exactly; padding is left out of the pooled mean; the pooling is pluggable; the
pieces that cannot route per example are refused.
"""
import pytest
import torch

import moekit
from moekit.layers.moe import expand_example_routing, masked_mean_pool
from moekit.ops import no_host_sync
from moekit.routing import TokenChoiceRouter, available
from moekit.routing.registry import get_router_class

D, F, E = 8, 16, 4          # multiples of 4 so grouped_mm runs
MOE_KW = {"switch": {"top_k": 1}}
# Token-choice routers that route on x alone (task routing needs per-token task ids: refused below).
ROUTERS = [n for n in available() if issubclass(get_router_class(n), TokenChoiceRouter)
           and n not in ("task", "task_topk")]
CAPACITY = [None, 1.0, 0.5]


def _layer(router, route_by="example", cap=None, backend="eager", **kw):
    return moekit.MoE(d_model=D, num_experts=E, d_hidden=F, router=router, route_by=route_by,
                      capacity_factor=cap, backend=backend, expert="mlp", **{**MOE_KW.get(router, {}), **kw})


def test_the_token_choice_family_is_covered():
    assert {"topk", "noisy_topk", "switch", "gshard", "sigmoid", "sinkhorn", "cosine", "random"} <= set(ROUTERS)


def _example_pairs(moe, x, mask):
    """Reference: route the pooled examples with the layer's own router, pairs per example."""
    B, S, _ = x.shape
    routing = moe.router(masked_mean_pool(x, mask), mask=None if mask is None else mask.any(1))
    routing = routing.compact()
    return {b: sorted(zip(routing.expert_ids[routing.token_ids == b].tolist(),
                          routing.weights[routing.token_ids == b].tolist())) for b in range(B)}


@pytest.mark.parametrize("backend", ["eager", "grouped_mm"])
@pytest.mark.parametrize("cap", CAPACITY, ids=["dropless", "cf1", "cf0.5"])
@pytest.mark.parametrize("masked", [False, True], ids=["full", "padded"])
@pytest.mark.parametrize("router", ROUTERS)
def test_every_token_of_an_example_takes_the_examples_pairs(router, cap, backend, masked):
    if router == "dense" and cap is not None:
        pytest.skip("dense routing takes no capacity")
    torch.manual_seed(0)
    moe = _layer(router, cap=cap, backend=backend).eval()
    B, S = 6, 5
    x = torch.randn(B, S, D)
    mask = None
    if masked:
        mask = torch.rand(B, S) > 0.3
        mask[1] = False                                   # an example of padding only
    y = moe(x, mask=mask)
    r = moe.last_routing.compact()
    want = _example_pairs(moe, x, mask)
    x_TD, y_TD = x.reshape(-1, D), y.reshape(-1, D)
    selected = 0
    for t in range(B * S):
        b, s = divmod(t, S)
        got = sorted(zip(r.expert_ids[r.token_ids == t].tolist(), r.weights[r.token_ids == t].tolist()))
        valid = mask is None or bool(mask[b, s])
        assert got == (want[b] if valid else []), (t, got, want[b])
        # The defining identity: y_t = Σ_{(t, e, w)} w · f_e(x_t).
        ref = sum((w * moe.experts[e](x_TD[t:t + 1])[0] for e, w in got), torch.zeros(D))
        torch.testing.assert_close(y_TD[t], ref, rtol=1e-5, atol=1e-6)
        selected += moe.top_k if valid and (mask is None or mask[b].any()) else 0
    # Token pairs taken + token pairs dropped by capacity = valid tokens × K.
    assert r.num_pairs + int(r.dropped) == selected
    assert moe.last_stats.num_tokens == (B if mask is None else int(mask.any(1).sum()))   # statistics count examples


@pytest.mark.parametrize("cap", CAPACITY, ids=["dropless", "cf1", "cf0.5"])
@pytest.mark.parametrize("router", ROUTERS)
def test_one_token_per_example_is_token_routing(router, cap):
    if router == "dense" and cap is not None:
        pytest.skip("dense routing takes no capacity")
    torch.manual_seed(1)
    tok = _layer(router, route_by="token", cap=cap).train()
    ex = _layer(router, route_by="example", cap=cap).train()
    ex.load_state_dict(tok.state_dict())
    x = torch.randn(11, D)
    for shape in [(11, 1, D), (11, D)]:                     # S = 1, and a 2-D input
        # The "sequence" loss groups the example rows as one sequence (tested below), tokens by S = 1.
        same_aux = tok.balance_loss != "sequence" or len(shape) == 2
        outs = []
        for moe in (tok, ex):
            xi = x.reshape(shape).clone().requires_grad_()
            torch.manual_seed(7)                            # noise / random routers draw the same
            y = moe(xi)
            (y.square().sum() + (moe.aux_loss if same_aux else 0)).backward()
            outs.append((y, moe.aux_loss, moe.last_routing, xi.grad))
        (y1, a1, r1, g1), (y2, a2, r2, g2) = outs
        assert torch.equal(y1, y2) and torch.equal(g1, g2)
        assert torch.equal(r1.token_ids, r2.token_ids) and torch.equal(r1.expert_ids, r2.expert_ids)
        assert torch.equal(r1.weights, r2.weights) and int(r1.dropped) == int(r2.dropped)
        if same_aux:
            assert torch.equal(a1, a2)
        for p1, p2 in zip(tok.parameters(), ex.parameters()):
            assert (p1.grad is None) == (p2.grad is None)
            if p1.grad is not None:
                assert torch.equal(p1.grad, p2.grad)
                p1.grad, p2.grad = None, None


def test_sequence_balance_loss_takes_the_examples_as_one_group():
    torch.manual_seed(2)
    tok = _layer("sigmoid", route_by="token")
    ex = _layer("sigmoid", route_by="example")
    ex.load_state_dict(tok.state_dict())
    assert ex.balance_loss == "sequence"
    x = torch.randn(9, 1, D)
    ex(x)
    tok(x.reshape(1, 9, D))                                 # one sequence of the 9 example rows
    torch.testing.assert_close(ex.aux_loss, tok.aux_loss, rtol=0, atol=0)


@pytest.mark.parametrize("router", ["topk", "sigmoid"])
def test_padding_is_left_out_of_the_pooled_mean(router):
    torch.manual_seed(3)
    moe = _layer(router).eval()
    x = torch.randn(4, 6, D)
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[:, 4:] = False
    y = moe(x, mask=mask)
    r = moe.last_routing
    # The same examples without their padding: same pairs, same outputs on the valid tokens.
    y_short = moe(x[:, :4])
    r_short = moe.last_routing
    torch.testing.assert_close(y[:, :4], y_short, rtol=0, atol=1e-6)
    assert torch.equal(y[:, 4:], torch.zeros_like(y[:, 4:]))
    pairs = lambda rr, S: sorted((int(t) // S, int(t) % S, int(e)) for t, e in zip(rr.token_ids, rr.expert_ids))
    assert pairs(r, 6) == pairs(r_short, 4)
    # Garbage in the padding changes nothing.
    x2 = x.clone()
    x2[:, 4:] = 1e3
    torch.testing.assert_close(moe(x2, mask=mask), y, rtol=0, atol=0)


def test_masked_mean_pool_by_hand():
    x = torch.arange(12.0).reshape(2, 3, 2)
    mask = torch.tensor([[True, False, True], [False, False, False]])
    want = torch.tensor([[(0 + 4) / 2, (1 + 5) / 2], [0.0, 0.0]])
    torch.testing.assert_close(masked_mean_pool(x, mask), want)
    torch.testing.assert_close(masked_mean_pool(x, None), x.mean(1))


def test_pooling_is_pluggable():
    torch.manual_seed(4)
    calls = []

    def first_token(x_BSD, mask_BS):
        calls.append(mask_BS)
        return x_BSD[:, 0]

    moe = _layer("topk", pool=first_token).eval()
    x = torch.randn(5, 3, D)
    y = moe(x)
    assert len(calls) == 1 and calls[0] is None
    # Routing on the first token: each example takes the pairs its first token takes alone.
    tok = _layer("topk", route_by="token").eval()
    tok.load_state_dict(moe.state_dict())
    tok(x[:, 0])
    r_first, r = tok.last_routing, moe.last_routing
    for b in range(5):
        want = sorted(r_first.expert_ids[r_first.token_ids == b].tolist())
        for s in range(3):
            assert sorted(r.expert_ids[r.token_ids == b * 3 + s].tolist()) == want
    assert y.shape == x.shape
    bad = _layer("topk", pool=lambda x_BSD, m: x_BSD.mean(1, keepdim=True))
    with pytest.raises(ValueError, match=r"pool\(x_BSD, mask_BS\) must have shape \(5, 8\)"):
        bad(x)


def test_expand_keeps_a_uniform_routing_uniform():
    torch.manual_seed(5)
    moe = _layer("topk").eval()
    routing_B = moe.router(torch.randn(3, D))
    assert routing_B.slots_per_token == 2
    r = expand_example_routing(routing_B, 3, 4)
    assert r.slots_per_token == 2 and r.keep is None and r.num_pairs == 3 * 4 * 2
    assert torch.equal(r.expert_ids.view(3, 4, 2), routing_B.expert_ids.view(3, 1, 2).expand(3, 4, 2))
    assert torch.equal(r.logits, routing_B.logits.repeat_interleave(4, 0))


@pytest.mark.parametrize("cap,masked", [(None, True), (0.5, False), (1.0, True)], ids=["mask", "cap", "cap+mask"])
def test_sync_free_example_routing_equals_the_default_and_never_syncs(cap, masked):
    torch.manual_seed(6)
    ref = _layer("topk", cap=cap, backend="grouped_mm").train()
    fast = _layer("topk", cap=cap, backend="grouped_mm", sync_free=True).train()
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(6, 5, D)
    mask = (torch.rand(6, 5) > 0.3) if masked else None
    if masked:
        mask[2] = False
    xs = [x.clone().requires_grad_() for _ in range(2)]
    y1 = ref(xs[0], mask=mask)
    (y1.square().sum() + ref.aux_loss).backward()
    with no_host_sync():
        y2 = fast(xs[1], mask=mask)
        (y2.square().sum() + fast.aux_loss).backward()
    torch.testing.assert_close(y2, y1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(xs[1].grad, xs[0].grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast.aux_loss, ref.aux_loss)
    assert int(fast.last_routing.dropped) == int(ref.last_routing.dropped)
    assert torch.equal(fast.last_stats.tokens_per_expert, ref.last_stats.tokens_per_expert)


def test_refusals():
    with pytest.raises(ValueError, match=r"route_by must be one of \('token', 'example'\), got 'sequence'"):
        _layer("topk", route_by="sequence")
    for router in ("expert_choice", "hash", "top_p"):
        with pytest.raises(ValueError, match="route_by='example' needs a token-choice router"):
            moekit.MoE(d_model=D, num_experts=E, router=router, route_by="example",
                       router_kwargs={"vocab_size": 50} if router == "hash" else None)
    with pytest.raises(TypeError, match="pool must be None or a callable"):
        _layer("topk", pool="mean")
    with pytest.raises(ValueError, match="pool only applies with route_by='example'"):
        _layer("topk", route_by="token", pool=masked_mean_pool)
    task = moekit.MoE(d_model=D, num_experts=E, router="task", router_kwargs={"num_tasks": 3}, route_by="example")
    with pytest.raises(ValueError, match=r"takes no per-token router inputs, got \['task_ids'\]"):
        task(torch.randn(2, 3, D), task_ids=torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"route_by must be one of"):
        moekit.MoEConfig(num_experts=E, route_by="batch")


def test_moeconfig_builds_an_example_routed_layer():
    cfg = moekit.MoEConfig(num_experts=E, route_by="example")
    assert cfg.build(D).route_by == "example"
    assert moekit.MoEConfig.from_dict(cfg.to_dict()) == cfg
    assert "route_by='example'" in repr(cfg.build(D))
