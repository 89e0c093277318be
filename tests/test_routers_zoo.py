"""The router zoo: every registered router behind the one `Routing` contract (METHODS.md §2, L1, F1, F3).

Part 1 runs contract tests over every name in `moekit.routing.available()`; part 2 checks each
router's own invariant from METHODS.md.
"""
import copy
import itertools
import math

import pytest
import torch

import moekit
from moekit.routing import TopKRouter, available, build_router

D, F_HID, E = 8, 16, 4          # multiples of 4 so grouped_mm runs

# Per-router settings for the generic tests: MoE kwargs and the per-token inputs it needs.
MOE_KW = {"switch": {"top_k": 1}, "task": {"router_kwargs": {"num_tasks": 3}},
          "task_topk": {"router_kwargs": {"num_tasks": 3}},
          "stable_moe": {"router_kwargs": {"vocab_size": 50}}}



def router_inputs(name, shape):
    if name in ("hash", "stable_moe", "multihash"):
        return {"token_ids": torch.randint(0, 50, shape)}
    if name in ("task", "task_topk"):
        return {"task_ids": torch.randint(0, 3, shape)}
    return {}


def make_moe(name, **kw):
    cfg = dict(d_model=D, num_experts=E, d_hidden=F_HID, router=name, expert="mlp")
    cfg.update(MOE_KW.get(name, {}))
    cfg.update(kw)
    return moekit.MoE(**cfg)


def expected_from_routing(moe, x_TD, routing):
    """Σ_{pairs (t, e, w)} w · expert_e(x_t), computed one pair at a time."""
    out = torch.zeros_like(x_TD)
    for t, e, w in zip(routing.token_ids.tolist(), routing.expert_ids.tolist(), routing.weights.detach()):
        out[t] += w * moe.experts[e](x_TD[t:t + 1])[0]
    return out


