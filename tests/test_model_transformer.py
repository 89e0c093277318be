"""Decoder-only transformer LM with MoE feed-forward layers, and its dense twin."""
import dataclasses

import pytest
import torch

import moekit
from moekit.models import TransformerConfig, TransformerLM, dense_twin, flops_per_token, param_counts
from moekit.models.transformer import apply_rope, rope_tables

V = 37


def cfg(**kw):
    base = dict(vocab_size=V, d_model=32, n_layers=2, n_heads=2, max_seq_len=24, num_experts=4, top_k=1)
    base.update(kw)
    return TransformerConfig.from_dict(base)


def test_forward_shapes_and_loss():
    m = TransformerLM(cfg())
    x = torch.randint(0, V, (3, 17))
    logits, loss = m(x, x)
    assert logits.shape == (3, 17, V)
    assert loss.ndim == 0 and torch.isfinite(loss)
    # At init the model is close to uniform: CE near log V.
    assert abs(loss.item() - torch.log(torch.tensor(float(V))).item()) < 0.5
    assert moekit.aux_loss(m).item() > 0


def test_causal_future_tokens_do_not_change_past_logits():
    m = TransformerLM(cfg(top_k=2)).eval()
    x = torch.randint(0, V, (2, 20))
    y = x.clone()
    y[:, 12:] = torch.randint(0, V, (2, 8))
    a, _ = m(x)
    b, _ = m(y)
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_rope_scores_depend_only_on_relative_position():
    cos, sin = rope_tables(40, 8, 10000.0)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def score(m, n):
        qm = apply_rope(q, cos[m:m + 1], sin[m:m + 1])
        kn = apply_rope(k, cos[n:n + 1], sin[n:n + 1])
        return (qm * kn).sum()

    torch.testing.assert_close(score(3, 1), score(20, 18), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(score(3, 1), score(3, 2))


@pytest.mark.parametrize("placement,first_dense,expected", [
    ("every", 0, [0, 1, 2, 3]), ("every_other", 0, [1, 3]), ("every", 1, [1, 2, 3]),
    ("every_other", 1, [2]), ("none", 0, [])])
def test_moe_placement(placement, first_dense, expected):
    c = cfg(n_layers=4, moe_layers=placement, first_dense_layers=first_dense)
    m = TransformerLM(c)
    assert [i for i, b in enumerate(m.blocks) if b.is_moe] == expected == c.moe_layer_ids
    assert all(isinstance(m.blocks[i].ffn, moekit.MoE) for i in expected)


@pytest.mark.parametrize("kw", [dict(), dict(top_k=2, expert_hidden=32), dict(num_shared_experts=1, expert_hidden=48,
                                                                                shared_hidden=16, ffn_hidden=64),
                                dict(moe_layers="every_other", router="switch")])
def test_dense_twin_has_equal_active_params(kw):
    c = cfg(n_layers=4, **kw)
    moe, twin = TransformerLM(c), TransformerLM(dense_twin(c))
    router = sum(p.numel() for b in moe.moe_blocks for p in b.ffn.router.parameters())
    assert param_counts(moe)["active"] - router == param_counts(twin)["active"] == param_counts(twin)["total"]
    assert param_counts(moe)["total"] > param_counts(twin)["total"]
    # Training FLOPs differ only by the router's 2·D·E per MoE layer (×3 for training).
    df = flops_per_token(moe, 24)["train"] - flops_per_token(twin, 24)["train"]
    assert df == 6 * router


def test_dense_twin_refuses_mismatched_leading_dense_layers():
    c = cfg(n_layers=3, first_dense_layers=1, top_k=2, expert_hidden=16, ffn_hidden=64)
    with pytest.raises(ValueError, match="one FFN size"):
        dense_twin(c)


def test_one_expert_moe_equals_dense_model_with_the_same_weights():
    c = cfg(num_experts=1, top_k=1, ffn_hidden=48)
    moe = TransformerLM(c).eval()
    dense = TransformerLM(dense_twin(c)).eval()
    sd = dense.state_dict()
    msd = moe.state_dict()
    for k in sd:
        if ".ffn." in k:
            i = k.split(".")[1]
            name = "gate_up_proj" if "gate_up_proj" in k else "down_proj"
            sd[k] = msd[f"blocks.{i}.ffn.experts.{name}"][0]
        else:
            sd[k] = msd[k]
    dense.load_state_dict(sd)
    x = torch.randint(0, V, (2, 15))
    torch.testing.assert_close(moe(x)[0], dense(x)[0], rtol=1e-5, atol=1e-5)


def test_config_errors_name_valid_choices():
    with pytest.raises(ValueError, match="moe_layers must be one of"):
        cfg(moe_layers="sometimes")
    with pytest.raises(ValueError, match="router must be one of .*topk"):
        cfg(router="nope")
    with pytest.raises(ValueError, match="heads"):
        cfg(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="top_k"):
        cfg(top_k=5)
    with pytest.raises(ValueError, match="unknown TransformerConfig keys"):
        TransformerConfig.from_dict({"vocab_size": 5, "d_modle": 3})
    with pytest.raises(ValueError, match="max_seq_len"):
        TransformerLM(cfg())(torch.zeros(1, 30, dtype=torch.long))


def test_config_roundtrip_and_router_kwargs():
    c = cfg(router="sigmoid", router_kwargs={"bias_update_rate": 0.01}, top_k=2)
    assert TransformerConfig.from_dict(c.to_dict()) == c
    m = TransformerLM(c)
    assert m.blocks[0].ffn.router.bias_update_rate == 0.01


def test_generate_greedy_is_deterministic_and_extends():
    m = TransformerLM(cfg()).eval()
    x = torch.randint(0, V, (1, 5))
    a = m.generate(x, 30, temperature=0)
    b = m.generate(x, 30, temperature=0)
    assert a.shape == (1, 35) and torch.equal(a, b) and torch.equal(a[:, :5], x)


def test_tied_embeddings_share_storage():
    m = TransformerLM(cfg())
    assert m.lm_head.weight is m.embed.weight
    assert not dataclasses.replace(cfg(), tie_embeddings=False).tie_embeddings


# -- incremental decoding with a KV cache -----------------------------------------------------
def test_kv_cache_chunks_equal_full_forward():
    """Positions fed in chunks of 5, 1 and 14 through a KVCache give the full pass's logits."""
    from moekit.models import KVCache

    torch.manual_seed(0)
    m = TransformerLM(cfg(top_k=2, n_layers=3)).eval()
    x = torch.randint(0, V, (2, 20))
    full, _ = m(x)
    cache = KVCache(3)
    parts = [m(x[:, a:b], kv_cache=cache)[0] for a, b in ((0, 5), (5, 6), (6, 20))]
    assert cache.length == 20
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)


