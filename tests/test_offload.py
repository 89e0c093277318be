"""Inference with experts offloaded to host memory behind an LRU cache (METHODS.md S4).

Invariants: outputs identical with and without offloading (the eager backend's per-expert
matmuls on the same rows: equal up to the last-bit rounding of the activation, which CPU vector
code may apply differently to different row counts); the cache follows LRU exactly (checked
against a separate simulation); hit, miss and prefetch counters add up; state dicts, copies and
pickles behave like the resident model's.
"""
import copy
from collections import OrderedDict

import pytest
import torch

import moekit
from moekit.experts import GLUExperts, MLPExperts, ModuleExperts, OffloadedExperts
from moekit.layers import offload_experts, offload_stats, restore_experts
from moekit.models import TransformerConfig, TransformerLM

EPS = torch.finfo(torch.float32).eps


def assert_same(a, b):
    """Equal up to a few ulps of the output's scale (the activation's last-bit rounding)."""
    torch.testing.assert_close(a, b, rtol=0, atol=16 * EPS * max(1.0, b.abs().max().item()))


def _layer(expert="swiglu", E=6, K=2, D=16, F=8, **kw):
    torch.manual_seed(0)
    moe = moekit.MoE(d_model=D, num_experts=E, top_k=K, d_hidden=F, expert=expert, backend="eager", **kw)
    if expert == "mlp" and kw.get("experts") is None:
        bank = MLPExperts(E, D, F, bias=True)
        with torch.no_grad():
            bank.up_bias.normal_()
            bank.down_bias.normal_()
        moe = moekit.MoE(d_model=D, num_experts=E, top_k=K, experts=bank, backend="eager", **kw)
    return moe.eval()


@pytest.mark.parametrize("expert", ["swiglu", "mlp"])
@pytest.mark.parametrize("cache_size", [1, 2, 6])
@pytest.mark.parametrize("shape", [(1, 16), (3, 7, 16), (40, 16)])
def test_offloaded_layer_equals_eager(expert, cache_size, shape):
    moe = _layer(expert)
    ref = copy.deepcopy(moe)
    offload_experts(moe, cache_size=cache_size)
    torch.manual_seed(1)
    for _ in range(3):                                 # repeated calls: hits and evictions
        x = torch.randn(*shape)
        assert_same(moe(x), ref(x))
    s = moe.experts.cache_stats
    assert s.requests == s.hits + s.misses > 0
    assert s.bytes_copied == s.misses * moe.experts.bytes_per_expert


def test_offloaded_equals_default_backend_and_expert_views():
    torch.manual_seed(0)
    moe = moekit.MoE(d_model=32, num_experts=8, top_k=3, d_hidden=16, num_shared_experts=1).eval()   # backend auto
    ref = copy.deepcopy(moe)
    offload_experts(moe, cache_size=3)
    x = torch.randn(64, 32)
    torch.testing.assert_close(moe(x), ref(x), rtol=1e-5, atol=1e-6)
    for e in range(8):                                 # the defining identity's right-hand side
        assert_same(moe.experts[e](x[:5]), ref.experts[e](x[:5]))


