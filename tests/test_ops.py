"""Ops against their references: grouped matmul (every backend), permute/unpermute, top-k."""
from types import SimpleNamespace

import pytest
import torch

from moekit.ops import available_backends, grouped_mm_reference, permute, resolve_backend, topk_stable, unpermute
from moekit.ops.grouped_mm import fast_supported, grouped_mm_autograd_with_reference, grouped_mm_fast
from moekit.ops.topk import topk_stable_reference

CPU_BACKENDS = [b for b in available_backends() if b in ("eager", "grouped_mm")]


def _counts(E, N, empty=(), gen=None):
    c = torch.zeros(E, dtype=torch.long)
    live = [e for e in range(E) if e not in empty]
    idx = torch.randint(0, len(live), (N,), generator=gen)
    for i in idx.tolist():
        c[live[i]] += 1
    return c


@pytest.mark.parametrize("N,I,O,E,empty", [(97, 8, 12, 5, (1, 3)), (1, 4, 4, 3, (0, 2)), (64, 100, 36, 8, ()),
                                           (33, 16, 16, 1, ())])
@pytest.mark.parametrize("transposed", [False, True])
def test_grouped_mm_fast_matches_reference(N, I, O, E, empty, transposed):
    counts = _counts(E, N, empty)
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    x = torch.randn(N, I, requires_grad=True)
    w_base = torch.randn(E, O, I) if transposed else torch.randn(E, I, O)
    w_base.requires_grad_(True)
    w = w_base.transpose(1, 2) if transposed else w_base
    assert fast_supported(x, w)
    y_ref = grouped_mm_reference(x, w, offs)
    gy = torch.randn_like(y_ref)
    gx_ref, gw_ref = torch.autograd.grad(y_ref, (x, w_base), gy)
    y = grouped_mm_fast(x, w, offs)
    gx, gw = torch.autograd.grad(y, (x, w_base), gy)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-5, atol=1e-5)
    # Experts with no rows get exactly zero weight gradient.
    for e in empty:
        assert torch.all(gw[e] == 0)


def test_grouped_mm_backward_formula_gradcheck_float64():
    # The fast path's autograd function over the float64 reference primitive: checks the
    # hand-written backward (dx = gy wᵀ, dw_e = x_eᵀ gy_e) against finite differences.
    counts = torch.tensor([2, 0, 3, 1])
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: grouped_mm_autograd_with_reference(a, b, offs), (x, w))


def test_grouped_mm_fast_refuses_unsupported_with_clear_error():
    x, w = torch.randn(4, 5), torch.randn(2, 5, 3)
    offs = torch.tensor([2, 4], dtype=torch.int32)
    with pytest.raises(ValueError, match="multiples of 4"):
        grouped_mm_fast(x, w, offs)
    with pytest.raises(ValueError, match="cannot run"):
        resolve_backend("grouped_mm", x.double(), w.double())
    assert resolve_backend("auto", x, w).name == "eager"
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("nope", x, w)


def test_permute_unpermute_roundtrip_and_weights():
    T, D, E = 13, 6, 4
    x = torch.randn(T, D)
    token_ids = torch.tensor([0, 0, 1, 2, 3, 3, 5, 7, 7, 12])
    expert_ids = torch.tensor([1, 3, 1, 0, 2, 0, 3, 1, 0, 2])
    weights = torch.rand(10)
    x_ND, counts, order = permute(x, token_ids, expert_ids, E)
    assert counts.tolist() == [3, 3, 2, 2]
    assert torch.equal(expert_ids[order], torch.sort(expert_ids, stable=True).values)
    torch.testing.assert_close(x_ND, x[token_ids[order]])
    y = unpermute(x_ND, token_ids[order], weights[order], T)
    ref = torch.zeros(T, D)
    for t, w in zip(token_ids.tolist(), weights.tolist()):
        ref[t] += w * x[t]
    torch.testing.assert_close(y, ref)


def test_unpermute_accumulates_half_precision_in_float32():
    y = torch.full((1000, 4), 0.001, dtype=torch.bfloat16)
    out = unpermute(y, torch.zeros(1000, dtype=torch.long), torch.ones(1000), 1)
    assert out.dtype == torch.bfloat16
    assert abs(out.float()[0, 0].item() - 1.0) < 0.01     # a bf16 running sum would stall near 0.25