def test_kv_cache_refuses_overflow_and_wrong_depth():
    from moekit.models import KVCache

    m = TransformerLM(cfg()).eval()
    cache = KVCache(2)
    m(torch.randint(0, V, (1, 20)), kv_cache=cache)
    with pytest.raises(ValueError, match="exceeds max_seq_len=24"):
        m(torch.randint(0, V, (1, 5)), kv_cache=cache)
    with pytest.raises(ValueError, match="kv_cache has 3 layers, the model 2"):
        m(torch.randint(0, V, (1, 5)), kv_cache=KVCache(3))


@pytest.mark.parametrize("prompt_len,new", [(1, 10), (6, 40)])      # 6 + 40 crosses max_seq_len=24
def test_generate_with_cache_equals_without(prompt_len, new):
    torch.manual_seed(1)
    m = TransformerLM(cfg(top_k=2)).eval()
    x = torch.randint(0, V, (3, prompt_len))
    a = m.generate(x, new, temperature=0, use_cache=True)
    b = m.generate(x, new, temperature=0, use_cache=False)
    assert torch.equal(a, b)
    g1, g2 = (torch.Generator().manual_seed(5) for _ in range(2))
    assert torch.equal(m.generate(x, new, temperature=1.0, generator=g1),
                       m.generate(x, new, temperature=1.0, generator=g2, use_cache=False))


def test_kv_cache_refuses_another_batch_size():
    from moekit.models import KVCache

    m = TransformerLM(cfg()).eval()
    cache = KVCache(2)
    m(torch.randint(0, V, (2, 5)), kv_cache=cache)
    with pytest.raises(ValueError, match="kv_cache holds a batch of 2 sequences, got 3"):
        m(torch.randint(0, V, (3, 1)), kv_cache=cache)


def test_generate_skips_the_cache_when_routing_depends_on_other_tokens():
    """With an eval capacity limit a token's routing depends on the whole batch of tokens, so
    routing only the new tokens would change the model: the default recomputes."""
    torch.manual_seed(2)
    m = TransformerLM(cfg(top_k=2, capacity_factor=1.0)).eval()
    x = torch.randint(0, V, (2, 6))
    default = m.generate(x, 12, temperature=0)
    assert torch.equal(default, m.generate(x, 12, temperature=0, use_cache=False))
    assert not torch.equal(default, m.generate(x, 12, temperature=0, use_cache=True))   # what it avoids