def test_input_gradient_flows_and_expert_weights_are_frozen():
    moe = _layer()
    ref = copy.deepcopy(moe)
    offload_experts(moe, cache_size=2)
    x = torch.randn(20, 16, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    moe(x).square().sum().backward()
    ref(x2).square().sum().backward()
    assert_same(x.grad, x2.grad)
    assert not any(p.requires_grad for p in moe.experts.parameters())


def _simulate_lru(requests, S):
    """Independent model of the cache: hits refreshed in id order, then misses loaded in id
    order, each evicting the least recently used expert not needed by the same call."""
    cache, hits, misses = OrderedDict(), 0, 0
    for need in requests:
        need = sorted(set(need))
        for e in need:
            if e in cache:
                cache.move_to_end(e)
                hits += 1
        for e in need:
            if e not in cache:
                if len(cache) == S:
                    victim = next(v for v in cache if v not in need)
                    del cache[victim]
                cache[e] = True
                misses += 1
    return list(cache), hits, misses


@pytest.mark.parametrize("S", [2, 3, 5])
def test_cache_follows_lru_exactly(S):
    E = 7
    bank = OffloadedExperts(GLUExperts(E, 8, 4), device="cpu", cache_size=S)
    g = torch.Generator().manual_seed(S)
    requests = []
    for _ in range(30):
        k = int(torch.randint(1, S + 1, (), generator=g))
        need = torch.randperm(E, generator=g)[:k].tolist()
        requests.append(need)
        counts = torch.zeros(E, dtype=torch.long)
        counts[need] = torch.randint(1, 4, (len(need),), generator=g)
        bank(torch.randn(int(counts.sum()), 8), counts)
    order, hits, misses = _simulate_lru(requests, S)
    assert bank.cached_experts() == order
    assert (bank.cache_stats.hits, bank.cache_stats.misses) == (hits, misses)


def test_more_active_experts_than_slots_runs_in_waves():
    bank = GLUExperts(8, 8, 4)
    off = OffloadedExperts(copy.deepcopy(bank), device="cpu", cache_size=3)
    counts = torch.tensor([2, 0, 1, 3, 1, 1, 0, 2])
    x = torch.randn(int(counts.sum()), 8)
    assert_same(off(x, counts), bank(x, counts, backend="eager"))
    assert off.cache_stats.misses == 6 and len(off.cached_experts()) == 3
    empty = off(x[:0], torch.zeros(8, dtype=torch.long))
    assert empty.shape == (0, 8)


def test_prefetch_counts_hits_and_waste():
    off = OffloadedExperts(GLUExperts(6, 8, 4), device="cpu", cache_size=2)
    assert off.prefetch([4, 1, 4, 5]) == [4, 1]          # distinct, at most S, most wanted first
    assert off.cache_stats.prefetched == 2
    counts = torch.tensor([0, 0, 0, 0, 3, 0])
    off(torch.randn(3, 8), counts)                       # expert 4: a prefetch hit
    assert (off.cache_stats.hits, off.cache_stats.prefetch_hits) == (1, 1)
    off(torch.randn(2, 8), torch.tensor([2, 0, 0, 0, 0, 0]))    # loads 0, evicts 1 (prefetched, unread)
    assert off.cache_stats.prefetch_wasted == 1
    assert off.cache_stats.prefetch_precision == 0.5
    with pytest.raises(ValueError, match=r"expert ids must lie in \[0, 6\), got 6"):
        off.prefetch([6])


def _lm(**kw):
    torch.manual_seed(0)
    c = dict(vocab_size=40, d_model=32, n_layers=4, n_heads=4, max_seq_len=48, num_experts=8, top_k=2,
             backend="eager")
    c.update(kw)
    return TransformerLM(TransformerConfig.from_dict(c)).eval()


@pytest.mark.parametrize("prefetch", [False, True])
def test_model_generation_identical_with_offloading(prefetch):
    model = _lm()
    ref = copy.deepcopy(model)
    offload_experts(model, cache_size=3, prefetch=prefetch)
    x = torch.randint(0, 40, (2, 4))
    assert torch.equal(model.generate(x, 30, temperature=0), ref.generate(x, 30, temperature=0))
    stats = offload_stats(model)
    assert set(stats) == {f"blocks.{i}.ffn" for i in range(4)} | {"total"}
    t = stats["total"]
    assert t["requests"] == t["hits"] + t["misses"] > 0
    assert (t["prefetched"] > 0) == prefetch
    # Last layer has no next layer to prefetch for; the first layer is never prefetched into.
    assert stats["blocks.0.ffn"]["prefetched"] == 0
    assert t["prefetch_hits"] + t["prefetch_wasted"] <= t["prefetched"]


def test_restore_experts_round_trip():
    model = _lm()
    ref = copy.deepcopy(model)
    offload_experts(model, cache_size=2, prefetch=True)
    restore_experts(model)
    assert all(p.requires_grad for p in model.parameters())
    assert not any(getattr(b.ffn, "_offload_prefetch_hook", None) for b in model.blocks)
    x = torch.randint(0, 40, (2, 12))
    assert_same(model(x)[0], ref(x)[0])
    assert set(model.state_dict()) == set(ref.state_dict())


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"MoE layer '': cache_size must be an int in \[1, num_experts=6\], got 0"):
        offload_experts(_layer(), cache_size=0)
    with pytest.raises(ValueError, match="got 7"):
        offload_experts(_layer(), cache_size=7)
    with pytest.raises(TypeError, match=r"cache_size must be an int, got True \(bool\)"):
        OffloadedExperts(GLUExperts(4, 8, 4), device="cpu", cache_size=True)
    with pytest.raises(TypeError, match="prefetch must be a bool"):
        offload_experts(_layer(), cache_size=2, prefetch=1)
    with pytest.raises(ValueError, match="no moekit.MoE layer"):
        offload_experts(torch.nn.Linear(3, 3), cache_size=1)
    moe = _layer()
    offload_experts(moe, cache_size=2)
    with pytest.raises(ValueError, match="already offloaded"):
        offload_experts(moe, cache_size=2)
    bank = ModuleExperts([torch.nn.Linear(16, 16) for _ in range(4)], d_model=16)
    with pytest.raises(TypeError, match="ModuleExperts bank"):
        offload_experts(moekit.MoE(d_model=16, num_experts=4, experts=bank), cache_size=2)
    sf = moekit.MoE(d_model=16, num_experts=4, d_hidden=16, sync_free=True, backend="grouped_mm")
    with pytest.raises(ValueError, match="sync_free"):
        offload_experts(sf, cache_size=2)
    with pytest.raises(TypeError, match="wraps an MLP / GLU bank"):
        OffloadedExperts(bank, device="cpu", cache_size=1)
    with pytest.raises(RuntimeError, match="get no gradient"):
        off = OffloadedExperts(GLUExperts(4, 8, 4), device="cpu", cache_size=2)
        off.bank.requires_grad_(True)
        off(torch.randn(3, 8), torch.tensor([3, 0, 0, 0]))
    with pytest.raises(ValueError, match="has no offloaded MoE layer"):
        offload_stats(_layer())
    off = OffloadedExperts(GLUExperts(4, 8, 4), device="cpu", cache_size=2)
    with pytest.raises(ValueError, match="counts_E must have 4 entries summing to the 3 rows"):
        off(torch.randn(3, 8), torch.tensor([1, 1, 0, 0]))


