"""Sparse upcycling (METHODS.md T6): the identity at initialisation for every supported dense FFN,
granular upcycling with virtual-group routers, noise, Drop-Upcycling re-initialisation, training."""
import copy

import pytest
import torch
from torch import nn

import moekit
from moekit.recipes import upcycle
from moekit.recipes.dense_ffn import find_dense_ffns

tf = pytest.importorskip("transformers")


def tiny_llama():
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return tf.LlamaForCausalLM(cfg).eval()


def tiny_bert():
    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=64)
    return tf.BertModel(cfg).eval()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 50, (2, 11), generator=torch.Generator().manual_seed(3))


def randomise_routers(model, scale=1.0, tie=1):
    """Give every router large random rows (rows tied in groups of `tie`)."""
    for moe in moekit.moe_layers(model):
        w = moe.router.weight
        E, D = w.shape
        with torch.no_grad():
            rows = torch.randn(E // tie, 1, D) * scale
            w.copy_(rows.expand(E // tie, tie, D).reshape(E, D))


@pytest.mark.parametrize("E,K,m", [(4, 2, 1), (4, 1, 1), (3, 3, 1), (2, 1, 4), (4, 2, 3), (2, 2, 2)])
def test_llama_identity_any_router(E, K, m, ids):
    dense = tiny_llama()
    ref = dense(ids).logits
    up = upcycle(copy.deepcopy(dense), E, K, granularity=m).eval()
    layers = moekit.moe_layers(up)
    assert len(layers) == 2 and layers[0].num_experts == E * m and layers[0].top_k == K * m
    assert (up(ids).logits - ref).abs().max().item() < 1e-5
    # Exact for any router of the right form (virtual groups of m tied rows when m > 1).
    randomise_routers(up, scale=3.0, tie=m)
    assert (up(ids).logits - ref).abs().max().item() < 1e-5
    # Routing really is sparse and input dependent: more than K·m experts are used overall.
    assert (layers[0].last_stats.tokens_per_expert > 0).sum() > K * m or E * m == K * m


def test_granular_needs_virtual_groups(ids):
    """Fine-grained experts are different slices: untied router rows pick slices unevenly and
    the identity fails — the tie is what makes it exact."""
    dense = tiny_llama()
    up = upcycle(copy.deepcopy(dense), 2, 1, granularity=4).eval()
    randomise_routers(up, scale=3.0, tie=1)
    assert (up(ids).logits - dense(ids).logits).abs().max().item() > 1e-3


def test_raw_weights_break_identity(ids):
    dense = tiny_llama()
    up = upcycle(copy.deepcopy(dense), 4, 2, router_kwargs={"norm": "raw"}).eval()
    assert (up(ids).logits - dense(ids).logits).abs().max().item() > 1e-4


@pytest.mark.parametrize("m", [1, 4])
def test_bert_identity(m, ids):
    dense = tiny_bert()
    ref = dense(ids).last_hidden_state
    up = upcycle(copy.deepcopy(dense), 4, 2, granularity=m).eval()
    assert isinstance(up.encoder.layer[0].intermediate, moekit.MoE)
    assert isinstance(up.encoder.layer[0].output.dense, nn.Identity)
    bank = up.encoder.layer[0].intermediate.experts
    assert isinstance(bank, moekit.MLPExperts) and bank.up_bias is not None
    randomise_routers(up, scale=3.0, tie=m)
    assert (up(ids).last_hidden_state - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("bias", [True, False])
def test_sequential_mlp_returns_moe(bias):
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(16, 40, bias=bias), nn.GELU(), nn.Linear(40, 16, bias=bias))
    x = torch.randn(3, 7, 16)
    moe = upcycle(seq, 4, 2).eval()
    assert isinstance(moe, moekit.MoE)
    assert isinstance(moe.experts, moekit.MLPExperts) and (moe.experts.up_bias is not None) == bias
    assert (moe(x) - seq(x)).abs().max().item() < 1e-6
    # Copies are bit-exact: each expert computes the dense FFN on its own.
    assert torch.equal(moe.experts[3](x), moe.experts[0](x))


def test_moekit_dense_transformer():
    from moekit.models.transformer import TransformerConfig, TransformerLM

    torch.manual_seed(0)
    lm = TransformerLM(TransformerConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=4, max_seq_len=32,
                                         moe_layers="none")).eval()
    idx = torch.randint(0, 40, (2, 12))
    ref, _ = lm(idx)
    up = upcycle(copy.deepcopy(lm), 4, 2, granularity=2).eval()
    out, _ = up(idx)
    assert (out - ref).abs().max().item() < 1e-5
    assert len(up.moe_blocks) == 2


def test_layer_selection():
    dense = tiny_llama()
    assert len(find_dense_ffns(dense)) == 2
    up = upcycle(copy.deepcopy(dense), 4, 2, every=2)
    assert [isinstance(l.mlp, moekit.MoE) for l in up.model.layers] == [False, True]
    up = upcycle(copy.deepcopy(dense), 4, 2, layers=[0])
    assert [isinstance(l.mlp, moekit.MoE) for l in up.model.layers] == [True, False]
    # Already-upcycled layers are not found again.
    assert len(find_dense_ffns(up)) == 1


def test_noise_scale():
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(16, 64, bias=False), nn.SiLU(), nn.Linear(64, 16, bias=False))
    moe = upcycle(seq, 4, 2, noise=0.05)
    w = moe.experts.up_proj.detach()
    diff = w - seq[0].weight.detach()
    rel = diff.std() / seq[0].weight.std()
    assert 0.03 < rel.item() < 0.07
    assert not torch.equal(w[0], w[1])            # experts differ from each other
    exact = upcycle(seq, 4, 2, noise=0.0)
    assert torch.equal(exact.experts.up_proj[2], seq[0].weight)


@pytest.mark.parametrize("kind", ["glu", "mlp"])
def test_drop_upcycling_reinit(kind):
    torch.manual_seed(0)
    if kind == "glu":
        dense = tiny_llama().model.layers[0].mlp
        F, w_in_ref = 48, torch.cat([dense.gate_proj.weight, dense.up_proj.weight]).detach()
        w_out_ref = dense.down_proj.weight.detach()
    else:
        dense = nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 32))
        F, w_in_ref, w_out_ref = 48, dense[0].weight.detach(), dense[2].weight.detach()
    moe = upcycle(dense, 4, 2, reinit_fraction=0.25)
    bank = moe.experts
    w_in = bank.gate_up_proj if kind == "glu" else bank.up_proj
    n = round(0.25 * F)
    picked = []
    for e in range(4):
        changed_cols = (bank.down_proj[e] != w_out_ref).any(0)             # (F,)
        assert changed_cols.sum().item() == n
        changed_rows = (w_in[e] != w_in_ref).any(1)
        # The same hidden units are re-drawn in every input projection (gate and up).
        expect = changed_cols.repeat(2) if kind == "glu" else changed_cols
        assert torch.equal(changed_rows, expect)
        picked.append(changed_cols)
    assert not all(torch.equal(picked[0], p) for p in picked[1:])          # independent per expert
    # Re-drawn values follow the dense matrix's statistics.
    redrawn = torch.cat([bank.down_proj[e][:, picked[e]].flatten() for e in range(4)])
    assert abs(redrawn.std().item() / w_out_ref.std().item() - 1) < 0.25


