"""The public contract of DESIGN.md: shapes, dtypes, errors, aux_loss, stats, the defining identity
and the equivalences (E=1, K=E dense, dropless = capacity with room, every backend = eager)."""
import pytest
import torch
from equivalence import assert_same_outputs_and_grads
from hypothesis import given, settings
from hypothesis import strategies as st

import moekit
from moekit import MoE

CORE_ROUTERS = ["topk", "noisy_topk", "switch", "sigmoid"]


def make(router="topk", **kw):
    kw.setdefault("d_model", 16)
    kw.setdefault("num_experts", 4)
    kw.setdefault("top_k", 1 if router == "switch" else 2)
    kw.setdefault("d_hidden", 12)
    m = MoE(router=router, **kw)
    if router == "noisy_topk":      # zero-initialised: give it something to route on
        torch.nn.init.normal_(m.router.weight, std=0.5)
    return m


def identity_rhs(moe, x):
    """Σ_{kept (t, e, w)} w · experts[e](x[t]) + shared(x[t]), by a plain loop."""
    x_TD = x.reshape(-1, x.shape[-1])
    r = moe.last_routing
    out = torch.zeros_like(x_TD)
    for t, e, w in zip(r.token_ids.tolist(), r.expert_ids.tolist(), r.weights.tolist()):
        out[t] += w * moe.experts[e](x_TD[t:t + 1])[0]
    if moe.shared_experts is not None:
        out += moe.shared_experts(x_TD)
    return out.reshape(x.shape)


@pytest.mark.parametrize("router", CORE_ROUTERS)
@pytest.mark.parametrize("cap,policy", [(None, "position"), (0.6, "position"), (0.6, "probability"),
                                        (0.6, "reroute")])
def test_defining_identity(router, cap, policy):
    moe = make(router, capacity_factor=cap, drop_policy=policy, num_shared_experts=1).eval()
    x = torch.randn(3, 7, 16)
    y = moe(x)
    torch.testing.assert_close(y, identity_rhs(moe, x), rtol=1e-5, atol=1e-5)
    assert moe.last_stats.tokens_per_expert.sum().item() == moe.last_routing.num_pairs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_shape_and_dtype_preserved(dtype):
    moe = make().to(dtype)
    for shape in [(5, 16), (2, 3, 16), (2, 2, 2, 16), (16,)]:
        x = torch.randn(*shape, dtype=dtype)
        y = moe(x)
        assert y.shape == x.shape and y.dtype == dtype
    # Router math in float32 for half and single precision (float64 stays float64).
    assert moe.last_routing.logits.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


def test_bad_inputs_raise_value_error_naming_values():
    moe = make()
    with pytest.raises(ValueError, match="d_model=16.*\\(3, 15\\)"):
        moe(torch.randn(3, 15))
    with pytest.raises(ValueError, match="float.*torch.int64"):
        moe(torch.ones(3, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="top_k must be <= num_experts=4, got top_k=5"):
        MoE(d_model=16, num_experts=4, top_k=5)
    with pytest.raises(ValueError, match="num_experts must be a positive int, got 0"):
        MoE(d_model=16, num_experts=0)
    with pytest.raises(ValueError, match="d_model must be a positive int"):
        MoE(d_model=0, num_experts=2)
    for cf in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="capacity_factor"):
            MoE(d_model=16, num_experts=4, capacity_factor=cf)
    with pytest.raises(ValueError, match="unknown router 'nope'"):
        MoE(d_model=16, num_experts=4, router="nope")
    with pytest.raises(ValueError, match="backend must be one of"):
        MoE(d_model=16, num_experts=4, backend="cuda-magic")
    with pytest.raises(ValueError, match="drop_policy"):
        MoE(d_model=16, num_experts=4, capacity_factor=1.0, drop_policy="random")
    with pytest.raises(ValueError, match="mask must have shape"):
        moe(torch.randn(2, 3, 16), mask=torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="expert must be"):
        MoE(d_model=16, num_experts=4, expert="transformer")
    with pytest.raises(ValueError, match="does not take"):
        MoE(d_model=16, num_experts=4, router_kwargs={"temperature": 2.0})
    with pytest.raises(TypeError):
        moe(torch.randn(2, 16), token_ids=torch.arange(2))    # top-k takes no token ids


def test_aux_loss_and_stats_after_forward():
    moe = make(aux_loss_coef=0.1, z_loss_coef=0.01)
    x = torch.randn(4, 8, 16)
    moe(x)
    r = moe.last_routing
    probs = r.probs
    counts = torch.bincount(r.topk_ids.reshape(-1), minlength=4)
    expect = 0.1 * moekit.losses.load_balancing_loss(probs, counts, 2) + 0.01 * moekit.losses.z_loss(r.logits)
    torch.testing.assert_close(moe.aux_loss, expect)
    assert moe.aux_loss.requires_grad and moe.aux_loss.dim() == 0
    moe.aux_loss.backward()
    assert moe.router.weight.grad.abs().sum() > 0
    s = moe.last_stats
    assert s.tokens_per_expert.shape == (4,) and not s.tokens_per_expert.requires_grad
    assert s["dropped"].item() == 0 and s.router_entropy.item() > 0
    assert s.experts_per_token.item() == pytest.approx(2.0)
    assert set(s.as_dict()) >= {"tokens_per_expert", "dropped", "router_entropy"}
    # Zero when nothing applies.
    quiet = make(aux_loss_coef=0.0)
    quiet(x)
    assert quiet.aux_loss.item() == 0.0