def test_larger_shapes_equal_eager_within_rounding():
    torch.manual_seed(3)
    moe = moekit.MoE(d_model=100, num_experts=8, top_k=2, d_hidden=272, backend="eager").eval()
    ref = copy.deepcopy(moe)
    offload_experts(moe, cache_size=3)
    for T in (97, 1, 256):
        x = torch.randn(T, 100)
        assert_same(moe(x), ref(x))


def test_offloading_is_atomic_and_names_the_layer():
    torch.manual_seed(0)
    model = torch.nn.Sequential(moekit.MoE(d_model=8, num_experts=8, d_hidden=8),
                                moekit.MoE(d_model=8, num_experts=4, d_hidden=8))
    with pytest.raises(ValueError, match=r"MoE layer '1': cache_size must be an int in \[1, num_experts=4\], got 6"):
        offload_experts(model, cache_size=6)
    assert not any(isinstance(m.experts, OffloadedExperts) for m in model)
    offload_experts(model, cache_size=3)                 # a retry works


def test_state_dict_keys_and_loading_new_weights():
    model, other = _lm(), _lm()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.1 * torch.randn_like(p))
    keys = set(model.state_dict())
    offload_experts(model, cache_size=2, prefetch=True)
    assert set(model.state_dict()) == keys               # the resident layout: no "bank." level
    x = torch.randint(0, 40, (2, 10))
    model(x)                                             # fills the caches with the old weights
    model.load_state_dict(other.state_dict())            # a resident checkpoint into an offloaded model
    assert_same(model(x)[0], other(x)[0])
    assert all(b.ffn.experts.bank.gate_up_proj.device.type == "cpu" for b in model.blocks)
    off2 = offload_experts(_lm(), cache_size=2)
    off2.load_state_dict(model.state_dict(), assign=True)
    assert_same(off2(x)[0], other(x)[0])


def test_deepcopy_and_pickle_keep_prefetching_on_their_own_layers():
    import io

    model = offload_experts(_lm(), cache_size=2, prefetch=True)
    x = torch.randint(0, 40, (2, 10))
    model(x)
    twin = copy.deepcopy(model)
    twin(x)
    assert offload_stats(twin)["total"]["prefetched"] > 0
    for a, b in zip(model.blocks, twin.blocks):         # the copy's weights are its own parameters
        assert b.ffn.experts.bank.gate_up_proj is not a.ffn.experts.bank.gate_up_proj
    for i in range(3):                                   # and its hooks point at its own next layers
        assert twin.blocks[i].ffn.__dict__["_offload_next"] is twin.blocks[i + 1].ffn
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert_same(loaded(x)[0], model(x)[0])


def test_partial_restore_and_bad_masks_with_prefetch():
    torch.manual_seed(0)
    model = torch.nn.Sequential(*(moekit.MoE(d_model=8, num_experts=4, d_hidden=8) for _ in range(3))).eval()
    offload_experts(model, cache_size=2, prefetch=True)
    restore_experts(model[1])
    x = torch.randn(2, 5, 8)
    model(x)                                             # layer 0's hook finds a resident next layer: no prefetch
    with pytest.raises(ValueError, match=r"mask must have shape \(2, 5\)"):
        model[0](x, mask=torch.ones(8, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask must be torch.bool"):
        model[0](x, mask=torch.ones(2, 5))


def test_restore_keeps_frozen_experts_frozen():
    moe = _layer()
    moe.experts.down_proj.requires_grad_(False)
    offload_experts(moe, cache_size=2)
    restore_experts(moe)
    assert moe.experts.gate_up_proj.requires_grad and not moe.experts.down_proj.requires_grad


@pytest.mark.gpu
def test_offloaded_on_cuda_pinned_async_equals_eager():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = _lm().cuda()
    ref = copy.deepcopy(model)
    offload_experts(model, cache_size=2, prefetch=True)
    bank = model.blocks[0].ffn.experts
    assert bank.bank.gate_up_proj.is_pinned() and bank.bank.gate_up_proj.device.type == "cpu"
    x = torch.randint(0, 40, (4, 6), device="cuda")
    assert torch.equal(model.generate(x, 40, temperature=0), ref.generate(x, 40, temperature=0))
    assert offload_stats(model)["total"]["prefetched"] > 0
