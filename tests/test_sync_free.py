"""Sync-free routing and execution (issue: a capacity mode with no host synchronisation).

Two kinds of checks:

- `no_host_sync` (a dispatch mode that fails at the first op that would wait for a GPU:
  ``.item()``, ``bool(t)``, boolean-mask indexing, ``nonzero``, ``bincount`` …) runs the
  layer's forward and backward on the CPU, so "no host sync" is tested without a GPU;
- the static layout computes exactly what the kept-pairs layout computes: routing decisions
  (against `apply_capacity`), layer outputs, gradients, losses and statistics.
"""
import copy

import pytest
import torch
from equivalence import CallWith, assert_same_outputs_and_grads

import moekit
from moekit.ops import HostSyncError, count_ids, no_host_sync
from moekit.ops.grouped_mm import grouped_mm_fast, grouped_mm_reference
from moekit.routing import available
from moekit.routing.base import Routing
from moekit.routing.capacity import apply_capacity, apply_capacity_static, capacity_for, capacity_tensor
from moekit.routing.registry import get_router_class
from moekit.routing.schedules import RoutingDropout

D, E, F = 16, 8, 16


# -- the detector itself ----------------------------------------------------------------
@pytest.mark.parametrize("op", [
    lambda x: x.sum().item(), lambda x: int(x.sum()), lambda x: bool(x.sum() > 0), lambda x: x[x > 0],
    lambda x: torch.nonzero(x), lambda x: torch.bincount((x > 0).long()), lambda x: x.tolist(),
    lambda x: x.unique(), lambda x: torch.arange(3).repeat_interleave(torch.tensor([1, 0, 2])),
    lambda x: x.masked_select(x > 0), lambda x: x.numpy(), lambda x: torch.allclose(x, x),
], ids=["item", "int", "bool", "bool-index", "nonzero", "bincount", "tolist", "unique", "repeat_interleave",
        "masked_select", "numpy", "allclose"])
def test_no_host_sync_catches_each_kind_of_sync(op):
    x = torch.randn(6)
    with pytest.raises(HostSyncError, match="synchronise"):
        with no_host_sync():
            op(x)
    assert isinstance(x.tolist(), list)           # Tensor.tolist is restored on exit


def test_no_host_sync_lets_static_work_through_forward_and_backward():
    x = torch.randn(5, 3, requires_grad=True)
    with no_host_sync():
        y = (x.softmax(-1) * torch.arange(3)).sum()
        y.backward()
        idx = torch.topk(x.detach(), 2).indices
        x.detach()[torch.arange(5).unsqueeze(1), idx]      # integer indexing is static
        torch.arange(3).repeat_interleave(torch.tensor([1, 0, 2]), output_size=3)   # size given
    assert x.grad is not None


def test_count_ids_equals_bincount():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 7, (40, 3), generator=g)
    valid = torch.rand(40, 1, generator=g) > 0.3
    assert torch.equal(count_ids(ids, 9), torch.bincount(ids.reshape(-1), minlength=9))
    assert torch.equal(count_ids(ids, 9, valid), torch.bincount(ids[valid.squeeze(1)].reshape(-1), minlength=9))
    assert count_ids(ids[:0], 4).tolist() == [0, 0, 0, 0]


def test_grouped_mm_rows_past_the_last_offset():
    """Rows past offs[-1] belong to no expert: zeros in the reference; the fast path agrees
    on every covered row."""
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(11, 8, generator=g), torch.randn(3, 8, 4, generator=g)
    offs = torch.tensor([2, 2, 7], dtype=torch.int32)
    ref = grouped_mm_reference(x, w, offs)
    assert ref.shape == (11, 4) and torch.equal(ref[7:], torch.zeros(4, 4))
    torch.testing.assert_close(grouped_mm_fast(x, w, offs)[:7], ref[:7])


# -- routing decisions: static layout == kept pairs ----------------------------------------
def _compact(expert_TK, w_TK, keep_TK):
    T, K = keep_TK.shape
    k = keep_TK.reshape(-1)
    tok = torch.arange(T).repeat_interleave(K)
    return tok[k], expert_TK.reshape(-1)[k], w_TK.reshape(-1)[k]


