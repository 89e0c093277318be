"""Branch-Train-MiX (METHODS.md T7): experts are the branches' FFNs bit-exactly, everything else is
the branch mean, identical branches reproduce the seed, one-hot routing reproduces a branch."""
import copy

import pytest
import torch

import moekit
from moekit.recipes import average_models, btx
from moekit.routing.topk import TopKRouter

tf = pytest.importorskip("transformers")


def seed_llama():
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return tf.LlamaForCausalLM(cfg).eval()


def perturb(model, seed, only=None, scale=0.05):
    """A 'trained branch': every parameter (or only those whose name contains `only`) moved."""
    g = torch.Generator().manual_seed(seed)
    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in out.named_parameters():
            if only is None or only in name:
                p.add_(torch.randn(p.shape, generator=g) * scale)
    return out


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 50, (2, 10), generator=torch.Generator().manual_seed(5))


def test_experts_exact_and_rest_averaged():
    base = seed_llama()
    branches = [perturb(base, s) for s in (1, 2, 3)]
    merged = btx(base, branches, top_k=2)
    for li, layer in enumerate(merged.model.layers):
        moe = layer.mlp
        assert isinstance(moe, moekit.MoE) and moe.num_experts == 3 and moe.top_k == 2
        for i, b in enumerate(branches):
            mlp = b.model.layers[li].mlp
            gu = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
            assert torch.equal(moe.experts.gate_up_proj[i], gu)
            assert torch.equal(moe.experts.down_proj[i], mlp.down_proj.weight)
    sds = [b.state_dict() for b in branches]
    for k, v in merged.state_dict().items():
        if ".mlp." in k:
            continue
        mean = torch.stack([sd[k] for sd in sds]).double().mean(0).to(v.dtype)
        assert torch.allclose(v, mean, atol=1e-7, rtol=0), k
    # The seed is left alone.
    assert not any(isinstance(m, moekit.MoE) for m in base.modules())


def test_identical_branches_reproduce_seed(ids):
    base = seed_llama()
    merged = btx(base, [copy.deepcopy(base) for _ in range(3)], top_k=2).eval()
    assert (merged(ids).logits - base(ids).logits).abs().max().item() < 1e-5


@pytest.mark.parametrize("i", [0, 1, 2])
def test_one_hot_routing_reproduces_branch(i, ids):
    base = seed_llama()
    branches = [perturb(base, s, only="mlp", scale=0.2) for s in (1, 2, 3)]
    merged = btx(base, branches, top_k=1).eval()
    for moe in moekit.moe_layers(merged):
        r = TopKRouter(32, 3, 1, bias=True)
        with torch.no_grad():
            r.weight.zero_()
            r.bias.copy_(torch.nn.functional.one_hot(torch.tensor(i), 3).float() * 10)
        moe.router = r
    ref = branches[i](ids).logits
    assert (merged(ids).logits - ref).abs().max().item() < 1e-5
    other = branches[(i + 1) % 3](ids).logits
    assert (merged(ids).logits - other).abs().max().item() > 1e-3


def test_include_base_and_layers():
    base = seed_llama()
    branches = [perturb(base, s) for s in (1, 2)]
    merged = btx(base, branches, top_k=2, include_base=True, layers=[1])
    assert not isinstance(merged.model.layers[0].mlp, moekit.MoE)
    moe = merged.model.layers[1].mlp
    assert moe.num_experts == 3
    assert torch.equal(moe.experts.down_proj[0], base.model.layers[1].mlp.down_proj.weight)
    # The dense layer-0 FFN that stayed dense is averaged over base + branches.
    mean = torch.stack([m.model.layers[0].mlp.up_proj.weight for m in [base] + branches]).double().mean(0)
    assert torch.allclose(merged.model.layers[0].mlp.up_proj.weight, mean.float(), atol=1e-7)


def test_bert_branches(ids):
    torch.manual_seed(0)
    base = tf.BertModel(tf.BertConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=64)).eval()
    merged = btx(base, [copy.deepcopy(base), copy.deepcopy(base)], top_k=1).eval()
    assert (merged(ids).last_hidden_state - base(ids).last_hidden_state).abs().max().item() < 1e-5


def test_average_models():
    base = seed_llama()
    a, b = perturb(base, 1), perturb(base, 2)
    avg = average_models([a, b])
    w = avg.model.layers[0].mlp.up_proj.weight
    assert torch.allclose(w, (a.model.layers[0].mlp.up_proj.weight + b.model.layers[0].mlp.up_proj.weight) / 2,
                          atol=1e-7)


def test_errors():
    base = seed_llama()
    with pytest.raises(ValueError, match="at least 2"):
        btx(base, [base])
    with pytest.raises(ValueError, match="top_k"):
        btx(base, [base, base], top_k=3)
    other = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=40,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(ValueError, match="architecture"):
        btx(base, [base, other])