def test_moekit_aux_loss_sums_layers():
    a, b = make(), make(router="sigmoid")
    model = torch.nn.Sequential(a, torch.nn.Linear(16, 16), b)
    model(torch.randn(5, 16))
    torch.testing.assert_close(moekit.aux_loss(model), a.aux_loss + b.aux_loss)
    assert moekit.aux_loss(torch.nn.Linear(2, 2)).item() == 0.0


def test_router_returns_routing_format():
    moe = make()
    r = moe.router(torch.randn(9, 16))
    assert isinstance(r, moekit.Routing)
    N = r.token_ids.numel()
    assert r.expert_ids.shape == (N,) and r.weights.shape == (N,) and N == 18
    assert r.logits.shape == (9, 4) and r.logits.dtype == torch.float32
    assert int(r.dropped) == 0


@pytest.mark.parametrize("expert", ["swiglu", "mlp"])
def test_single_expert_equals_dense_ffn(expert):
    moe = MoE(d_model=16, num_experts=1, top_k=1, d_hidden=20, expert=expert).eval()
    x = torch.randn(11, 16)
    dense = moe.experts[0]
    torch.testing.assert_close(moe(x), dense(x), rtol=1e-5, atol=1e-6)
    assert torch.all(moe.last_routing.weights == 1.0)      # renorm gate is exactly 1


@pytest.mark.parametrize("norm", ["renorm", "raw"])
def test_k_equals_E_is_the_dense_softmax_mixture(norm):
    moe = MoE(d_model=16, num_experts=5, top_k=5, d_hidden=8, router_kwargs={"norm": norm}).eval()
    x = torch.randn(7, 16)
    p = torch.softmax(moe.router.logits(x), -1)
    dense = sum(p[:, e:e + 1] * moe.experts[e](x) for e in range(5))
    torch.testing.assert_close(moe(x), dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("router", CORE_ROUTERS)
def test_dropless_equals_capacity_with_room_for_all(router):
    a = make(router).eval()
    b = make(router, capacity_factor=100.0)
    b.load_state_dict(a.state_dict())
    b.eval()
    x = torch.randn(4, 6, 16)
    torch.testing.assert_close(a(x), b(x))
    assert int(b.last_stats.dropped) == 0


def test_drops_contribute_zero_and_are_counted():
    moe = make(capacity_factor=0.25, top_k=1).eval()
    x = torch.randn(40, 16)
    y = moe(x)
    r = moe.last_routing
    assert int(r.dropped) == 40 - r.num_pairs > 0
    fully_dropped = sorted(set(range(40)) - set(r.token_ids.tolist()))
    assert fully_dropped and torch.all(y[fully_dropped] == 0)
    assert moe.last_stats.drop_fraction.item() == pytest.approx(int(r.dropped) / 40)


def test_separate_train_and_eval_capacity():
    moe = make(capacity_factor=0.5, eval_capacity_factor=None)
    x = torch.randn(32, 16)
    moe.train()(x)
    assert int(moe.last_stats.dropped) > 0
    moe.eval()(x)
    assert int(moe.last_stats.dropped) == 0


@pytest.mark.parametrize("router", CORE_ROUTERS)
@pytest.mark.parametrize("shape", [(1, 16), (97, 16), (2, 33, 16)])
def test_backends_match_eager_outputs_and_grads(router, shape):
    ref = make(router, backend="eager").eval()
    fast = make(router, backend="grouped_mm").eval()
    fast.load_state_dict(ref.state_dict())
    assert_same_outputs_and_grads(ref, fast, torch.randn(*shape), rtol_y=1e-5)


def test_gradcheck_float64_whole_layer():
    moe = MoE(d_model=4, num_experts=3, top_k=2, d_hidden=4, backend="eager", num_shared_experts=1).double().eval()
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: moe(t), (x,))


def test_router_gets_gradient_from_task_loss():
    for router in CORE_ROUTERS:
        moe = make(router, aux_loss_coef=0.0)
        moe(torch.randn(8, 16)).square().sum().backward()
        assert moe.router.weight.grad.abs().sum() > 0, router


