"""MoEConfig: one frozen value for every argument of moekit.MoE, built with build(d_model), and the
TransformerLM that holds one (every router that suits a causal LM)."""
import dataclasses
import inspect

import pytest
import torch

import moekit
from moekit import MoE, MoEConfig
from moekit.models import TransformerConfig, TransformerLM, dense_twin, flops_per_token, param_counts
from moekit.routing import available, get_router_class

D, E, V = 16, 4, 23

# Router arguments some routers need to run at all (they have no usable default).
ROUTER_KW = {"task": {"num_tasks": 3}, "task_topk": {"num_tasks": 3}, "stable_moe": {"vocab_size": V}}


def _inputs(name, shape):
    if name in ("hash", "stable_moe", "multihash"):
        return {"token_ids": torch.randint(0, V, shape)}
    if name in ("task", "task_topk"):
        return {"task_ids": torch.randint(0, 3, shape)}
    return {}


# -- the config and the layer ------------------------------------------------------------------
def test_fields_are_the_layer_arguments_with_the_layer_defaults():
    params = inspect.signature(MoE.__init__).parameters
    fields = {f.name: f for f in dataclasses.fields(MoEConfig)}
    assert set(fields) == set(params) - {"self", "d_model", "experts", "pool"}
    for name, f in fields.items():
        if name == "router_kwargs":
            assert f.default == () and params[name].default is None
        elif name != "num_experts":
            assert f.default == params[name].default, name


@pytest.mark.parametrize("router", available())
def test_every_registered_router_builds_through_moeconfig(router):
    cfg = MoEConfig(num_experts=E, router=router, router_kwargs=ROUTER_KW.get(router, {}))
    meta = cfg.check(D)
    assert type(meta.router) is get_router_class(router)
    assert all(p.device.type == "meta" for p in meta.parameters())
    torch.manual_seed(0)
    moe = cfg.build(D)
    assert type(moe.router) is get_router_class(router) and moe.num_experts == E and moe.d_model == D
    x = torch.randn(2, 5, D, requires_grad=True)
    y = moe(x, **_inputs(router, (2, 5)))
    (y.square().mean() + moe.aux_loss).backward()
    assert y.shape == x.shape and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("kw", [
    dict(num_experts=E),
    dict(num_experts=E, top_k=1, router="switch", capacity_factor=1.0, drop_policy="probability"),
    dict(num_experts=E, router="top_p", router_kwargs={"p": 0.6}, num_shared_experts=1, shared_d_hidden=12,
         shared_expert_gate=True),
    dict(num_experts=E, router="expert_choice", capacity_factor=1.5, expert="mlp", activation="relu", d_hidden=20),
    dict(num_experts=E, router="sigmoid", top_k=2, router_kwargs={"bias_update_rate": 0.01}, z_loss_coef=1e-3,
         balance_loss="sequence", backend="eager"),
])
def test_build_equals_the_layer_with_the_same_arguments(kw):
    cfg = MoEConfig(**kw)
    torch.manual_seed(3)
    cfg.check(D)                        # checking draws nothing from the global generator
    a = cfg.build(D)
    torch.manual_seed(3)
    b = MoE(d_model=D, **kw)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert repr(a) == repr(b)
    x = torch.randn(3, 7, D)
    a.train(), b.train()
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    torch.testing.assert_close(a.aux_loss, b.aux_loss, rtol=0, atol=0)


