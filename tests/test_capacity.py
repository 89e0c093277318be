"""Capacity and drop policies against plain-Python references, plus property tests."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit.routing.capacity import apply_capacity, capacity_for, rank_within_expert


def reference_drop(topk_ids, weights, E, C, policy, mask=None):
    """Plain loops: slot-major; within a slot by token order or by weight (desc, stable)."""
    T, K = topk_ids.shape
    room = [C] * E
    kept = set()
    for k in range(K):
        toks = [t for t in range(T) if mask is None or mask[t]]
        if policy == "probability":
            toks = sorted(toks, key=lambda t: -weights[t, k].item())
        for t in toks:
            e = topk_ids[t, k].item()
            if room[e] > 0:
                room[e] -= 1
                kept.add((t, k))
    n_valid = sum(1 for t in range(T) if mask is None or mask[t]) * K
    return sorted(kept), n_valid - len(kept)


def reference_reroute(topk_ids, pref, E, C, mask=None):
    T, K = topk_ids.shape
    order = []
    for t in range(T):
        first = topk_ids[t].tolist()
        rest = sorted((e for e in range(E) if e not in first), key=lambda e: (-pref[t, e].item(), e))
        order.append(first + rest)
    need = [K if mask is None or mask[t] else 0 for t in range(T)]
    room = [C] * E
    kept = []
    for r in range(E):
        for t in range(T):
            if need[t] > 0:
                e = order[t][r]
                if room[e] > 0:
                    room[e] -= 1
                    need[t] -= 1
                    kept.append((t, e))
    return sorted(kept), sum(need)


def _random_case(T, E, K, seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(T, E, generator=g)
    # Skew the load so capacity bites.
    scores[:, 0] += 0.5
    w, ids = torch.sort(scores, dim=1, descending=True, stable=True)
    return ids[:, :K], w[:, :K], scores


@pytest.mark.parametrize("policy", ["position", "probability"])
@pytest.mark.parametrize("T,E,K,C", [(17, 4, 2, 5), (1, 3, 1, 1), (30, 8, 3, 2), (10, 2, 2, 10)])
def test_drop_policies_match_reference(policy, T, E, K, C):
    ids, w, _ = _random_case(T, E, K, seed=T * 31 + E)
    mask = torch.rand(T) > 0.2
    for m in (None, mask):
        tok, exp, wt, dropped = apply_capacity(ids, w, num_experts=E, capacity=C, policy=policy, mask_T=m)
        ref_kept, ref_dropped = reference_drop(ids, w, E, C, policy, m)
        got = sorted((t, ids[t].tolist().index(e)) for t, e in zip(tok.tolist(), exp.tolist()))
        assert got == ref_kept
        assert int(dropped) == ref_dropped
        assert torch.bincount(exp, minlength=E).max() <= C
        # Weights of kept pairs are the router's own.
        torch.testing.assert_close(wt, w[tok, [ids[t].tolist().index(e) for t, e in zip(tok.tolist(), exp.tolist())]])
        # Token-major output order.
        assert tok.tolist() == sorted(tok.tolist())


@pytest.mark.parametrize("T,E,K,C", [(17, 4, 2, 5), (1, 3, 1, 1), (30, 8, 3, 2), (12, 4, 2, 6), (9, 3, 3, 2)])
def test_reroute_matches_reference(T, E, K, C):
    ids, w, scores = _random_case(T, E, K, seed=T + E * 7)
    fallback_w = scores * 0.5
    for m in (None, torch.arange(T) % 3 != 1):
        tok, exp, wt, dropped = apply_capacity(ids, w, num_experts=E, capacity=C, policy="reroute", mask_T=m,
                                               fallback=(scores, fallback_w))
        ref_kept, ref_dropped = reference_reroute(ids, scores, E, C, m)
        assert sorted(zip(tok.tolist(), exp.tolist())) == ref_kept
        assert int(dropped) == ref_dropped
        assert torch.bincount(exp, minlength=E).max() <= C
        for t, e, v in zip(tok.tolist(), exp.tolist(), wt.tolist()):
            row = ids[t].tolist()
            expect = w[t, row.index(e)] if e in row else fallback_w[t, e]
            assert v == pytest.approx(float(expect))


@settings(max_examples=60, deadline=None)
@given(T=st.integers(1, 40), E=st.integers(1, 9), data=st.data())
def test_capacity_properties(T, E, data):
    K = data.draw(st.integers(1, E))
    C = data.draw(st.integers(0, T * K))
    policy = data.draw(st.sampled_from(["position", "probability", "reroute"]))
    seed = data.draw(st.integers(0, 10_000))
    ids, w, scores = _random_case(T, E, K, seed)
    tok, exp, wt, dropped = apply_capacity(ids, w, num_experts=E, capacity=C, policy=policy,
                                           fallback=(scores, scores))
    counts = torch.bincount(exp, minlength=E)
    assert counts.max().item() <= C if exp.numel() else True
    assert tok.numel() + int(dropped) == T * K                       # every selected pair accounted for
    pairs = list(zip(tok.tolist(), exp.tolist()))
    assert len(set(pairs)) == len(pairs)                             # a token never uses an expert twice
    if policy == "reroute":
        # Drops happen only when no expert the token does not already use has room.
        per_token = torch.bincount(tok, minlength=T)
        for t in range(T):
            if per_token[t] < K:
                used = {e for tt, e in pairs if tt == t}
                assert all(counts[e] >= C for e in range(E) if e not in used)
    if C * E >= T * K and policy != "reroute" and C >= T:
        assert int(dropped) == 0


def test_rank_within_expert():
    e = torch.tensor([2, 0, 2, 2, 1, 0])
    assert rank_within_expert(e, 3).tolist() == [0, 0, 1, 2, 0, 1]


def test_capacity_for():
    assert capacity_for(1.0, 2, 64, 8) == 16
    assert capacity_for(1.25, 1, 10, 4) == math.ceil(1.25 * 10 / 4)
    assert capacity_for(0.01, 1, 10, 4) == 1
    with pytest.raises(ValueError):
        capacity_for(0, 1, 10, 4)