def test_mask_excludes_padding_from_routing_losses_and_stats():
    moe = make(aux_loss_coef=1.0, capacity_factor=1.0)
    x = torch.randn(2, 5, 16)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    y = moe(x, mask=mask)
    assert torch.all(y[~mask] == 0)
    assert moe.last_stats.num_tokens == 7 and moe.last_routing.num_pairs + int(moe.last_routing.dropped) == 14
    # Same as routing only the real tokens (capacity is computed from the 7 real tokens).
    ref = make(aux_loss_coef=1.0, capacity_factor=1.0)
    ref.load_state_dict(moe.state_dict())
    y_ref = ref(x[mask])
    torch.testing.assert_close(y[mask], y_ref)
    torch.testing.assert_close(moe.aux_loss, ref.aux_loss)


def test_experts_view_shares_weights():
    moe = make()
    view = moe.experts[2]
    assert len(list(view.parameters())) == 0               # no duplicated parameters
    assert len(moe.experts) == 4
    with torch.no_grad():
        moe.experts.down_proj[2].zero_()
    assert torch.all(view(torch.randn(3, 16)) == 0)
    with pytest.raises(IndexError):
        moe.experts[4]


def test_weight_layout_is_pinned_to_hf_v5():
    moe = MoE(d_model=16, num_experts=4, d_hidden=12, num_shared_experts=1, shared_expert_gate=True)
    sd = moe.state_dict()
    assert sd["router.weight"].shape == (4, 16)
    assert sd["experts.gate_up_proj"].shape == (4, 24, 16)
    assert sd["experts.down_proj"].shape == (4, 16, 12)
    mlp = MoE(d_model=16, num_experts=4, d_hidden=12, expert="mlp")
    assert mlp.state_dict()["experts.up_proj"].shape == (4, 12, 16)
    # gate rows first: the gate half goes through the activation.
    x = torch.randn(2, 16)
    gu = moe.experts.gate_up_proj[1]
    ref = (torch.nn.functional.silu(x @ gu[:12].T) * (x @ gu[12:].T)) @ moe.experts.down_proj[1].T
    torch.testing.assert_close(moe.experts[1](x), ref)


def test_shared_expert_gate():
    moe = make(num_shared_experts=2, shared_expert_gate=True).eval()
    x = torch.randn(6, 16)
    y = moe(x)
    torch.testing.assert_close(y, identity_rhs(moe, x), rtol=1e-5, atol=1e-5)
    assert moe.shared_experts.ffn.down_proj.weight.shape == (16, 24)    # 2 shared × d_hidden 12


def test_fine_grained_settings_run():
    moe = MoE(d_model=32, num_experts=256, top_k=16, d_hidden=8)
    x = torch.randn(64, 32)
    moe(x).sum().backward()
    assert moe.last_stats.tokens_per_expert.sum().item() == 64 * 16


def test_empty_input():
    moe = make()
    y = moe(torch.randn(0, 16))
    assert y.shape == (0, 16) and moe.aux_loss.item() == 0


@settings(max_examples=25, deadline=None)
@given(T=st.integers(1, 24), E=st.integers(1, 6), data=st.data())
def test_property_identity_and_capacity(T, E, data):
    K = data.draw(st.integers(1, E))
    cf = data.draw(st.sampled_from([None, 0.3, 1.0, 2.0]))
    policy = data.draw(st.sampled_from(["position", "probability", "reroute"]))
    router = data.draw(st.sampled_from(["topk", "sigmoid", "noisy_topk"]))
    moe = MoE(d_model=8, num_experts=E, top_k=K, d_hidden=4, router=router, capacity_factor=cf,
              drop_policy=policy).eval()
    x = torch.randn(T, 8)
    y = moe(x)
    torch.testing.assert_close(y, identity_rhs(moe, x), rtol=1e-5, atol=1e-5)
    r = moe.last_routing
    assert r.num_pairs + int(r.dropped) == T * K
    if cf is not None:
        C = moekit.routing.capacity_for(cf, K, T, E)
        assert moe.last_stats.tokens_per_expert.max().item() <= C


def test_top_k_defaults_to_the_routers_own():
    assert MoE(d_model=8, num_experts=4).top_k == 2
    assert MoE(d_model=8, num_experts=4, router="switch").top_k == 1
    assert MoE(d_model=8, num_experts=4, top_k=3).router.top_k == 3
    with pytest.raises(ValueError, match="top_k does not apply"):
        MoE(d_model=8, num_experts=4, router="top_p", top_k=2)
    with pytest.raises(ValueError, match="top_k does not apply"):
        MoE(d_model=8, num_experts=4, router="hash", top_k=2)
    MoE(d_model=8, num_experts=4, router="dense", top_k=4)           # its own count is fine
    r = moekit.routing.TopKRouter(8, 4, 3)
    with pytest.raises(ValueError, match="differs from the router instance"):
        MoE(d_model=8, num_experts=4, router=r, top_k=2)


def test_deepcopy_after_training_forward():
    import copy

    moe = make()
    moe(torch.randn(4, 16)).sum().backward()
    twin = copy.deepcopy(moe)
    x = torch.randn(3, 16)
    torch.testing.assert_close(twin.eval()(x), moe.eval()(x))