def test_topk_stable_breaks_ties_to_lowest_index():
    s = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0], [2.0, 2.0, 2.0, 2.0, 2.0]])
    v, i = topk_stable(s, 2)
    assert i.tolist() == [[1, 2], [0, 1]]
    v, i = topk_stable(s, 1)
    assert i.tolist() == [[1], [0]]
    with pytest.raises(ValueError):
        topk_stable(s, 6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_topk_stable_equals_stable_sort(dtype):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(300, 37, generator=g)
    # Awkward values: many ties (rounded scores), ±0, ±inf, tiny and huge magnitudes.
    s[:100] = (s[:100] * 2).round() / 2
    s[100, :] = 0.0
    s[101, ::2] = -0.0
    s[102, [1, 5]] = float("inf")
    s[103, [0, 7]] = float("-inf")
    s[104] = s[104] * 1e-40                        # subnormal in float32
    s[105] = s[105] * 1e30
    s[3, [4, 9, 20]] = 10.0                        # a tie at the top, lowest index first
    s[106, [2, 30]] = float("nan")                 # NaN ranks above +inf, either sign
    s[107, 5] = -float("nan")
    s[107, 6] = float("inf")
    s = s.to(dtype)
    for k in (1, 2, 5, 36, 37):
        v, i = topk_stable(s, k)
        vr, ir = topk_stable_reference(s, k)
        assert torch.equal(i, ir), k
        torch.testing.assert_close(v, vr, rtol=0, atol=0, equal_nan=True)
        assert v.dtype == dtype
    assert topk_stable(s, 2)[1][3].tolist() == [4, 9]




def _uniform_routing(T, E, K, dtype, gen):
    """Token-major dropless routing with K distinct experts per token (as top-k routers give)."""
    ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)]).reshape(-1)
    w = torch.rand(T * K, generator=gen, dtype=torch.float64).to(dtype)
    return SimpleNamespace(expert_ids=ids, token_ids=torch.arange(T).repeat_interleave(K), weights=w,
                           num_experts=E, slots_per_token=K)