@pytest.mark.parametrize("policy", ["position", "probability", "reroute"])
@pytest.mark.parametrize("seed", range(12))
def test_static_capacity_keeps_exactly_the_pairs_apply_capacity_keeps(policy, seed):
    g = torch.Generator().manual_seed(seed)
    T = int(torch.randint(1, 40, (1,), generator=g))
    E_ = int(torch.randint(1, 9, (1,), generator=g))
    K = int(torch.randint(1, E_ + 1, (1,), generator=g))
    cf = [0.25, 0.5, 1.0, 1.7][seed % 4]
    logits = torch.randn(T, E_, generator=g)
    if seed % 3 == 0:
        logits = logits.round()                                 # ties
    probs = logits.softmax(-1)
    w_TK, ids_TK = moekit.ops.topk_stable(probs, K)
    mask = None if seed % 2 else torch.rand(T, generator=g) > 0.35
    n = T if mask is None else int(mask.sum())
    cap = capacity_for(cf, K, n, E_)
    fb = (probs, probs * 1.5) if policy == "reroute" else None
    tok, exp, w, dropped = apply_capacity(ids_TK, w_TK, num_experts=E_, capacity=cap, policy=policy,
                                          mask_T=mask, fallback=fb)
    cap_s = cap if mask is None else capacity_tensor(cf, K, mask.sum(), E_)
    assert int(cap_s) == cap
    with no_host_sync():
        exp_TK, ws_TK, keep_TK, dropped_s = apply_capacity_static(
            ids_TK, w_TK, num_experts=E_, capacity=cap_s, policy=policy, mask_T=mask, fallback=fb)
    t2, e2, w2 = _compact(exp_TK, ws_TK, keep_TK)
    assert torch.equal(t2, tok) and torch.equal(e2, exp) and torch.equal(w2, w)
    assert int(dropped_s) == int(dropped)
    assert torch.equal(ws_TK[~keep_TK], torch.zeros_like(ws_TK[~keep_TK]))


def test_capacity_tensor_matches_capacity_for():
    for cf in (0.1, 0.5, 1.0, 1.25, 2.0, 3.3):
        for K in (1, 2, 8):
            for n in (0, 1, 7, 100, 4095):
                for E_ in (1, 3, 8, 64):
                    want = 0 if n == 0 else capacity_for(cf, K, n, E_)
                    assert int(capacity_tensor(cf, K, torch.tensor(n), E_)) == want, (cf, K, n, E_)


def test_routing_compact_and_counts():
    keep = torch.tensor([True, False, True, True, False, True])
    r = Routing(token_ids=torch.tensor([0, 0, 1, 1, 2, 2]), expert_ids=torch.tensor([1, 2, 0, 2, 2, 1]),
                weights=torch.tensor([.5, 0., .3, .7, 0., 1.]), logits=None, dropped=torch.tensor(2),
                num_experts=3, slots_per_token=2, keep=keep)
    c = r.compact()
    assert c.keep is None and c.slots_per_token is None
    assert c.token_ids.tolist() == [0, 1, 1, 2] and c.expert_ids.tolist() == [1, 0, 2, 1]
    assert r.tokens_per_expert().tolist() == c.tokens_per_expert().tolist() == [1, 2, 1]
    assert c.compact() is c


# -- the layer --------------------------------------------------------------------------
SYNC_FREE_ROUTERS = [n for n in available() if getattr(get_router_class(n), "supports_sync_free", False)]
ROUTER_INPUTS = {"task": lambda T: {"task_ids": torch.randint(0, 2, T)},
                 "task_topk": lambda T: {"task_ids": torch.randint(0, 2, T)}}
ROUTER_KW = {"task": {"num_tasks": 2}, "task_topk": {"num_tasks": 2}}


def test_the_token_choice_family_is_sync_free():
    assert {"topk", "switch", "sigmoid", "noisy_topk"} <= set(SYNC_FREE_ROUTERS)


def _layer(router="topk", **kw):
    kw.setdefault("router_kwargs", ROUTER_KW.get(router))
    return moekit.MoE(d_model=D, num_experts=E, d_hidden=F, router=router, backend="grouped_mm", **kw)


