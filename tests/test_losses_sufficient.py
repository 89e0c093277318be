"""Sufficient statistics (`BalanceStats`) and the MoE layer's `stats_reducer`.

The losses and statistics of the layer are formed from sums over tokens, so summing the sums of
several routing groups gives the losses of their concatenated batch. These tests check that in
one process, with a reducer that adds the other groups' sums (what the all-reduce of
`moekit.parallel` does across ranks; tests/test_parallel.py checks it on real gloo groups).
"""
import copy

import pytest
import torch

import moekit
from moekit import losses
from moekit.layers.stats import compute_stats, moe_stats
from moekit.ops import no_host_sync

D = 8
STAT_FIELDS = ("tokens_per_expert", "dropped", "drop_fraction", "router_entropy", "experts_per_token",
               "load_imbalance", "fraction_per_expert", "mean_prob_per_expert", "num_tokens")


def _layer(router, **kw):
    torch.manual_seed(0)
    kw.setdefault("top_k", None if router == "top_p" else 2)
    moe = moekit.MoE(d_model=D, num_experts=4, d_hidden=8, router=router, aux_loss_coef=0.1, z_loss_coef=0.01, **kw)
    if router == "noisy_topk":                      # zero-initialised: give it something to route on
        torch.nn.init.normal_(moe.router.weight, std=0.5)
    return moe.eval() if router == "noisy_topk" else moe     # noise-free, so each group routes alike


def _assert_stats_equal(a, b):
    for f in STAT_FIELDS:
        va, vb = getattr(a, f), getattr(b, f)
        if vb is None:
            assert va is None, f
        else:
            torch.testing.assert_close(torch.as_tensor(va).double(), torch.as_tensor(vb).double(),
                                       rtol=1e-5, atol=1e-6, msg=f)


CASES = [("topk", "switch"), ("sigmoid", "sequence"), ("noisy_topk", "importance_load"), ("top_p", "switch"),
         ("topk", "none")]


@pytest.mark.parametrize("router,kind", CASES, ids=[f"{r}-{k}" for r, k in CASES])
def test_groups_with_a_summing_reducer_equal_the_concatenated_batch(router, kind):
    """Three routing groups (one with only padding): each group's loss and statistics after the
    reducer equal the whole batch's, and the groups' gradients add up to the whole batch's."""
    ref = _layer(router, balance_loss=kind)
    moe = copy.deepcopy(ref)
    x = torch.randn(6, 5, D)
    mask = torch.rand(6, 5, generator=torch.Generator().manual_seed(1)) > 0.25
    mask[4:] = False                                          # the last group holds only padding
    xs, masks = x.chunk(3), mask.chunk(3)

    y = ref(x, mask=mask)
    (y.sum() + ref.aux_loss).backward()
    g_ref = {n: p.grad.clone() for n, p in ref.named_parameters() if p.grad is not None}
    assert ref.aux_loss.item() > 0 or kind == "none"

    packed = []                                               # pass 1: each group's own sums
    moe.stats_reducer = lambda p: packed.append(p.detach().clone()) or p
    for xc, mc in zip(xs, masks):
        moe(xc, mask=mc)
    assert len(packed) == 3
    for i, (xc, mc) in enumerate(zip(xs, masks)):             # pass 2: plus the other groups' sums
        others = sum(p for j, p in enumerate(packed) if j != i)
        moe.stats_reducer = lambda p, o=others: p + o
        y = moe(xc, mask=mc)
        torch.testing.assert_close(moe.aux_loss, ref.aux_loss)
        (y.sum() + moe.aux_loss).backward()
        _assert_stats_equal(moe.last_stats, ref.last_stats)
    for n, p in moe.named_parameters():
        if n in g_ref:
            torch.testing.assert_close(p.grad, g_ref[n], msg=n)


@pytest.mark.parametrize("router,kind", CASES, ids=[f"{r}-{k}" for r, k in CASES])
def test_identity_reducer_changes_nothing(router, kind):
    """The reducer path (float64 packing, statistics taken in the forward pass) equals the local one."""
    plain = _layer(router, balance_loss=kind)
    hooked = copy.deepcopy(plain)
    hooked.stats_reducer = lambda p: p
    x, mask = torch.randn(2, 5, D), torch.rand(2, 5) > 0.3
    plain(x, mask=mask)
    hooked(x, mask=mask)
    assert isinstance(hooked._stats_inputs, losses.BalanceStats) and not isinstance(plain._stats_inputs,
                                                                                    losses.BalanceStats)
    torch.testing.assert_close(hooked.aux_loss, plain.aux_loss)
    _assert_stats_equal(hooked.last_stats, plain.last_stats)


def test_public_losses_equal_the_losses_from_sufficient_statistics():
    g = torch.Generator().manual_seed(2)
    T, E, K = 12, 5, 2
    logits = torch.randn(T, E, generator=g)
    probs = logits.softmax(-1)
    ids = probs.topk(K).indices
    mask = torch.rand(T, generator=g) > 0.3
    from moekit.routing import Routing
    r = Routing(token_ids=torch.arange(T).repeat_interleave(K), expert_ids=ids.reshape(-1),
                weights=torch.full((T * K,), 0.5), logits=logits, dropped=torch.zeros((), dtype=torch.long),
                num_experts=E, probs=probs, topk_ids=ids, extras={"gates": probs * 0.7, "load_probs": probs.sqrt()})
    s = losses.balance_stats(r, mask, balance="switch", z_loss=True)
    torch.testing.assert_close(losses.balance_loss_from_stats(s),
                               losses.load_balancing_loss(probs, losses.selection_counts(ids, E, mask), K, mask=mask))
    torch.testing.assert_close(losses.z_loss_from_stats(s), losses.z_loss(logits, mask=mask))
    s = losses.balance_stats(r, mask, balance="sequence", seq_len=4)
    torch.testing.assert_close(losses.balance_loss_from_stats(s),
                               losses.sequence_balance_loss(probs, ids, seq_len=4, mask=mask))
    s = losses.balance_stats(r, mask, balance="importance_load")
    want = losses.importance_loss(probs * 0.7, mask=mask) + losses.load_loss(probs.sqrt(), mask=mask)
    torch.testing.assert_close(losses.balance_loss_from_stats(s), want)
    st = compute_stats(r, mask)
    torch.testing.assert_close(st.router_entropy, losses.router_entropy(probs, mask=mask))
    torch.testing.assert_close(st.mean_prob_per_expert, probs[mask].mean(0))
    assert st.num_tokens == int(mask.sum())
    with pytest.raises(ValueError, match="statistics=True"):
        moe_stats(losses.balance_stats(r, mask, balance="switch"))


@pytest.mark.parametrize("cap", [None, 0.75], ids=["dropless", "capacity"])
def test_sync_free_layer_with_a_reducer_stays_sync_free(cap):
    """Under a reducer the statistics' sums are taken in the forward pass: still no host sync."""
    torch.manual_seed(0)
    moe = moekit.MoE(d_model=16, num_experts=8, d_hidden=16, router="topk", backend="grouped_mm", sync_free=True,
                     capacity_factor=cap, aux_loss_coef=0.01, z_loss_coef=1e-3)
    moe.stats_reducer = lambda p: p * 1.0
    x = torch.randn(2, 7, 16, requires_grad=True)
    with no_host_sync():
        y = moe(x, mask=torch.rand(2, 7) > 0.3)
        (y.square().sum() + moe.aux_loss).backward()
    assert moe.last_stats is not None and x.grad is not None
