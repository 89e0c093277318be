"""Every setting is checked, odd values included (trust issue, classes 3, 5 and 7).

For each public constructor: each numeric argument is fed NaN, ±inf, 0, negatives, bools and
wrong types, and must raise ValueError / TypeError whose message names the argument. Layers
follow their own dtype end to end and refuse a device they are not on; every registered router
either works with its defaults or says which router_kwargs it needs.
"""
from __future__ import annotations

import math

import pytest
import torch

import moekit
from moekit import MoE
from moekit.layers import SoftMoE

NAN, INF = float("nan"), float("inf")
INT_BAD = [0, -1, True, False, 2.0, "4", None, NAN]
POS_INT_BAD = [0, -3, True, 1.5, "2", NAN, INF]
NONNEG_NUM_BAD = [NAN, INF, -INF, -0.5, True, "0.1", None]


def _ctor_cases():
    base = dict(d_model=8, num_experts=4, top_k=2)
    cases = []
    for arg in ("d_model", "num_experts", "top_k"):
        for v in POS_INT_BAD:
            cases.append((MoE, base, arg, v))
    for arg in ("aux_loss_coef", "z_loss_coef"):
        for v in NONNEG_NUM_BAD:
            cases.append((MoE, base, arg, v))
    for v in [0, -1, True, 3.0, "8", NAN]:
        cases.append((MoE, {**base, "num_shared_experts": 1}, "shared_d_hidden", v))
        cases.append((MoE, base, "d_hidden", v))
    for v in [-1, True, 1.0, NAN]:
        cases.append((MoE, base, "num_shared_experts", v))
    for v in [0, -1.0, NAN, INF, True, "1.25"]:
        cases.append((MoE, base, "capacity_factor", v))
    for v in [1, "yes", None]:
        cases.append((MoE, {**base, "num_shared_experts": 1}, "shared_expert_gate", v))
        cases.append((MoE, base, "sync_free", v))
    for v in ["nope", 3, None]:
        cases.append((MoE, base, "router", v))
        cases.append((MoE, base, "backend", v))
    for v in [[1], "top_k=1", 3]:
        cases.append((MoE, base, "router_kwargs", v))
    for arg in ("d_model", "num_experts"):
        for v in POS_INT_BAD:
            cases.append((SoftMoE, dict(d_model=8, num_experts=4), arg, v))
    return cases


@pytest.mark.parametrize("ctor, base, arg, value", _ctor_cases(),
                         ids=lambda v: v.__name__ if isinstance(v, type) else repr(v)[:20])
def test_bad_setting_names_the_argument(ctor, base, arg, value):
    with pytest.raises((ValueError, TypeError), match=arg):
        ctor(**{**base, arg: value})


@pytest.mark.parametrize("clash", [{"d_model": 16}, {"num_experts": 3}, {"top_k": 1}, {"capacity_factor": 1.0},
                                   {"drop_policy": "reroute"}])
def test_router_kwargs_cannot_contradict_the_layer(clash):
    with pytest.raises(ValueError, match="router_kwargs must not set"):
        MoE(d_model=8, num_experts=4, top_k=2, router_kwargs=clash)


_EXTRA_INPUTS = {"hash": "token_ids", "multihash": "token_ids", "stable_moe": "token_ids", "task": "task_ids",
                 "task_topk": "task_ids"}


@pytest.mark.parametrize("name", moekit.available_routers())
def test_every_router_works_with_defaults_or_names_what_it_needs(name):
    try:
        moe = MoE(d_model=8, num_experts=4, router=name)
    except ValueError as e:
        assert "router_kwargs" in str(e), f"{name}: {e}"
        return
    x = torch.randn(2, 5, 8)
    extra = {}
    if name in _EXTRA_INPUTS:
        extra[_EXTRA_INPUTS[name]] = torch.randint(0, 2, (2, 5))
    y = moe(x, **extra)
    assert y.shape == x.shape and torch.isfinite(y).all()


@pytest.mark.parametrize("name, kw, inp", [("stable_moe", {"vocab_size": 11}, "token_ids"),
                                          ("task", {"num_tasks": 3}, "task_ids"),
                                          ("task_topk", {"num_tasks": 3}, "task_ids")])