@pytest.mark.parametrize("T,E,K,D", [(1, 1, 1, 3), (1, 8, 8, 5), (37, 8, 2, 16), (64, 64, 8, 7), (5, 3, 3, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_uniform_dispatch_combine_equals_general_reference(T, E, K, D, dtype):
    """The uniform path (gathers by a permutation; on the CPU `embedding_bag` for the slot sums)
    against `permute` / `unpermute` with autograd: output, input gradient, routing-weight gradient."""
    from moekit.ops.dispatch import LocalDispatcher
    gen = torch.Generator().manual_seed(T * 100 + E * 10 + K)
    routing = _uniform_routing(T, E, K, dtype, gen)
    x = torch.randn(T, D, generator=gen, dtype=torch.float64).to(dtype)
    dy = torch.randn(T, D, generator=gen, dtype=torch.float64).to(dtype)
    scale = torch.randn(E, 1, generator=gen, dtype=torch.float64).to(dtype)       # a per-expert "expert"

    def run(fast):
        xg = x.clone().requires_grad_(True)
        w = routing.weights.clone().requires_grad_(True)
        r = SimpleNamespace(**{**vars(routing), "weights": w})
        if fast:
            d = LocalDispatcher()
            x_ND, counts, meta = d.dispatch(xg, r)
            y = d.combine(x_ND * scale.repeat_interleave(counts, 0), meta)
        else:
            x_ND, counts, order = permute(xg, r.token_ids, r.expert_ids, E)
            y = unpermute(x_ND * scale.repeat_interleave(counts, 0), r.token_ids[order], w[order], T)
        y.backward(dy)
        return y, xg.grad, w.grad

    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else {}
    for a, b in zip(run(True), run(False)):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("with_order", [True, False])
@pytest.mark.parametrize("chunked", [False, True])
def test_weighted_slot_sum_matches_its_reference_in_float64(with_order, chunked, monkeypatch):
    """`_sum_slots` (the CPU embedding-bag path and its gather backward, whole or in row blocks
    with a ragged last block) against the gather + sum reference, values and gradients;
    gradcheck of the fast path."""
    from moekit.ops import dispatch
    from moekit.ops.dispatch import _sum_slots, _sum_slots_reference
    if chunked:
        monkeypatch.setattr(dispatch, "_CHUNKED_MIN_ELEMENTS", 0)
        monkeypatch.setattr(dispatch, "_CHUNK_ROWS", 4)
    gen = torch.Generator().manual_seed(3)
    T, K, D = 7, 3, 5
    inverse = torch.randperm(T * K, generator=gen)
    order = torch.empty_like(inverse)
    order[inverse] = torch.arange(T * K)
    y = torch.randn(T * K, D, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.rand(T, K, generator=gen, dtype=torch.float64, requires_grad=True)
    fast = _sum_slots(y, inverse, T, K, w, order if with_order else None)
    ref = _sum_slots_reference(y, inverse, T, K, w)
    g = torch.randn(T, D, generator=gen, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(fast, (y, w), g), torch.autograd.grad(ref, (y, w), g)):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(fast, ref)
    assert torch.autograd.gradcheck(lambda y_, w_: _sum_slots(y_, inverse, T, K, w_, order), (y, w))


@pytest.mark.parametrize("N,E,empty", [(1, 8, ()), (8, 128, ()), (5, 16, (0, 3, 15)), (0, 4, ()), (3, 4, (1,))])
def test_few_rows_path_equals_torch_grouped_mm(N, E, empty):
    """Fewer rows than experts on the CPU (decoding) takes a loop over the non-empty experts; it
    equals ``torch._grouped_mm`` bit for bit on the rows the offsets cover."""
    from moekit.ops.grouped_mm import _grouped_mm_eager, _grouped_mm_few_rows, has_torch_grouped_mm
    if not has_torch_grouped_mm():
        pytest.skip("torch._grouped_mm not available")
    gen = torch.Generator().manual_seed(N * 7 + E)
    counts = _counts(E, N, empty, gen)
    offs = torch.cumsum(counts, 0).to(torch.int32)
    x, w = torch.randn(N, 16, generator=gen), torch.randn(E, 16, 8, generator=gen)
    fast = _grouped_mm_few_rows(x, w, offs)
    assert torch.equal(fast, _grouped_mm_eager(x, w, offs))          # the dispatch takes it
    if N:
        assert torch.equal(fast, torch._grouped_mm(x, w, offs=offs))
    # Static layout: rows past the last offset come back as zeros.
    short = torch.clamp(offs, max=max(N - 1, 0))
    y = _grouped_mm_few_rows(x, w, short)
    assert torch.equal(y[int(short[-1]):], torch.zeros_like(y[int(short[-1]):]))


@pytest.mark.parametrize("N,E,empty,transposed", [(1, 8, (), True), (40, 8, (2,), True), (97, 16, (0, 15), True),
                                                  (64, 8, (), False), (0, 4, (), True), (30, 4, (1, 2), True)])
def test_small_groups_inference_path_equals_reference(N, E, empty, transposed):
    """Inference with at most 8 rows per expert on average runs a per-expert loop (MKL for 1-3
    rows, oneDNN from 4 rows when the weight is a transposed (E, O, I) parameter): equal to the
    reference loop within fp32 rounding, rows past the last offset zero, and taken by
    `grouped_mm_fast` in inference only (training keeps ``torch._grouped_mm``)."""
    from moekit.ops import grouped_mm as G
    if not G.has_torch_grouped_mm():
        pytest.skip("torch._grouped_mm not available")
    gen = torch.Generator().manual_seed(N * 5 + E)
    counts = _counts(E, N, empty, gen)
    offs = torch.cumsum(counts, 0).to(torch.int32)
    x = torch.randn(N, 24, generator=gen)
    w_param = torch.randn(E, 20, 24, generator=gen)              # (E, O, I), nn.Linear layout
    w = w_param.transpose(1, 2) if transposed else w_param.transpose(1, 2).contiguous()
    ref = grouped_mm_reference(x, w, offs)
    fast = G._grouped_mm_small_groups(x, w, offs)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    short = torch.clamp(offs, max=max(N - 3, 0))                 # static layout: a zero tail
    y = G._grouped_mm_small_groups(x, w, short)
    assert torch.equal(y[int(short[-1]):], torch.zeros_like(y[int(short[-1]):]))
    torch.testing.assert_close(y[:int(short[-1])], grouped_mm_reference(x, w, short)[:int(short[-1])],
                               rtol=1e-5, atol=1e-5)
    calls = []
    orig = G._grouped_mm_small_groups
    try:
        G._grouped_mm_small_groups = lambda *a: calls.append(1) or orig(*a)
        with torch.inference_mode():
            torch.testing.assert_close(G.grouped_mm_fast(x, w, offs), ref, rtol=1e-5, atol=1e-5)
        xg = x.clone().requires_grad_(True)
        G.grouped_mm_fast(xg, w, offs).sum().backward()
    finally:
        G._grouped_mm_small_groups = orig
    assert len(calls) == 1                                       # inference only


@pytest.mark.parametrize("T,E,K", [(1, 2, 2), (97, 8, 2), (300, 64, 8), (5, 128, 8), (33, 7, 7), (40, 16, 1)])
@pytest.mark.parametrize("nan", [False, True])
def test_topk_stable_nonnegative_equals_the_sort_rule(T, E, K, nan):
    """The CPU row-max rounds for scores ≥ 0 give exactly `topk_stable_reference` (stable
    descending sort): heavy ties go to the lower index, NaN ranks first, non-contiguous rows."""
    from moekit.ops.topk import topk_stable_nonnegative
    gen = torch.Generator().manual_seed(T * E + K)
    s = torch.randint(0, 4, (T, 2 * E), generator=gen).float() / 4
    if nan:
        s[torch.rand(T, 2 * E, generator=gen) < 0.1] = float("nan")
    for scores in (s[:, :E].contiguous(), s[:, ::2]):
        v, i = topk_stable_nonnegative(scores, K)
        rv, ri = topk_stable_reference(scores, K)
        assert torch.equal(i, ri)
        torch.testing.assert_close(v, rv, equal_nan=True)
        assert torch.equal(topk_stable(scores, K)[1], ri)


def test_softmax_experts_matches_torch_softmax():
    """The gate's CPU softmax for short expert rows (transposed) equals ``torch.softmax`` within
    rounding, values and gradients, contiguous output."""
    from moekit.ops.gate import _softmax_experts
    for E in (2, 8, 15, 16, 64):
        x = torch.randn(37, E, requires_grad=True)
        g = torch.randn(37, E)
        y = _softmax_experts(x)
        assert y.is_contiguous()
        torch.testing.assert_close(y, torch.softmax(x, -1))
        torch.testing.assert_close(torch.autograd.grad(y, x, g)[0],
                                   torch.autograd.grad(torch.softmax(x, -1), x, g)[0])
