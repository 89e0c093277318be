"""Hugging Face interop: tiny random models of each transformers v5 MoE family, built by
transformers itself (no downloads), converted to moekit layers, compared (logits, greedy
generation), saved and loaded back by transformers alone."""
import copy

import pytest
import torch

tf = pytest.importorskip("transformers")

import moekit  # noqa: E402
import moekit.hf  # noqa: E402
from moekit.recipes.hf_convert import converted_layers  # noqa: E402

V = 97
COMMON = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=64)


def make_config(family: str):
    if family == "mixtral":
        return tf.MixtralConfig(intermediate_size=24, num_key_value_heads=2, num_local_experts=4,
                                num_experts_per_tok=2, **COMMON)
    if family == "qwen2_moe":
        return tf.Qwen2MoeConfig(intermediate_size=40, moe_intermediate_size=24, shared_expert_intermediate_size=20,
                                 num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                                 decoder_sparse_step=1, mlp_only_layers=[1], **COMMON)
    if family == "qwen3_moe":
        return tf.Qwen3MoeConfig(intermediate_size=40, moe_intermediate_size=24, num_key_value_heads=2, head_dim=8,
                                 num_experts=6, num_experts_per_tok=2, norm_topk_prob=True, **COMMON)
    if family == "olmoe":
        return tf.OlmoeConfig(intermediate_size=24, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                              norm_topk_prob=False, **COMMON)
    if family == "deepseek_v3":
        return tf.DeepseekV3Config(intermediate_size=40, moe_intermediate_size=12, num_key_value_heads=4,
                                   n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2, n_group=4,
                                   topk_group=2, first_k_dense_replace=1, kv_lora_rank=8, q_lora_rank=12,
                                   qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, routed_scaling_factor=2.5,
                                   **{**COMMON, "num_hidden_layers": 3})
    raise ValueError(family)


FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3"]
EXPECTED_LAYERS = {"mixtral": 2, "qwen2_moe": 1, "qwen3_moe": 2, "olmoe": 2, "deepseek_v3": 2}


def make_model(family: str):
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(make_config(family)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            # Routers with larger weights than the default init: routing decisions then
            # depend clearly on the input, so a wrong mapping cannot hide behind near-ties.
            if name.endswith("mlp.gate.weight"):
                p.normal_(0, 0.5)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn_like(b) * 0.3)       # a correction bias that changes choices
    return model


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, V, (2, 13), generator=g)


@pytest.mark.parametrize("family", FAMILIES)
def test_convert_equal_logits(family, ids):
    ref_model = make_model(family)
    ref = logits(ref_model, ids)
    model = moekit.hf.from_pretrained(copy.deepcopy(ref_model))
    layers = converted_layers(model)
    assert len(layers) == EXPECTED_LAYERS[family]
    assert all(isinstance(m, moekit.MoE) for _, m in layers)
    assert not any(type(m).__name__ in moekit.hf.SUPPORTED_BLOCKS for m in model.modules())
    out = logits(model, ids)
    assert (out - ref).abs().max().item() < 1e-5
    # The expert weights are the transformers parameters themselves, not copies.
    name, moe = layers[0]
    assert moe.experts.gate_up_proj is model.get_submodule(name).experts.gate_up_proj


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_through_transformers(family, ids, tmp_path):
    ref_model = make_model(family)
    ref = logits(ref_model, ids)
    model = moekit.hf.from_pretrained(copy.deepcopy(ref_model))
    moekit.hf.save_pretrained(model, tmp_path)
    assert list(tmp_path.glob("*.safetensors")) and not list(tmp_path.glob("*.bin"))
    # The moekit layers are back in place after saving.
    assert len(converted_layers(model)) == EXPECTED_LAYERS[family]
    plain = tf.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(plain) is type(ref_model)
    assert (logits(plain, ids) - ref).abs().max().item() < 1e-5
    again = moekit.hf.from_pretrained(tmp_path).eval()
    assert (logits(again, ids) - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_greedy_generation_equal(family, ids):
    ref_model = make_model(family)
    model = moekit.hf.from_pretrained(copy.deepcopy(ref_model))
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        a = ref_model.generate(ids[:1, :5], **kw)
        b = model.generate(ids[:1, :5], **kw)
    assert torch.equal(a, b)


def test_correction_bias_matters(ids):
    """The DeepSeek-V3 correction bias changes the choice of experts: a conversion that
    dropped it would fail the logits test above."""
    model = make_model("deepseek_v3")
    ref = logits(model, ids)
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.zero_()
    assert (logits(model, ids) - ref).abs().max().item() > 1e-3


def test_qwen2_shared_gate_and_norm_modes():
    model = moekit.hf.from_pretrained(make_model("qwen2_moe"))
    (_, moe), = converted_layers(model)
    assert moe.shared_experts is not None and moe.shared_experts.gate is not None
    assert moe.router.norm == "raw"              # Qwen2-MoE default: norm_topk_prob=False
    (_, moe3), *_ = converted_layers(moekit.hf.from_pretrained(make_model("qwen3_moe")))
    assert moe3.router.norm == "renorm"


def test_training_through_converted_model(ids):
    model = moekit.hf.from_pretrained(make_model("mixtral")).train()
    out = model(ids, labels=ids, output_router_logits=True)
    # transformers still sees the router logits (its own balancing loss works) ...
    assert out.router_logits is not None and len(out.router_logits) == 2
    assert out.router_logits[0].shape == (ids.numel(), 4)
    # ... and moekit's losses are there too.
    loss = out.loss + moekit.aux_loss(model)
    loss.backward()
    (_, moe), *_ = converted_layers(model)
    assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0
    assert moe.experts.down_proj.grad.abs().sum() > 0


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="local folder"):
        moekit.hf.from_pretrained(tmp_path / "missing")
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match="safetensors"):
        moekit.hf.from_pretrained(tmp_path)
    dense = tf.AutoModelForCausalLM.from_config(tf.LlamaConfig(intermediate_size=24, num_key_value_heads=2,
                                                               **COMMON))
    with pytest.raises(ValueError, match="no transformers MoE block"):
        moekit.hf.from_pretrained(dense)
    with pytest.raises(TypeError):
        moekit.hf.from_pretrained(42)
    model = moekit.hf.from_pretrained(make_model("mixtral"))
    with pytest.raises(ValueError, match="safetensors"):
        moekit.hf.save_pretrained(model, tmp_path / "o", safe_serialization=False)
    from moekit.recipes.prune import prune_experts
    name, moe = converted_layers(model)[0]
    model.model.layers[0].mlp = prune_experts(moe, [0, 1, 2])
    with pytest.raises(ValueError, match="no transformers counterpart"):
        moekit.hf.save_pretrained(model, tmp_path / "o")
    cfg = make_config("mixtral")
    cfg.router_jitter_noise = 0.1
    with pytest.raises(ValueError, match="jitter"):
        moekit.hf.from_pretrained(tf.AutoModelForCausalLM.from_config(cfg))