@pytest.mark.parametrize("router", SYNC_FREE_ROUTERS)
@pytest.mark.parametrize("cap,masked", [(None, False), (None, True), (0.75, False), (0.75, True)],
                         ids=["dropless", "mask", "capacity", "capacity+mask"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_sync_free_layer_has_no_host_sync_forward_and_backward(router, cap, masked, train):
    torch.manual_seed(0)
    extra = {} if cap is None else {"capacity_factor": cap}
    if router in ("dense",) and cap is not None:
        pytest.skip("dense routing takes no capacity")
    moe = _layer(router, sync_free=True, aux_loss_coef=0.01, z_loss_coef=1e-3, **extra).train(train)
    x = torch.randn(2, 7, D, requires_grad=True)
    kw = ROUTER_INPUTS.get(router, lambda T: {})((2, 7))
    if masked:
        kw["mask"] = torch.rand(2, 7) > 0.3
    with no_host_sync():
        y = moe(x, **kw)
        (y.square().sum() + moe.aux_loss).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("router", ["topk", "switch", "sigmoid"])
def test_default_dropless_layer_is_already_sync_free(router):
    """Without capacity or masks the default layer needs no static layout: nothing syncs."""
    moe = _layer(router)
    x = torch.randn(3, 5, D, requires_grad=True)
    with no_host_sync():
        (moe(x).sum() + moe.aux_loss).backward()


@pytest.mark.parametrize("policy", ["position", "probability", "reroute"])
@pytest.mark.parametrize("cap,masked", [(None, True), (0.5, False), (1.0, True)], ids=["mask", "cap", "cap+mask"])
@pytest.mark.parametrize("router", ["topk", "sigmoid", "noisy_topk"])
def test_sync_free_layer_equals_the_default_layer(router, policy, cap, masked):
    if cap is None and policy != "position":
        pytest.skip("the drop policy only matters with capacity")
    torch.manual_seed(3)
    extra = {} if cap is None else {"capacity_factor": cap, "drop_policy": policy}
    ref = moekit.MoE(d_model=D, num_experts=E, d_hidden=F, router=router, backend="eager",
                     num_shared_experts=1, z_loss_coef=1e-3, **extra)
    fast = _layer(router, sync_free=True, num_shared_experts=1, z_loss_coef=1e-3, **extra)
    fast.load_state_dict(ref.state_dict())
    ref.eval(), fast.eval()               # noisy routers draw noise in training
    x = torch.randn(3, 6, D)
    mask = torch.rand(3, 6) > 0.3 if masked else None
    assert_same_outputs_and_grads(CallWith(ref, mask=mask, add_aux=True), CallWith(fast, mask=mask, add_aux=True),
                                  x, rtol_y=1e-5)
    s1, s2 = ref.last_stats, fast.last_stats
    for k in ("tokens_per_expert", "dropped", "drop_fraction", "router_entropy", "experts_per_token",
              "load_imbalance", "fraction_per_expert", "mean_prob_per_expert", "num_tokens"):
        a, b = s1[k], s2[k]
        if torch.is_tensor(a):
            torch.testing.assert_close(b, a, msg=k)
        else:
            assert a == b, k
    assert fast.last_routing.keep is not None and fast.last_routing.num_pairs == 18 * fast.top_k
    c = fast.last_routing.compact()
    assert torch.equal(c.token_ids, ref.last_routing.token_ids)
    assert torch.equal(c.expert_ids, ref.last_routing.expert_ids)


def test_sync_free_mlp_experts_with_biases_equal_the_default_layer():
    """Bias experts (upcycled BERT/ViT FFNs): dropped slots past the last expert's rows must
    not reach any bias, in the output or the gradient."""
    from moekit.experts import MLPExperts

    torch.manual_seed(7)
    banks = [MLPExperts(E, D, F, bias=True) for _ in range(2)]
    banks[1].load_state_dict(banks[0].state_dict())
    for b in banks[0].up_bias, banks[0].down_bias:
        torch.nn.init.normal_(b.data)
    banks[1].load_state_dict(banks[0].state_dict())
    ref = moekit.MoE(d_model=D, num_experts=E, experts=banks[0], capacity_factor=0.5, backend="eager")
    fast = moekit.MoE(d_model=D, num_experts=E, experts=banks[1], capacity_factor=0.5, backend="grouped_mm",
                      sync_free=True)
    fast.router.load_state_dict(ref.router.state_dict())
    mask = torch.rand(3, 6) > 0.2
    assert_same_outputs_and_grads(CallWith(ref, mask=mask), CallWith(fast, mask=mask), torch.randn(3, 6, D),
                                  rtol_y=1e-5)
    assert int(ref.last_stats.dropped) > 0


def test_sync_free_training_step_matches_with_capacity():
    """Training mode (no noise): a capacity-limited topk layer, sync-free vs default, on a
    batch where capacity really drops pairs."""
    torch.manual_seed(5)
    ref = moekit.MoE(d_model=D, num_experts=E, d_hidden=F, capacity_factor=0.5, backend="eager")
    fast = _layer(capacity_factor=0.5, sync_free=True)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(4, 8, D)
    assert_same_outputs_and_grads(ref, fast, x, rtol_y=1e-5)
    assert int(ref.last_stats.dropped) > 0
    assert int(fast.last_stats.dropped) == int(ref.last_stats.dropped)


def test_routing_dropout_in_the_static_layout():
    torch.manual_seed(0)
    router = RoutingDropout(moekit.routing.build_router("topk", d_model=D, num_experts=E, capacity_factor=1.0),
                            token_rate=0.3, pair_rate=0.2)
    moe = moekit.MoE(d_model=D, num_experts=E, d_hidden=F, router=router, backend="grouped_mm", sync_free=True)
    assert router.sync_free and router.inner.sync_free
    x = torch.randn(4, 8, D, requires_grad=True)
    with no_host_sync():
        y = moe(x)
        y.sum().backward()
    r = moe.last_routing
    masked = r.extras["masked_tokens"]
    assert not r.keep[masked[r.token_ids]].any()          # masked tokens keep nothing
    assert torch.equal(y.detach()[masked.view(4, 8)], torch.zeros(int(masked.sum()), D))


def test_sync_free_argument_errors():
    from moekit.experts import HeterogeneousExperts, ModuleExperts

    with pytest.raises(TypeError, match="sync_free must be a bool"):
        _layer(sync_free=1)
    with pytest.raises(ValueError, match="ModuleExperts reads its counts on the host"):
        moekit.MoE(d_model=D, num_experts=2, sync_free=True,
                   experts=ModuleExperts([torch.nn.Linear(D, D), torch.nn.Linear(D, D)], d_model=D))
    with pytest.raises(ValueError, match="HeterogeneousExperts reads its counts on the host"):
        moekit.MoE(d_model=D, num_experts=2, sync_free=True,
                   experts=HeterogeneousExperts(D, [8, 16]))
    odd = moekit.MoE(d_model=10, num_experts=E, d_hidden=6, sync_free=True)    # auto → eager for D=10
    with pytest.raises(ValueError, match="through the eager loop"):
        odd(torch.randn(4, 10))
    with pytest.raises(ValueError, match="backend='eager'"):
        moekit.MoE(d_model=D, num_experts=E, backend="eager", sync_free=True)
    with pytest.raises(ValueError, match="routes without a host sync"):
        _layer("gshard", sync_free=True)
    with pytest.raises(ValueError, match="routes without a host sync"):
        _layer("expert_choice", sync_free=True)


def test_stats_are_computed_when_read():
    moe = _layer(capacity_factor=0.5)
    x = torch.randn(2, 5, D)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[0, 0] = False
    moe(x, mask=mask)
    assert moe._stats is None and moe._stats_inputs is not None
    mask.zero_()                             # the caller reuses its buffer: stats keep the mask used
    s = moe.last_stats
    assert s.num_tokens == 9 and moe._stats is s and moe.last_stats is s
    moe.last_stats = None
    assert moe.last_stats is None
    moe(x)
    twin = copy.deepcopy(moe)                # pending statistics are computed, not lost
    assert twin.last_stats is not None and twin.last_stats.num_tokens == 10
    assert torch.equal(twin.last_stats.tokens_per_expert, moe.last_stats.tokens_per_expert)


def test_a_sync_free_router_instance_makes_the_layer_sync_free():
    router = moekit.routing.build_router("topk", d_model=D, num_experts=E, capacity_factor=1.0)
    router.sync_free = True
    moe = moekit.MoE(d_model=D, num_experts=E, router=router, backend="grouped_mm")
    assert moe.sync_free and "sync_free=True" in repr(moe)
    with pytest.raises(ValueError, match="backend='eager'"):
        moekit.MoE(d_model=D, num_experts=E, router=router, backend="eager")