@pytest.mark.parametrize("kw,exc,match", [
    (dict(num_experts=0), ValueError, "num_experts must be a positive int, got 0"),
    (dict(num_experts=True), TypeError, "num_experts must be a positive int"),
    (dict(num_experts=E, router="nope"), ValueError, r"router must be one of \(.*'topk'.*got 'nope'"),
    (dict(num_experts=E, router=moekit.routing.TopKRouter), TypeError, "router must be a registered router name"),
    (dict(num_experts=E, router_kwargs=[("p", 1)]), TypeError, "router_kwargs must be a dict"),
    (dict(num_experts=E, router_kwargs=(("p",),)), ValueError, "router_kwargs must be a dict or a tuple of"),
    (dict(num_experts=E, router_kwargs={"top_k": 2}), ValueError, "router_kwargs must not set 'top_k'.*field top_k"),
    (dict(num_experts=E, router_kwargs={"num_experts": 3}), ValueError, "must not set 'num_experts'"),
    (dict(num_experts=E, router_kwargs={"d_model": 8}), ValueError, "must not set 'd_model'.*build"),
    (dict(num_experts=E, router_kwargs={"capacity_factor": 2.0}), ValueError, "must not set 'capacity_factor'"),
])
def test_bad_fields_raise_when_the_config_is_made(kw, exc, match):
    with pytest.raises(exc, match=match):
        MoEConfig(**kw)


@pytest.mark.parametrize("kw,match", [
    (dict(top_k=5), "top_k must be <= num_experts=4, got top_k=5"),
    (dict(router="top_p", top_k=2), "top_k does not apply .*top_k=2"),
    (dict(router="expert_choice", capacity_factor=9.0), r"capacity_factor must be in \(0, num_experts=4\]"),
    (dict(router_kwargs={"nrom": "raw"}), r"does not take \['nrom'\]"),
    (dict(router="top_p", router_kwargs={"p": 1.5}), r"p must be a finite number in \(0.0, 1.0\], got 1.5"),
    (dict(aux_loss_coef=-1.0), "aux_loss_coef must be a finite number >= 0"),
    (dict(num_shared_experts=-1), "num_shared_experts"),
    (dict(backend="fast"), "backend"),
    (dict(balance_loss="mine"), "balance_loss must be"),
    (dict(drop_policy="oldest", capacity_factor=1.0), "drop_policy must be one of"),
    (dict(capacity_factor=-1.0), "capacity_factor must be a finite number > 0 or None, got -1.0"),
    (dict(expert="gelu_glu"), "expert must be"),
    (dict(shared_expert_gate=True), "shared_expert_gate=True needs num_shared_experts >= 1"),
    (dict(router="top_p", sync_free=True), "sync_free=True needs a router"),
])
def test_layer_checks_run_at_config_time(kw, match):
    cfg = MoEConfig(num_experts=E, **kw)            # needs d_model to be checked
    with pytest.raises(ValueError, match=match):
        cfg.check(D)
    with pytest.raises(ValueError, match=match):
        TransformerConfig(vocab_size=V, d_model=D, n_heads=2, moe=cfg)


def test_dict_roundtrip_hashable_and_unknown_keys_listed():
    cfg = MoEConfig(num_experts=E, router="top_p", router_kwargs={"p": 0.5, "max_experts": 2}, capacity_factor=None)
    assert cfg.router_kwargs == (("max_experts", 2), ("p", 0.5))
    assert cfg == MoEConfig(num_experts=E, router="top_p", router_kwargs=(("p", 0.5), ("max_experts", 2)))
    assert MoEConfig.from_dict(cfg.to_dict()) == cfg and hash(cfg) == hash(MoEConfig.from_dict(cfg.to_dict()))
    assert cfg.to_dict()["router_kwargs"] == {"max_experts": 2, "p": 0.5}
    with pytest.raises(ValueError, match=r"unknown MoEConfig keys \['topk'\]; valid: \['num_experts', 'top_k'"):
        MoEConfig.from_dict({"num_experts": 4, "topk": 2})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.top_k = 2


def test_exported_from_the_package_and_layers():
    assert moekit.MoEConfig is moekit.layers.MoEConfig is MoEConfig
    assert "MoEConfig" in moekit.__all__ and "MoEConfig" in moekit.layers.__all__


# -- TransformerLM with every router that suits a causal LM ----------------------------------
# Routers a causal LM refuses, and why; routers needing arguments get the ones that make them fit.
LM_REFUSED = {"task": "per-token inputs \\['task_ids'\\]", "task_topk": "per-token inputs \\['task_ids'\\]"}
LM_KW = {"expert_choice": {"causal": True}, "stable_moe": {"vocab_size": V}}
LM_ROUTERS = [r for r in available() if r not in LM_REFUSED]