def test_training_diverges_experts_and_trains_router(ids):
    up = upcycle(tiny_llama(), 4, 2).train()
    opt = torch.optim.SGD(up.parameters(), lr=0.5)
    for step in range(2):
        opt.zero_grad()
        loss = up(ids, labels=ids).loss
        loss.backward()
        router_grad = moekit.moe_layers(up)[0].router.weight.grad
        if step == 1:
            # Step 0 moved the copies apart; now the task loss reaches the router.
            assert router_grad.abs().sum().item() > 0
        opt.step()
    w = moekit.moe_layers(up)[0].experts.gate_up_proj
    assert not torch.equal(w[0], w[1])


def test_errors():
    seq = nn.Sequential(nn.Linear(8, 30), nn.ReLU(), nn.Linear(30, 8))
    with pytest.raises(ValueError, match="top_k"):
        upcycle(seq, 2, 3)
    with pytest.raises(ValueError, match="granularity"):
        upcycle(seq, 2, 1, granularity=4)
    with pytest.raises(ValueError, match="reinit_fraction"):
        upcycle(seq, 2, 1, reinit_fraction=1.5)
    with pytest.raises(ValueError, match="no dense FFN"):
        upcycle(nn.Linear(3, 3), 2, 1)
    with pytest.raises(ValueError, match="layers"):
        upcycle(tiny_llama(), 2, 1, layers=[5])


def test_shared_experts_of_sparse_blocks_are_not_dense_ffns():
    cfg = tf.Qwen2MoeConfig(vocab_size=50, hidden_size=32, intermediate_size=40, moe_intermediate_size=24,
                            shared_expert_intermediate_size=20, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, mlp_only_layers=[1])
    model = tf.AutoModelForCausalLM.from_config(cfg)
    assert [s.name for s in find_dense_ffns(model)] == ["model.layers.1.mlp"]