def test_routers_with_required_arguments_run_once_given(name, kw, inp):
    moe = MoE(d_model=8, num_experts=4, router=name, router_kwargs=kw)
    y = moe(torch.randn(6, 8), **{inp: torch.tensor([0, 1, 2, 2, 1, 0])})
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("layer_dtype, x_dtype", [(torch.float64, torch.float32), (torch.float32, torch.float64),
                                                  (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("kw", [{}, {"num_shared_experts": 1, "shared_expert_gate": True}, {"router": "sigmoid"},
                                {"capacity_factor": 1.0}])
def test_layer_follows_its_dtype_and_returns_x_dtype(layer_dtype, x_dtype, kw):
    torch.manual_seed(0)
    moe = MoE(d_model=8, num_experts=4, top_k=2, **kw).to(layer_dtype)
    x = torch.randn(2, 5, 8)
    x = x.to(x_dtype)
    y = moe(x)
    assert y.dtype == x_dtype
    ref = moe(x.to(layer_dtype))               # the layer's own dtype: the same computation
    torch.testing.assert_close(y, ref.to(x_dtype), rtol=0, atol=0)


def test_float64_stays_float64_and_passes_gradcheck():
    torch.manual_seed(0)
    moe = MoE(d_model=6, num_experts=4, top_k=2, num_shared_experts=1, shared_expert_gate=True).double().eval()
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    y = moe(x)
    assert y.dtype == torch.float64
    assert moe.router(x.detach()).logits.dtype == torch.float64
    assert torch.autograd.gradcheck(moe, (x,), eps=1e-6, atol=1e-6)


def test_meta_layer_refuses_real_input():
    with torch.device("meta"):
        moe = MoE(d_model=8, num_experts=4, top_k=2)
    with pytest.raises(ValueError, match="meta"):
        moe(torch.randn(3, 8))


def test_input_on_another_device_is_refused():
    moe = MoE(d_model=8, num_experts=4, top_k=2)
    with pytest.raises(ValueError, match="meta"):
        moe(torch.randn(3, 8, device="meta"))


@pytest.mark.parametrize("value", [NAN, INF, -INF])
def test_non_finite_input_is_not_silently_a_number(value):
    # A NaN input gives NaN outputs (it is data, not a setting), never a crash or a hang.
    moe = MoE(d_model=8, num_experts=4, top_k=2)
    x = torch.randn(3, 8)
    x[1, 2] = value
    y = moe(x)
    assert torch.isfinite(y[0]).all() and torch.isfinite(y[2]).all() and not math.isfinite(float(y[1].sum()))


_ROUTER_KW = {"stable_moe": {"vocab_size": 3}, "task": {"num_tasks": 3}, "task_topk": {"num_tasks": 3}}


@pytest.mark.parametrize("name", moekit.available_routers())
def test_every_router_keeps_float64_end_to_end(name):
    torch.manual_seed(0)
    moe = MoE(d_model=8, num_experts=4, router=name, z_loss_coef=1e-3, router_kwargs=_ROUTER_KW.get(name)).double()
    extra = {_EXTRA_INPUTS[name]: torch.randint(0, 3, (6,))} if name in _EXTRA_INPUTS else {}
    y = moe(torch.randn(6, 8, dtype=torch.float64), **extra)
    assert y.dtype == torch.float64 and moe.aux_loss.dtype == torch.float64
    routing = moe.last_routing
    # Routers whose weights are the constant 1 (hash, random, THOR) keep them exact in float32.
    assert routing.weights.dtype == torch.float64 or bool((routing.weights == 1).all())
    assert routing.logits is None or routing.logits.dtype == torch.float64


@pytest.mark.parametrize("name", ["topk", "sigmoid", "switch", "noisy_topk"])
def test_float32_layer_keeps_float32_losses(name):
    moe = MoE(d_model=8, num_experts=4, router=name, z_loss_coef=1e-3)
    moe(torch.randn(6, 8))
    assert moe.aux_loss.dtype == torch.float32