def _lm_config(router, **moe):
    moe = MoEConfig(num_experts=E, router=router, router_kwargs=LM_KW.get(router, {}), **moe)
    return TransformerConfig(vocab_size=V, d_model=D, n_layers=2, n_heads=2, max_seq_len=20, moe=moe)


@pytest.mark.parametrize("router", LM_ROUTERS)
def test_transformer_lm_trains_and_stays_causal_with_every_suitable_router(router):
    torch.manual_seed(0)
    m = TransformerLM(_lm_config(router))
    assert all(type(b.ffn.router) is get_router_class(router) for b in m.moe_blocks)
    idx = torch.randint(0, V, (2, 12))
    _, loss = m(idx, idx)
    (loss + moekit.aux_loss(m)).backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in m.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads if g is not None)
    assert all(p.grad is not None for b in m.moe_blocks for p in b.ffn.experts.parameters())
    # In eval a token's logits depend on earlier tokens only, so KV-cache decoding is exact.
    m.eval()
    other = idx.clone()
    other[:, 7:] = (other[:, 7:] + 1) % V
    with torch.no_grad():
        torch.testing.assert_close(m(idx)[0][:, :7], m(other)[0][:, :7], rtol=1e-5, atol=1e-5)
    out = m.generate(idx[:, :3], 4, temperature=0, use_cache=True)
    assert out.shape == (2, 7) and torch.equal(out[:, :3], idx[:, :3])
    if router != "random":      # its eval draw is keyed by the row in the flattened batch, which the cache changes
        assert torch.equal(out, m.generate(idx[:, :3], 4, temperature=0, use_cache=False))
    counts = param_counts(m)
    assert counts["embedding"] < counts["active"] <= counts["total"]
    assert flops_per_token(m, 12)["train"] > 0


@pytest.mark.parametrize("router,match", list(LM_REFUSED.items()) + [
    ("expert_choice", r"causal_safe=False.*router_kwargs=\{'causal': True\}"),
])
def test_routers_unfit_for_a_causal_lm_are_refused_with_the_reason(router, match):
    moe = MoEConfig(num_experts=E, router=router, router_kwargs=ROUTER_KW.get(router, {}))
    with pytest.raises(ValueError, match=match):
        TransformerConfig(vocab_size=V, d_model=D, n_heads=2, moe=moe)


def test_a_router_vocabulary_must_cover_the_model():
    moe = MoEConfig(num_experts=E, router="stable_moe", router_kwargs={"vocab_size": 5})
    with pytest.raises(ValueError, match=rf"vocab_size=5; the model has vocab_size={V} .*'vocab_size': {V}"):
        TransformerConfig(vocab_size=V, d_model=D, n_heads=2, moe=moe)
    with pytest.raises(ValueError, match="needs vocab_size.*router_kwargs"):     # no default that cannot work
        TransformerConfig(vocab_size=V, d_model=D, n_heads=2, moe=MoEConfig(num_experts=E, router="stable_moe"))


def test_blocks_build_moe_config_with_the_dense_ffn_defaults():
    c = TransformerConfig(vocab_size=V, d_model=D, n_heads=2, ffn="mlp", ffn_hidden=40,
                          moe=MoEConfig(num_experts=E, top_k=2, num_shared_experts=1))
    assert c.block_moe == dataclasses.replace(c.moe, expert="mlp", d_hidden=40)
    torch.manual_seed(0)
    ffn = TransformerLM(c).blocks[0].ffn
    torch.manual_seed(0)
    ref = c.block_moe.build(D)
    assert repr(ffn) == repr(ref) and ffn.d_hidden == 40 and ffn.shared_experts is not None
    own = TransformerConfig(vocab_size=V, d_model=D, n_heads=2, ffn="mlp",
                            moe=MoEConfig(num_experts=E, expert="swiglu", d_hidden=24))
    assert own.block_moe.expert == "swiglu" and TransformerLM(own).blocks[0].ffn.d_hidden == 24
    with pytest.raises(ValueError, match="moe.expert='swiglu' differs from ffn='mlp'"):
        dense_twin(own)