# ---------------------------------------------------------------------------------------------
# Part 1: the contract, for every registered router
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", available())
def test_defining_identity_eval(name):
    moe = make_moe(name).eval()
    x = torch.randn(2, 7, D)
    inputs = router_inputs(name, x.shape[:-1])
    with torch.no_grad():
        y = moe(x, **inputs)
    r = moe.last_routing
    N = r.token_ids.numel()
    assert r.expert_ids.shape == (N,) and r.weights.shape == (N,)
    assert r.token_ids.dtype == r.expert_ids.dtype == torch.long
    assert r.dropped.dim() == 0 and r.dropped.dtype == torch.long
    assert r.num_experts == E
    if r.logits is not None:
        assert r.logits.shape == (14, E) and r.logits.dtype == torch.float32
    assert bool((r.weights >= 0).all())
    expected = expected_from_routing(moe, x.reshape(-1, D), r)
    torch.testing.assert_close(y.reshape(-1, D), expected, atol=1e-5, rtol=1e-5)
    # Eval is deterministic (METHODS.md contract 8).
    with torch.no_grad():
        torch.testing.assert_close(moe(x, **inputs), y)
    # In training (noise, random draws, balancing on) the identity holds for the pairs drawn.
    moe.train()
    with torch.no_grad():
        y = moe(x, **inputs)
    expected = expected_from_routing(moe, x.reshape(-1, D), moe.last_routing)
    torch.testing.assert_close(y.reshape(-1, D), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", available())
def test_backends_agree_forward_backward(name):
    torch.manual_seed(1)
    x = torch.randn(3, 5, D)
    inputs = router_inputs(name, x.shape[:-1])
    base = make_moe(name).train()
    results = []
    for backend in ("eager", "grouped_mm"):
        moe = copy.deepcopy(base)
        moe.backend = backend
        torch.manual_seed(2)                      # the same random draws for both backends
        xb = x.clone().requires_grad_(True)
        y = moe(xb, **inputs)
        (y.square().mean() + moe.aux_loss).backward()
        grads = {n: p.grad.clone() for n, p in moe.named_parameters() if p.grad is not None}
        results.append((y.detach(), xb.grad.clone(), grads))
    (y0, gx0, g0), (y1, gx1, g1) = results
    torch.testing.assert_close(y0, y1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx0, gx1, atol=1e-5, rtol=1e-5)
    assert g0.keys() == g1.keys() and len(g0) > 0
    for k in g0:
        torch.testing.assert_close(g0[k], g1[k], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", available())
def test_padding_is_never_routed(name):
    moe = make_moe(name).train()
    x = torch.randn(2, 6, D)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, 4:] = False
    mask[1, 0] = False
    y = moe(x, mask=mask, **router_inputs(name, x.shape[:-1]))
    flat = mask.reshape(-1)
    assert bool(flat[moe.last_routing.token_ids].all())
    assert bool((y.reshape(-1, D)[~flat] == 0).all())
    assert moe.last_stats.num_tokens == int(flat.sum())


# ---------------------------------------------------------------------------------------------
# Part 2: each router's METHODS.md invariant
# ---------------------------------------------------------------------------------------------

# G3 GShard ----------------------------------------------------------------------------------
def test_gshard_second_dispatch_rate_matches_min_1_2g2():
    r = build_router("gshard", d_model=D, num_experts=E).train()
    with torch.no_grad():
        r.weight.mul_(20)                        # spread g2 over (0, ½]
    x = torch.randn(6000, D)
    routing = r(x)
    assert bool((routing.topk_ids[:, 0] != routing.topk_ids[:, 1]).all())
    g2 = r.select(r.logits(x))[1][:, 1]
    expected = (2 * g2).clamp(max=1).mean().item()
    rate = routing.extras["second_dispatched"].float().mean().item()
    # Binomial standard error at n = 6000 is < 0.0065; the unconditional rate would be 1.
    assert expected < 0.95
    assert abs(rate - expected) < 0.03, (rate, expected)
    # Per token, not just on average: weak second experts are mostly skipped, strong ones kept.
    sent = routing.extras["second_dispatched"].float()
    assert sent[g2 < 0.1].mean() < 0.25 and sent[g2 > 0.4].mean() > 0.75
    # Skipped second choices are not dispatched and not counted as dropped.
    assert routing.num_pairs == 6000 + int(routing.extras["second_dispatched"].sum())
    assert int(routing.dropped) == 0


def test_gshard_eval_equals_top2_renorm_and_is_deterministic():
    r = build_router("gshard", d_model=D, num_experts=E).eval()
    ref = TopKRouter(D, E, 2, norm="renorm").eval()
    ref.weight.data.copy_(r.weight.data)
    x = torch.randn(40, D)
    a, b = r(x), ref(x)
    assert torch.equal(a.token_ids, b.token_ids) and torch.equal(a.expert_ids, b.expert_ids)
    torch.testing.assert_close(a.weights, b.weights)


def test_gshard_group_capacity_and_group_independence():
    S = 8
    r = build_router("gshard", d_model=D, num_experts=E, group_size=S, capacity_factor=1.0).eval()
    with torch.no_grad():
        r.weight.mul_(10)
    x = torch.randn(4 * S, D)
    routing = r(x)
    C = math.ceil(1.0 * 2 * S / E)
    group = routing.token_ids // S
    counts = torch.zeros(4, E, dtype=torch.long).index_put_((group, routing.expert_ids),
                                                           torch.ones_like(group), accumulate=True)
    assert int(counts.max()) <= C
    assert int(routing.dropped) == 4 * S * 2 - routing.num_pairs
    # First choices claim slots before second choices: where an expert of a group dropped a
    # first choice, it kept no second choice.
    kept = set(zip(routing.token_ids.tolist(), routing.expert_ids.tolist()))
    top = routing.topk_ids
    for g in range(4):
        for e in range(E):
            toks = range(g * S, (g + 1) * S)
            first_dropped = any(top[t, 0] == e and (t, e) not in kept for t in toks)
            second_kept = any(top[t, 1] == e and (t, e) in kept for t in toks)
            assert not (first_dropped and second_kept)
    assert int(routing.dropped) > 0                          # the check above was exercised
    # Changing group 1's tokens leaves group 0's routing unchanged.
    x2 = x.clone()
    x2[S:2 * S] = torch.randn(S, D) * 5
    routing2 = r(x2)
    keep = routing.token_ids < S
    keep2 = routing2.token_ids < S
    assert torch.equal(routing.token_ids[keep], routing2.token_ids[keep2])
    assert torch.equal(routing.expert_ids[keep], routing2.expert_ids[keep2])


def test_gshard_rejects_other_k():
    with pytest.raises(ValueError, match="top-2"):
        build_router("gshard", d_model=D, num_experts=E, top_k=1)


# G5 expert choice ---------------------------------------------------------------------------
def test_expert_choice_exact_balance_and_mean_c():
    r = build_router("expert_choice", d_model=D, num_experts=E, capacity_factor=2.0).train()
    x = torch.randn(32, D)
    routing = r(x)
    C = 32 * 2 // E
    assert routing.tokens_per_expert().tolist() == [C] * E
    assert routing.num_pairs / 32 == 2.0
    # Each expert took its C highest-probability tokens.
    for e in range(E):
        chosen = routing.token_ids[routing.expert_ids == e]
        kth = routing.probs[:, e].topk(C).values[-1]
        assert bool((routing.probs[chosen, e] >= kth).all())
    # Weights are the softmax probabilities S[t, e].
    torch.testing.assert_close(routing.weights, routing.probs[routing.token_ids, routing.expert_ids])
    # Per-group choice: every expert takes exactly C = c·S/E tokens of every group of S = 8,
    # and a group's routing ignores the other groups.
    grouped = build_router("expert_choice", d_model=D, num_experts=E, group_size=8).train()
    grouped.weight.data.copy_(r.weight.data)
    rg = grouped(x)
    per_group = torch.zeros(4, E, dtype=torch.long).index_put_(
        (rg.token_ids // 8, rg.expert_ids), torch.ones_like(rg.token_ids), accumulate=True)
    assert per_group.tolist() == [[4] * E] * 4
    alone = grouped(x[8:16])
    in_g1 = (rg.token_ids >= 8) & (rg.token_ids < 16)
    assert torch.equal(alone.token_ids + 8, rg.token_ids[in_g1])
    assert torch.equal(alone.expert_ids, rg.expert_ids[in_g1])


def test_expert_choice_c_equals_E_is_the_dense_mixture():
    moe = make_moe("expert_choice", capacity_factor=float(E)).eval()
    x = torch.randn(10, D)
    y = moe(x)
    p = torch.softmax(x @ moe.router.weight.t(), -1)
    dense = sum(p[:, e:e + 1] * moe.experts[e](x) for e in range(E))
    torch.testing.assert_close(y, dense, atol=1e-5, rtol=1e-5)


def test_expert_choice_is_batch_dependent_and_causal_mode_is_not():
    torch.manual_seed(3)
    x = torch.randn(16, D)
    x_other = x.clone()
    x_other[1:] = torch.randn(15, D) * 3
    ec = build_router("expert_choice", d_model=D, num_experts=E).eval()
    assert ec.causal_safe is False
    with torch.no_grad():
        ec.weight.mul_(10)
    sets = set()
    for _ in range(20):                          # some other batch changes token 0's experts
        x_other[1:] = torch.randn(15, D) * 3
        rt = ec(x_other)
        sets.add(tuple(rt.expert_ids[rt.token_ids == 0].tolist()))
    assert len(sets) > 1
    causal = build_router("expert_choice", d_model=D, num_experts=E, top_k=2, causal=True).eval()
    causal.weight.data.copy_(ec.weight.data)
    assert causal.causal_safe is True
    a, b = causal(x), causal(x_other)
    assert torch.equal(a.expert_ids[a.token_ids == 0], b.expert_ids[b.token_ids == 0])
    # The eval fallback is token-choice top-2 with the raw probabilities.
    p = torch.softmax(x @ causal.weight.t(), -1)
    top2 = p.topk(2, dim=-1)
    assert torch.equal(a.expert_ids.view(16, 2).sort(-1).values, top2.indices.sort(-1).values)
    torch.testing.assert_close(a.weights.view(16, 2).sort(-1).values, top2.values.sort(-1).values)
    # In training the causal variant still routes by expert choice (exact balance).
    assert causal.train()(x).tokens_per_expert().tolist() == [8] * E


# G11 top-p ----------------------------------------------------------------------------------
def test_top_p_minimal_set_exceeding_p():
    from moekit.routing.top_p import top_p_selection
    torch.manual_seed(4)
    probs = torch.softmax(torch.randn(500, 8) * 2, -1)
    for p in (0.1, 0.4, 0.7, 0.95):
        sel = top_p_selection(probs, p)
        n = sel.sum(-1)
        assert bool((n >= 1).all())
        sorted_p = probs.sort(-1, descending=True).values
        csum = sorted_p.cumsum(-1)
        mass_all = csum.gather(1, (n - 1).unsqueeze(-1)).squeeze(-1)
        mass_but_one = torch.where(n > 1, csum.gather(1, (n - 2).clamp_min(0).unsqueeze(-1)).squeeze(-1),
                                   torch.zeros_like(mass_all))
        assert bool((mass_all > p).all()) and bool((mass_but_one <= p).all())
        # The selected experts are the most probable ones.
        assert torch.allclose((probs * sel).sum(-1), mass_all)
    capped, free = top_p_selection(probs, 0.95, max_experts=2), top_p_selection(probs, 0.95)
    assert bool((capped.sum(-1) <= 2).all()) and not bool((capped & ~free).any())
    small = free.sum(-1) <= 2
    assert torch.equal(capped[small], free[small]) and bool((capped[~small].sum(-1) == 2).all())
    one = top_p_selection(probs, 0.05)
    low = probs.max(-1).values > 0.05
    assert bool((one.sum(-1)[low] == 1).all())


def test_top_p_p1_is_dense_with_raw_weights_and_stats():
    moe = make_moe("top_p", router_kwargs={"p": 1.0}).eval()
    x = torch.randn(9, D)
    y = moe(x)
    assert moe.last_stats.experts_per_token.item() == E
    p = torch.softmax(x @ moe.router.weight.t(), -1)
    dense = sum(p[:, e:e + 1] * moe.experts[e](x) for e in range(E))
    torch.testing.assert_close(y, dense, atol=1e-5, rtol=1e-5)


def test_top_p_dynamic_loss_and_experts_per_token():
    moe = make_moe("top_p", aux_loss_coef=0.0, router_kwargs={"p": 0.4, "dynamic_loss_coef": 0.5}).train()
    x = torch.randn(64, D)
    moe(x)
    r = moe.last_routing
    h = -(r.probs * r.probs.log()).sum(-1).mean()
    torch.testing.assert_close(r.aux_losses["dynamic"], 0.5 * h)
    torch.testing.assert_close(moe.aux_loss, 0.5 * h)
    assert moe.last_stats.experts_per_token.item() == pytest.approx(r.num_pairs / 64)

    def mean_experts_after(beta):
        # The router alone with linear experts y = g V (computed densely; unselected experts
        # contribute 0, as in the sparse layer), trained on a regression task + β·L_d.
        torch.manual_seed(5)
        r = build_router("top_p", d_model=D, num_experts=E, p=0.4, dynamic_loss_coef=beta)
        V = torch.randn(E, D, requires_grad=True)
        opt = torch.optim.SGD(list(r.parameters()) + [V], lr=0.5)
        for _ in range(25):
            rt = r(x)
            g = torch.zeros(64, E).index_put((rt.token_ids, rt.expert_ids), rt.weights)
            loss = (g @ V - x).square().mean() + sum(rt.aux_losses.values(), torch.zeros(()))
            opt.zero_grad()
            loss.backward()
            opt.step()
        return r(x).num_pairs / 64

    assert mean_experts_after(1.0) < mean_experts_after(0.0)


# G8 hash ------------------------------------------------------------------------------------
def test_hash_routes_by_id_only_and_needs_ids():
    moe = make_moe("hash").eval()
    assert sum(p.numel() for p in moe.router.parameters()) == 0
    ids = torch.randint(0, 100, (3, 10))
    moe(torch.randn(3, 10, D), token_ids=ids)
    r1 = moe.last_routing
    moe(torch.randn(3, 10, D) * 7, token_ids=ids)
    r2 = moe.last_routing
    assert torch.equal(r1.expert_ids, r2.expert_ids)
    assert bool((r1.weights == 1).all())
    # Same id, same expert, wherever it appears.
    flat = ids.reshape(-1)
    for v in flat.unique():
        assert r1.expert_ids[flat == v].unique().numel() == 1
    with pytest.raises(ValueError, match="token_ids"):
        moe(torch.randn(3, 10, D))
    with pytest.raises(ValueError, match="integer"):
        moe(torch.randn(3, 10, D), token_ids=ids.float())


def test_hash_table_balanced_variant():
    r = build_router("hash", d_model=D, num_experts=E, vocab_size=200)
    assert "table" in r.state_dict()
    # Zipf-like counts with no id above 1/E of the mass.
    counts = (1000.0 / torch.arange(1, 201).float() ** 0.8).round()
    assert counts.max() / counts.sum() < 1 / E
    r.fit_balanced(counts)
    load = torch.zeros(E).index_add_(0, r.table, counts)
    assert (load.max() / load.mean()).item() <= 1.05
    with pytest.raises(ValueError, match=r"\[0, 200\)"):
        r(torch.randn(2, D), token_ids=torch.tensor([3, 200]))


# G1 / F1 dense ------------------------------------------------------------------------------
def test_dense_equals_softmax_mixture_and_topk_k_equals_E():
    moe = make_moe("dense").eval()
    x = torch.randn(11, D)
    y = moe(x)
    p = torch.softmax(x @ moe.router.weight.t(), -1)
    dense = sum(p[:, e:e + 1] * moe.experts[e](x) for e in range(E))
    torch.testing.assert_close(y, dense, atol=1e-5, rtol=1e-5)
    topk = make_moe("topk", top_k=E, experts=moe.experts, expert=None, d_hidden=None)
    topk.router.weight.data.copy_(moe.router.weight.data)
    torch.testing.assert_close(topk.eval()(x), y, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="capacity"):
        make_moe("dense", capacity_factor=1.0)


# G12 cosine ---------------------------------------------------------------------------------
def test_cosine_scores_bounded_and_scale_invariant():
    r = build_router("cosine", d_model=D, num_experts=E).eval()
    x = torch.randn(30, D)
    logits = r.logits(x)
    tau = r.temperature.item()
    assert bool((logits.abs() <= 1 / tau + 1e-4).all())
    a, b = r(x), r(x * 3.7)
    assert torch.equal(a.expert_ids, b.expert_ids)
    torch.testing.assert_close(a.weights, b.weights)
    moe = make_moe("cosine")
    moe(torch.randn(5, D)).sum().backward()
    assert moe.router.log_temperature.grad is not None and moe.router.proj.weight.grad.abs().sum() > 0


# G15 ReLU -----------------------------------------------------------------------------------
def test_relu_gates_nonnegative_variable_k_and_lambda_schedule():
    r = build_router("relu", d_model=D, num_experts=8, top_k=2, l1_init=1e-3).train()
    x = torch.randn(64, D)
    routing = r(x)
    assert bool((routing.weights > 0).all())
    per_token = torch.bincount(routing.token_ids, minlength=64)
    assert per_token.unique().numel() > 1
    # Sparsity starts below the target 1 − 2/8, so λ grows by exactly ζ.
    sparsity = 1 - routing.num_pairs / (64 * 8)
    assert sparsity < 0.75
    assert r.l1_coef.item() == pytest.approx(1e-3 * 1.2)


def test_relu_l1_schedule_reaches_target_k():
    # The router against a task loss that wants more experts (linear experts y = g V, computed
    # densely: a zero gate contributes nothing, as in the sparse layer). λ's schedule must
    # bring the mean number of active experts to the target k = 2 of 8.
    torch.manual_seed(6)
    r = build_router("relu", d_model=D, num_experts=8, top_k=2, l1_init=1e-2)
    V = torch.randn(8, D, requires_grad=True)
    opt = torch.optim.Adam(list(r.parameters()) + [V], lr=2e-2)
    x = torch.randn(64, D) + 1.0                 # hidden states are not zero-mean
    target = torch.tanh(x @ torch.randn(D, D))
    ks = []
    for _ in range(200):
        rt = r(x)
        g = torch.zeros(64, 8).index_put((rt.token_ids, rt.expert_ids), rt.weights)
        loss = (g @ V - target).square().mean() + sum(rt.aux_losses.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        ks.append(rt.num_pairs / 64)
    assert ks[0] > 2.4                           # starts far from the target
    mean_k = sum(ks[-100:]) / 100
    assert abs(mean_k - 2) <= 0.2, mean_k


# G10 DSelect-k ------------------------------------------------------------------------------
def test_dselect_smooth_step_properties():
    from moekit.routing.dselect_k import smooth_step
    g = 0.8
    assert smooth_step(torch.tensor(0.0), g).item() == 0.5
    assert smooth_step(torch.tensor(-g / 2), g).item() == 0.0
    assert smooth_step(torch.tensor(g / 2), g).item() == pytest.approx(1.0)
    t = torch.tensor([-g / 2 + 1e-4, g / 2 - 1e-4], requires_grad=True)
    smooth_step(t, g).sum().backward()
    assert bool((t.grad.abs() < 1e-3).all())          # C¹: the slope vanishes at ±γ/2


def test_dselect_gate_sums_to_one_and_binary_codes_are_k_sparse():
    r = build_router("dselect_k", d_model=D, num_experts=8, top_k=2).train()
    x = torch.randn(20, D)
    routing = r(x)
    sel = routing.extras["selector_probs"]
    torch.testing.assert_close(sel.sum(-1), torch.ones(20, 2))
    torch.testing.assert_close(routing.probs.sum(-1), torch.ones(20))
    per_token = torch.zeros(20).index_add_(0, routing.token_ids, routing.weights.detach())
    torch.testing.assert_close(per_token, torch.ones(20))
    assert "entropy" in routing.aux_losses
    # Push every code beyond ±γ/2: q becomes exactly ≤ k-sparse.
    with torch.no_grad():
        r.code_proj.weight.zero_()
        r.code_proj.bias.copy_(torch.tensor([5.0, -5.0, 5.0, -5.0, -5.0, 5.0]))
    routing = r(x)
    assert bool((torch.bincount(routing.token_ids, minlength=20) <= 2).all())
    assert set(routing.expert_ids.tolist()) == {0b101, 0b100}   # bit j of l is S(z_j)
    assert routing.aux_losses["entropy"].item() == pytest.approx(0.0, abs=1e-6)


# G7 Sinkhorn --------------------------------------------------------------------------------
def test_sinkhorn_marginals_and_better_balance_than_argmax():
    from moekit.routing.sinkhorn import sinkhorn_balance
    torch.manual_seed(7)
    logits = torch.randn(256, E) + torch.tensor([3.0, 1.0, 0.0, -1.0])      # skewed to expert 0
    P = sinkhorn_balance(logits, num_iters=50).exp()
    torch.testing.assert_close(P.sum(1), torch.ones(256))
    torch.testing.assert_close(P.sum(0), torch.full((E,), 256 / E), rtol=1e-2, atol=0.5)
    r = build_router("sinkhorn", d_model=D, num_experts=E, top_k=1).train()
    x = torch.randn(256, D)
    with torch.no_grad():
        r.weight.copy_(torch.randn(E, D))
        r.weight[0] += 2 * x.mean(0) / x.mean(0).norm()
    imbalance = lambda c: (c.max() / c.float().mean()).item()
    balanced = imbalance(r(x).tokens_per_expert())
    plain = imbalance(r.eval()(x).tokens_per_expert())
    assert balanced < plain
    # Eval selection is the plain argmax of the softmax, with the raw softmax gate.
    rt = r(x)
    p = torch.softmax(x @ r.weight.t(), -1)
    assert torch.equal(rt.expert_ids, p.argmax(-1))
    torch.testing.assert_close(rt.weights, p.max(-1).values)


# G6 BASE ------------------------------------------------------------------------------------
def test_base_assignment_is_optimal():
    from moekit.routing.balanced_assignment import balanced_assignment, balanced_capacities
    torch.manual_seed(8)
    for T, n_exp in ((6, 3), (8, 2), (7, 3)):
        caps = balanced_capacities(T, n_exp)
        for _ in range(5):
            s = torch.randn(T, n_exp)
            a = balanced_assignment(s, caps)
            assert torch.bincount(a, minlength=n_exp).tolist() == caps
            best = max(float(s[torch.arange(T), torch.tensor(c)].sum())
                       for c in itertools.product(range(n_exp), repeat=T)
                       if torch.bincount(torch.tensor(c), minlength=n_exp).tolist() == caps)
            assert float(s[torch.arange(T), a].sum()) == pytest.approx(best, abs=1e-5)


def test_base_assignment_matches_scipy_when_available():
    scipy_opt = pytest.importorskip("scipy.optimize")
    from moekit.routing.balanced_assignment import balanced_assignment, balanced_capacities
    s = torch.randn(48, 6)
    caps = balanced_capacities(48, 6)
    a = balanced_assignment(s, caps)
    cols = torch.tensor([e for e in range(6) for _ in range(caps[e])])
    rows, c = scipy_opt.linear_sum_assignment(-s[:, cols].numpy())
    assert float(s[torch.arange(48), a].sum()) == pytest.approx(float(s[:, cols].numpy()[rows, c].sum()), abs=1e-5)


def test_base_router_balanced_in_training_argmax_in_eval():
    r = build_router("base", d_model=D, num_experts=E).train()
    x = torch.randn(24, D) + 2.0                # a shared offset: plain argmax would be skewed
    routing = r(x)
    assert routing.tokens_per_expert().tolist() == [6] * E
    logits = x @ r.weight.t()
    torch.testing.assert_close(routing.weights, torch.sigmoid(logits[routing.token_ids, routing.expert_ids]))
    ev = r.eval()(x)
    assert torch.equal(ev.expert_ids, logits.argmax(-1))
    grouped = build_router("base", d_model=D, num_experts=E, group_size=8).train()
    grouped.weight.data.copy_(r.weight.data)
    rg = grouped(x)
    per_group = torch.zeros(3, E, dtype=torch.long).index_put_(
        (rg.token_ids // 8, rg.expert_ids), torch.ones_like(rg.token_ids), accumulate=True)
    assert per_group.tolist() == [[2] * E] * 3


# G14 THOR -----------------------------------------------------------------------------------
def test_thor_random_experts_consistency_and_eval_ensemble():
    from moekit.routing.thor import consistency_loss
    moe = make_moe("thor").train()
    assert sum(p.numel() for p in moe.router.parameters()) == 0
    x = torch.randn(6, D)
    seen = torch.zeros(E)
    for _ in range(400):
        r = moe.router(x)
        assert r.expert_ids.unique().numel() == 1          # one expert for the whole batch
        seen[r.expert_ids[0]] += 1
    assert (seen / 400 - 1 / E).abs().max() < 0.08
    a = torch.randn(5, 10, requires_grad=True)
    assert consistency_loss(a, a.detach().clone()).item() == pytest.approx(0.0, abs=1e-7)
    b = torch.randn(5, 10)
    la, lb = a.log_softmax(-1), b.log_softmax(-1)
    kl = lambda p, q: (p.exp() * (p - q)).sum(-1).mean()
    torch.testing.assert_close(consistency_loss(a, b), 0.5 * (kl(la, lb) + kl(lb, la)))
    moe.eval()
    mean_expert = sum(moe.experts[e](x) for e in range(E)) / E
    torch.testing.assert_close(moe(x), mean_expert, atol=1e-5, rtol=1e-5)


# G16 null experts ---------------------------------------------------------------------------
def test_null_experts_zero_null_is_topk_and_null_pairs_skip():
    r0 = build_router("null_experts", d_model=D, num_experts=E, top_k=2, num_null_experts=0).eval()
    ref = TopKRouter(D, E, 2).eval()
    ref.weight.data.copy_(r0.weight.data)
    x = torch.randn(30, D)
    a, b = r0(x), ref(x)
    assert torch.equal(a.expert_ids, b.expert_ids)
    torch.testing.assert_close(a.weights, b.weights)

    r = build_router("null_experts", d_model=D, num_experts=E, top_k=2, num_null_experts=3)
    with torch.no_grad():
        r.weight[E:] += 0.5 * x.mean(0) / x.mean(0).norm()
    routing = r(x)
    topk = routing.extras["topk_ids_all"]
    real = (topk < E).sum(-1)
    assert torch.equal(torch.bincount(routing.token_ids, minlength=30), real)
    assert real.unique().numel() > 1                         # k varies per token
    assert bool((routing.expert_ids < E).all())
    per_token = torch.zeros(30).index_add_(0, routing.token_ids, routing.weights.detach())
    assert bool((per_token <= 1 + 1e-6).all())
    assert "balance" in routing.aux_losses


# L1 task routing ----------------------------------------------------------------------------
def test_task_routing_shared_experts_and_extracted_subnetwork():
    moe = make_moe("task", router_kwargs={"num_tasks": 3}).eval()
    x = torch.randn(4, 6, D)
    tasks = torch.randint(0, 3, (4, 6))
    y = moe(x, task_ids=tasks)
    r = moe.last_routing
    flat_tasks = tasks.reshape(-1)
    for m in range(3):
        ids, w = moe.router.task_experts(m)
        toks = (flat_tasks == m).nonzero()[:, 0]
        for t in toks.tolist():
            assert r.expert_ids[r.token_ids == t].tolist() == ids.tolist()
        # The task's K experts alone reproduce the layer for that task's tokens.
        xt = x.reshape(-1, D)[toks]
        sub = sum(w[i] * moe.experts[int(e)](xt) for i, e in enumerate(ids))
        torch.testing.assert_close(y.reshape(-1, D)[toks], sub, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="task_ids"):
        moe(x)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        moe(x, task_ids=torch.full((4, 6), 3))


def test_routers_reject_inputs_they_do_not_take():
    with pytest.raises(TypeError):
        make_moe("topk")(torch.randn(3, D), task_ids=torch.zeros(3, dtype=torch.long))


# Random -------------------------------------------------------------------------------------
def test_random_router_distinct_uniform_and_eval_deterministic():
    r = build_router("random", d_model=D, num_experts=E, top_k=2).train()
    routing = r(torch.randn(3000, D))
    ids = routing.topk_ids
    assert bool((ids[:, 0] != ids[:, 1]).all())
    frac = routing.tokens_per_expert().float() / routing.num_pairs
    assert (frac - 1 / E).abs().max() < 0.03
    r.eval()
    a, b = r(torch.randn(10, D)), r(torch.randn(10, D))
    assert torch.equal(a.expert_ids, b.expert_ids)


# F3 Gaussian gate ---------------------------------------------------------------------------
def test_gaussian_gate_sums_to_one_and_em_is_monotone():
    r = build_router("gaussian", d_model=2, num_experts=3, top_k=3)
    centres = torch.tensor([[-3.0, 0.0], [3.0, 0.0], [0.0, 3.0]])
    x = torch.cat([c + 0.5 * torch.randn(100, 2) for c in centres])
    routing = r(x)
    torch.testing.assert_close(routing.probs.sum(-1), torch.ones(300))
    per_token = torch.zeros(300).index_add_(0, routing.token_ids, routing.weights.detach())
    torch.testing.assert_close(per_token, torch.ones(300))
    lls = []
    for _ in range(15):
        lls.append(r.log_likelihood(x).item())
        r.em_update(x, torch.softmax(r.logits(x), -1).detach())
    assert all(b >= a - 1e-5 for a, b in zip(lls, lls[1:]))
    assert lls[-1] > lls[0] + 1.0
    # Each fitted mean sits near one true centre.
    d = torch.cdist(r.means.detach(), centres)
    assert d.min(1).values.max() < 0.3


# ---------------------------------------------------------------------------------------------
# Part 3: training schedules around routers (METHODS.md T4, T5, T8)
# ---------------------------------------------------------------------------------------------

def test_dense_to_sparse_starts_dense_shrinks_monotonically_and_ends_top_k():
    from moekit.routing.schedules import DenseToSparseRouter
    r = DenseToSparseRouter(D, 8, 2, start_temperature=50.0, end_temperature=0.05, anneal_steps=40)
    x = torch.randn(64, D)
    with torch.no_grad():
        r.weight.mul_(10)
    counts = []
    for step in range(41):
        r.step.fill_(step)
        counts.append(r.eval()(x).num_pairs / 64)
    assert counts[0] == 8                                    # dense at the initial temperature
    assert all(b <= a for a, b in zip(counts, counts[1:])), counts
    assert counts[-2] < 2.5 and counts[-1] == 2              # the anneal really sparsifies
    ref = TopKRouter(D, 8, 2).eval()
    ref.weight.data.copy_(r.weight.data)
    a, b = r(x), ref(x)
    assert torch.equal(a.token_ids, b.token_ids)
    ga = torch.zeros(64, 8).index_put((a.token_ids, a.expert_ids), a.weights.detach())
    gb = torch.zeros(64, 8).index_put((b.token_ids, b.expert_ids), b.weights.detach())
    torch.testing.assert_close(ga, gb)
    # A training forward advances the schedule by one step and adds Gumbel noise.
    r.step.fill_(0)
    r.train()(x)
    assert int(r.step) == 1


def test_stable_moe_distils_then_freezes_assignments():
    V = 30
    emb = torch.randn(V, D)
    moe = make_moe("stable_moe", router_kwargs={"vocab_size": V, "distill_coef": 1.0})
    router = moe.router
    ids = torch.arange(V).repeat(4)
    x = emb[ids]                                          # hidden state is a function of the id
    opt = torch.optim.Adam(router.parameters(), lr=0.05)
    for _ in range(150):                                  # stage 1: train the distilled router only
        r = router(x, token_ids=ids)
        opt.zero_grad()
        r.aux_losses["distill"].backward()
        opt.step()
    teacher = (emb @ router.weight.t()).argmax(-1)
    student = router.distilled_logits(torch.arange(V)).argmax(-1)
    assert (teacher == student).float().mean() > 0.95
    router.zero_grad(set_to_none=True)
    router.freeze()
    assert all(not p.requires_grad for p in (*router.distill_embed.parameters(), *router.distill_proj.parameters()))
    opt = torch.optim.SGD([p for p in moe.parameters() if p.requires_grad], lr=1.0)
    seen = None
    for _ in range(5):                                    # stage 2: assignments never move
        y = moe(x, token_ids=ids)
        (y.square().mean() + moe.aux_loss).backward()
        assert router.distill_proj.weight.grad is None and router.weight.grad is not None
        opt.step()
        opt.zero_grad()
        assign = moe.last_routing.expert_ids.clone()
        seen = assign if seen is None else seen
        assert torch.equal(assign, seen)


def test_routing_dropout_masks_tokens_exactly_and_is_off_in_eval():
    from moekit.routing.schedules import RoutingDropout
    inner = build_router("topk", d_model=D, num_experts=E, top_k=2)
    moe = moekit.MoE(d_model=D, num_experts=E, d_hidden=F_HID, expert="mlp",
                     router=RoutingDropout(inner, token_rate=0.3, pair_rate=0.2))
    x = torch.randn(2000, D)
    y = moe.train()(x)
    masked = moe.last_routing.extras["masked_tokens"]
    assert abs(masked.float().mean().item() - 0.3) < 0.04
    assert bool((y[masked] == 0).all()) and bool((y[~masked].abs().sum(-1) > 0).any())
    kept_pairs = moe.last_routing.num_pairs
    expected = 2000 * 0.7 * 2 * 0.8
    assert abs(kept_pairs - expected) < 0.05 * expected
    moe.eval()
    torch.testing.assert_close(moe(x[:50]), moekit.MoE(d_model=D, num_experts=E, router=inner,
                                                       experts=moe.experts).eval()(x[:50]))


def test_freeze_moe_parameters_touches_only_experts_and_routers():
    from moekit.routing.schedules import freeze_moe_parameters
    model = torch.nn.Sequential(torch.nn.Linear(D, D), make_moe("topk", num_shared_experts=1))
    n = freeze_moe_parameters(model, experts=True, routers=True)
    moe = model[1]
    assert n == len(list(moe.experts.parameters())) + len(list(moe.router.parameters()))
    assert all(not p.requires_grad for p in moe.experts.parameters())
    assert all(not p.requires_grad for p in moe.router.parameters())
    assert all(p.requires_grad for p in model[0].parameters())
    assert all(p.requires_grad for p in moe.shared_experts.parameters())
    freeze_moe_parameters(model, routers=False, requires_grad=True)
    assert all(p.requires_grad for p in moe.experts.parameters())
    assert all(not p.requires_grad for p in moe.router.parameters())


@pytest.mark.parametrize("name", available())
def test_learned_router_gets_task_gradient(name):
    """METHODS.md contract 9: the task loss alone reaches a learned router through the gates."""
    moe = make_moe(name, aux_loss_coef=0.0).train()
    params = [p for p in moe.router.parameters() if p.requires_grad]
    if not params:
        pytest.skip(f"{name} has no router parameters (hash/random/THOR are exempt)")
    x = torch.randn(24, D)
    moe(x, **router_inputs(name, x.shape[:-1])).square().mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


def test_competitive_loss_gradients_match_closed_form():
    """F1: ∂L/∂o_i = −h_i (d − o_i)/σ² and ∂L/∂logit_i = p_i − h_i (per case; L summed here)."""
    from moekit.routing.dense import competitive_loss, competitive_responsibilities
    T, O, sigma = 7, 3, 0.7
    logits = torch.randn(T, E, dtype=torch.float64, requires_grad=True)
    out = torch.randn(T, E, O, dtype=torch.float64, requires_grad=True)
    d = torch.randn(T, O, dtype=torch.float64)
    (competitive_loss(logits, out, d, sigma=sigma) * T).backward()
    h = competitive_responsibilities(logits, out, d, sigma=sigma).detach()
    torch.testing.assert_close(h.sum(-1), torch.ones(T, dtype=torch.float64))
    torch.testing.assert_close(out.grad, -h.unsqueeze(-1) * (d.unsqueeze(1) - out.detach()) / sigma ** 2)
    torch.testing.assert_close(logits.grad, torch.softmax(logits.detach(), -1) - h)


@pytest.mark.parametrize("name", available())
def test_bfloat16_input_keeps_dtype_and_float32_router(name):
    moe = make_moe(name).train()
    x = torch.randn(2, 5, D).bfloat16()
    y = moe(x, **router_inputs(name, x.shape[:-1]))
    assert y.dtype == torch.bfloat16 and y.shape == x.shape and bool(torch.isfinite(y.float()).all())
    r = moe.last_routing
    assert r.weights.dtype == torch.float32
    assert r.logits is None or r.logits.dtype == torch.float32


def test_expert_choice_refuses_a_top_k_it_would_ignore():
    with pytest.raises(ValueError, match="top_k only sets the causal=True eval fallback"):
        build_router("expert_choice", d_model=D, num_experts=E, top_k=2)
    assert build_router("expert_choice", d_model=D, num_experts=E).top_k is None
    assert build_router("expert_choice", d_model=D, num_experts=E, causal=True).top_k == 2
    assert build_router("expert_choice", d_model=D, num_experts=E, top_k=3, causal=True).top_k == 3