def test_flat_keys_map_onto_moe_and_old_checkpoint_configs_load():
    # TransformerConfig.to_dict() as written before `moe` existed (flat MoE fields).
    old = {"vocab_size": V, "d_model": D, "n_layers": 2, "n_heads": 2, "max_seq_len": 20, "ffn": "swiglu",
           "ffn_hidden": None, "moe_layers": "every", "first_dense_layers": 0, "num_experts": 4, "top_k": 1,
           "expert_hidden": 24, "router": "switch", "router_kwargs": {"jitter": 0.0}, "num_shared_experts": 1,
           "shared_hidden": 8, "capacity_factor": 1.25, "aux_loss_coef": 0.01, "z_loss_coef": 0.001,
           "backend": "auto", "rope_theta": 10000.0, "tie_embeddings": True, "dropout": 0.0}
    c = TransformerConfig.from_dict(old)
    assert c.moe == MoEConfig(num_experts=4, top_k=1, d_hidden=24, router="switch", router_kwargs={"jitter": 0.0},
                              num_shared_experts=1, shared_d_hidden=8, capacity_factor=1.25, z_loss_coef=0.001)
    assert TransformerConfig.from_dict(c.to_dict()) == c and c.to_dict()["moe"]["d_hidden"] == 24
    assert TransformerConfig(vocab_size=V, d_model=D, n_heads=2, moe=c.moe.to_dict()).moe == c.moe
    with pytest.raises(ValueError, match=r"either as moe or as flat keys, not both.*\['top_k'\]"):
        TransformerConfig.from_dict({"vocab_size": V, "moe": {"num_experts": 4}, "top_k": 2})
    with pytest.raises(ValueError, match=r"unknown TransformerConfig keys \['topk'\].*flat MoE keys \[.*'top_k'"):
        TransformerConfig.from_dict({"vocab_size": V, "topk": 2})
    with pytest.raises(TypeError, match="moe must be a moekit.MoEConfig"):
        TransformerConfig(vocab_size=V, moe=4)


# -- routers that pick their own number of experts: twins and counts -------------------------
@pytest.mark.parametrize("router,moe_kw,k", [
    ("top_p", {}, 1),                                      # at least one expert: the twin's floor
    ("dense", {}, E),
    ("expert_choice", {}, 2),                              # causal fallback's eval K (default 2)
    ("relu", {"top_k": 3}, 3),                             # target K
    ("null_experts", {}, 2),                               # slots, an upper bound on real experts
    ("hash", {}, 1),
])
def test_dense_twin_of_self_choosing_routers_uses_the_nominal_count(router, moe_kw, k):
    c = _lm_config(router, d_hidden=12, **moe_kw)
    twin = dense_twin(c)
    assert twin.ffn_hidden == k * 12 and twin.moe_layers == "none"
    moe, dense = TransformerLM(c), TransformerLM(twin)
    router_params = sum(p.numel() for b in moe.moe_blocks for p in b.ffn.router.parameters())
    assert param_counts(moe)["active"] - router_params == param_counts(dense)["active"]


def test_measured_counts_come_from_the_last_forward():
    torch.manual_seed(0)
    m = TransformerLM(_lm_config("top_p", d_hidden=12))
    with pytest.raises(ValueError, match="measured=True needs a forward pass"):
        param_counts(m, measured=True)
    idx = torch.randint(0, V, (3, 16))
    m(idx)
    nominal, measured = param_counts(m), param_counts(m, measured=True)
    expect = nominal["total"]
    for b in m.moe_blocks:
        bank = sum(p.numel() for p in b.ffn.experts.parameters())
        expect -= bank - round(bank * float(b.ffn.last_stats.experts_per_token) / E)
    assert measured["active"] == expect >= nominal["active"]
    assert flops_per_token(m, 16, measured=True)["forward"] >= flops_per_token(m, 16)["forward"]
