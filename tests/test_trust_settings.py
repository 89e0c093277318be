"""Every setting is checked, odd values included (trust issue, item 3): the property test.

A table lists every public constructor, config, function and CLI flag that takes numeric or
named settings, with the kind of each setting (a positive int, a number in a range, a bool, a
name from a list …). Each kind has its list of bad values — NaN, ±inf, 0, negatives, bools,
floats where ints are asked, strings, lists, None where not allowed — and every (setting, bad
value) pair is one test: it must raise ValueError or TypeError whose message names the
setting. CLI flags must exit with status 2 and name the flag on stderr. Contradictory
arguments (a router_kwargs entry against the layer, top_k > num_experts …) are listed by hand.
The exact cases of the issue text follow, one test each.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import moekit
from moekit import MoE, cli
from moekit.experts import (
    DenseFFN,
    GLUExperts,
    HeterogeneousExperts,
    MLPExperts,
    ModuleExperts,
    OffloadedExperts,
    SharedExperts,
    build_experts,
)
from moekit.layers import (
    CGC,
    PLE,
    SMEAR,
    STAR,
    CondConv2d,
    DenseMoE,
    EarlyExit,
    HierarchicalMoE,
    M3oE,
    MixtureOfAttentionHeads,
    MixtureOfDepths,
    MMoE,
    MoESM,
    MoLoRALinear,
    MoVLinear,
    MultiHashMoE,
    PyramidMoE,
    ResidualMoE,
    SharedBottom,
    SoftMoE,
    StackedDenseMoE,
    StarLinear,
    add_experts,
    dynmoe_adapt,
    freeze_experts,
    make_mmoe_synthetic,
    offload_experts,
)
from moekit.models import TransformerConfig, TransformerLM
from moekit.optim import UpdateStep, build_optimizer
from moekit.recipes import (
    BTMEnsemble,
    btx,
    distill,
    distillation_loss,
    merge_experts,
    prune_experts,
    prune_model,
    similar_expert_groups,
    upcycle,
)
from moekit.train.config import OptimConfig, TrainConfig, apply_overrides, get_preset

NAN, INF = float("nan"), float("inf")

# Bad values per kind of setting. Each list holds the odd values the issue names: NaN, ±inf,
# 0 and negatives where they are out of range, bools, floats for ints, strings, lists, None.
BAD = {
    "pos_int": [0, -1, -7, True, False, 2.0, 1.5, NAN, INF, "4", [2], None],
    "pos_int_or_none": [0, -1, True, False, 2.0, NAN, INF, "4", [2]],
    "nonneg_int": [-1, -5, True, False, 2.0, NAN, INF, "0", [0], None],
    "int": [True, False, 1.5, NAN, INF, "0", [0], None],
    "pos_num": [0, 0.0, -1, -0.5, NAN, INF, -INF, True, False, "1", [1.0], None],
    "pos_num_or_none": [0, -1.0, NAN, INF, -INF, True, "1", [1.0]],
    "nonneg_num": [-0.5, -1, NAN, INF, -INF, True, False, "0.1", [0.1], None],
    "nonneg_num_or_none": [-0.5, -1, NAN, INF, -INF, True, False, "0.1", [0.1]],
    "num": [NAN, INF, -INF, True, False, "0.1", [0.1], None],
    "prob": [-0.1, 1.5, NAN, INF, -INF, True, False, "0.5", [0.5], None],     # [0, 1]
    "prob_open_high": [-0.1, 1.0, 1.5, NAN, INF, True, "0.5", None],          # [0, 1)
    "prob_open": [0, 0.0, 1.0, -0.1, NAN, INF, True, "0.5", None],            # (0, 1)
    "bool": [1, 0, 1.0, "yes", "True", [True], None],
    "bool_or_none": [1, 0, 1.0, "yes", "True", [True]],
    "choice": ["nope", "", 3, True, [1], None],
    "choice_or_none": ["nope", "", 3, True, [1]],
    "int_list": [[0], [-1], [True], [2.0], [NAN], 3, "4", None],
}


def _ids(v):
    return v.__name__ if callable(v) and hasattr(v, "__name__") else repr(v)[:24]


# ------------------------------------------------------------------------------------------
# Every registered router: each router-specific setting, through MoE(router=..., router_kwargs=...).
ROUTER_SETTINGS = {
    "base": {"group_size": "pos_int_or_none"},
    "cosine": {"d_route": "pos_int", "init_temperature": "pos_num", "min_temperature": "pos_num",
               "norm": "choice"},
    "dense": {"temperature": "pos_num", "bias": "bool"},
    "dense_to_sparse": {"start_temperature": "pos_num", "end_temperature": "pos_num",
                        "anneal_steps": "nonneg_int", "threshold": "prob_open_high"},
    "dynmoe": {"ste_temperature": "pos_num"},
    "dselect_k": {"gamma": "pos_num", "entropy_coef": "nonneg_num", "per_token": "bool"},
    "expert_choice": {"causal": "bool", "group_size": "pos_int_or_none"},
    "gaussian": {"min_var": "pos_num"},
    "gshard": {"group_size": "pos_int_or_none", "random_routing": "bool"},
    "hash": {"vocab_size": "pos_int_or_none", "seed": "int"},
    "multihash": {"num_hashes": "pos_int", "vocab_size": "pos_int_or_none", "seed": "int", "rows_are_chunks": "bool"},
    "noisy_topk": {"min_noise_std": "nonneg_num"},
    "null_experts": {"num_null_experts": "nonneg_int", "balance_coef": "nonneg_num"},
    "random": {"seed": "int"},
    "relu": {"l1_init": "pos_num", "l1_growth": "pos_num", "load_balanced": "bool", "adapt": "bool"},
    "sampled_top1": {"temperature": "pos_num", "straight_through": "bool"},
    "sigmoid": {"num_groups": "pos_int", "topk_groups": "pos_int", "route_scale": "pos_num", "renorm": "bool",
                "bias_update_rate": "nonneg_num", "fused_gate": "bool"},
    "sinkhorn": {"num_iters": "pos_int", "norm": "choice_or_none"},
    "stable_moe": {"vocab_size": "pos_int", "d_distill": "pos_int", "distill_coef": "nonneg_num"},
    "switch": {"jitter": "prob_open_high", "fused_gate": "bool"},
    "task": {"num_tasks": "pos_int", "d_task": "pos_int", "norm": "choice"},
    "task_topk": {"num_tasks": "pos_int", "norm": "choice", "mi_loss_coef": "nonneg_num"},
    "thor": {"granularity": "choice", "eval_mode": "choice", "eval_expert": "nonneg_int"},
    "top_p": {"p": "prob", "dynamic_loss_coef": "nonneg_num", "max_experts": "pos_int_or_none"},
    "topk": {"norm": "choice", "route_scale": "pos_num", "softmax": "choice", "bias": "bool",
             "fused_gate": "bool"},
    "vmoe": {"noise_std": "nonneg_num_or_none", "fused_gate": "bool"},
}
ROUTER_NEEDS = {"stable_moe": {"vocab_size": 11}, "task": {"num_tasks": 3}, "task_topk": {"num_tasks": 3}}
# Settings whose 'good' values include a few of the generic bad ones.
ROUTER_SKIP = [("sinkhorn", "norm", None), ("dense_to_sparse", "threshold", None)]    # None: the default


def _router_cases():
    out = []
    for name, settings in ROUTER_SETTINGS.items():
        assert name in moekit.available_routers()
        for arg, kind in settings.items():
            values = list(BAD[kind])
            if arg == "p":
                values += [0, 0.0]                  # (0, 1]: 0 is out
            if arg == "l1_growth":
                values += [1.0, 0.5]                # ζ > 1
            if arg == "eval_expert":
                values += [4, 99]                   # only 4 experts
            if arg == "max_experts":
                values += [5]
            for v in values:
                if not any(s == (name, arg, v) for s in ROUTER_SKIP):
                    out.append((name, arg, v))
    return out


def test_router_table_covers_every_registered_router():
    assert set(ROUTER_SETTINGS) == set(moekit.available_routers())


@pytest.mark.parametrize("router, arg, value", _router_cases(), ids=_ids)
def test_router_setting_names_the_argument(router, arg, value):
    kw = {**ROUTER_NEEDS.get(router, {}), arg: value}
    with pytest.raises((ValueError, TypeError), match=arg):
        MoE(d_model=8, num_experts=4, router=router, router_kwargs=kw)


# ------------------------------------------------------------------------------------------
# Layers, expert banks, models' building blocks, recipes, optim: (factory, good kwargs, {arg: kind}).
def _lin():
    return nn.Linear(8, 8)


def _moe():
    return MoE(d_model=8, num_experts=4, top_k=2)


def _dense_lm():
    torch.manual_seed(0)
    return TransformerLM(TransformerConfig(vocab_size=5, d_model=8, n_layers=1, n_heads=2, max_seq_len=8,
                                           moe_layers="none", ffn_hidden=8))


def _add_experts(**kw):
    return add_experts(_moe(), **kw)


def _freeze(**kw):
    return freeze_experts(_moe(), **kw)


def _offload(**kw):
    return offload_experts(nn.Sequential(_moe()), **kw)


def _offloaded_bank(**kw):
    return OffloadedExperts(GLUExperts(4, 8, 4), device="cpu", **kw)


def _molora(**kw):
    return MoLoRALinear(_lin(), **kw)


def _mov(**kw):
    return MoVLinear(_lin(), **kw)


def _module_experts(**kw):
    return ModuleExperts([_lin() for _ in range(3)], **kw)


def _upcycle(**kw):
    return upcycle(_dense_lm(), **kw)


def _btx(**kw):
    return btx(_dense_lm(), [_dense_lm(), _dense_lm()], **kw)


def _btm(**kw):
    return BTMEnsemble([_dense_lm(), _dense_lm()], **kw)


def _distill(**kw):
    y = torch.randint(0, 5, (2, 4))
    return distill(None, _dense_lm(), [(y, y)], **{"alpha": 0.0, **kw})


def _distillation_loss(**kw):
    s = torch.randn(2, 3, 5)
    return distillation_loss(s, s.clone(), torch.randint(0, 5, (2, 3)), **kw)


def _prune_model(**kw):
    model = nn.Sequential(_moe())
    return prune_model(model, {"0": torch.tensor([3, 1, 2, 0])}, **kw)


def _prune_experts(**kw):
    return prune_experts(_moe(), **kw)


def _similar_groups(**kw):
    return similar_expert_groups(_moe(), **kw)


def _merge(**kw):
    return merge_experts(_moe(), **kw)


def _build_optimizer(**kw):
    return build_optimizer(_lin(), **{"lr": 1e-3, **kw})


def _update_step(**kw):
    m = _lin()
    return UpdateStep(m, torch.optim.SGD(m.parameters(), lr=0.1), **{"lr": 0.1, "total_steps": 10, **kw})


def _mod(**kw):
    return MixtureOfDepths(torch.nn.Linear(8, 8), **kw)


def _dynmoe_adapt(**kw):
    torch.manual_seed(0)
    moe = MoE(d_model=8, num_experts=4, router="dynmoe")
    moe(torch.randn(6, 8))
    return dynmoe_adapt(moe, **kw)


def _early_exit(**kw):
    blocks = [torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)]
    heads = [torch.nn.Linear(8, 3), torch.nn.Linear(8, 3)]
    return EarlyExit(blocks, heads, **kw)


TABLE = [
    (MultiHashMoE, dict(d_model=8, num_experts=4), {"d_model": "pos_int", "num_experts": "pos_int",
                                                    "num_hashes": "pos_int", "vocab_size": "pos_int_or_none",
                                                    "seed": "int"}),
    (_dynmoe_adapt, {}, {"grow_fraction": "prob", "min_experts": "pos_int", "max_experts": "pos_int_or_none"}),
    (SoftMoE, dict(d_model=8, num_experts=4), {"d_model": "pos_int", "num_experts": "pos_int",
                                               "slots_per_expert": "pos_int", "d_hidden": "pos_int_or_none",
                                               "normalize": "bool", "backend": "choice",
                                               "expert": "choice_or_none", "activation": "choice_or_none"}),
    (DenseMoE, dict(d_model=8, num_experts=4), {"d_model": "pos_int", "num_experts": "pos_int",
                                                "d_hidden": "pos_int_or_none", "temperature": "pos_num",
                                                "backend": "choice"}),
    (StackedDenseMoE, dict(d_model=8, num_experts=[2, 4]), {"num_experts": "int_list", "residual": "bool"}),
    (MMoE, dict(d_model=8, num_experts=4, num_tasks=2, d_hidden=6),
     {"d_model": "pos_int", "num_experts": "pos_int", "num_tasks": "pos_int", "d_hidden": "pos_int",
      "tower_hidden": "pos_int_or_none", "d_out": "pos_int", "shared_gate": "bool", "activation": "choice"}),
    (CGC, dict(d_model=8, num_tasks=2, num_shared_experts=2, num_specific_experts=1, d_hidden=6),
     {"d_model": "pos_int", "num_tasks": "pos_int", "num_shared_experts": "pos_int",
      "num_specific_experts": "nonneg_int", "d_hidden": "pos_int", "tower_hidden": "pos_int_or_none",
      "d_out": "pos_int", "activation": "choice"}),
    (PLE, dict(d_model=8, num_tasks=2, num_shared_experts=2, num_specific_experts=1, d_hidden=6),
     {"d_model": "pos_int", "num_tasks": "pos_int", "num_shared_experts": "pos_int",
      "num_specific_experts": "nonneg_int", "d_hidden": "pos_int", "num_levels": "pos_int",
      "tower_hidden": "pos_int_or_none", "d_out": "pos_int", "activation": "choice"}),
    (SharedBottom, dict(d_model=8, num_tasks=2, d_hidden=6),
     {"d_model": "pos_int", "num_tasks": "pos_int", "d_hidden": "pos_int", "tower_hidden": "pos_int_or_none",
      "d_out": "pos_int", "activation": "choice"}),
    (make_mmoe_synthetic, dict(num_samples=4, correlation=0.5, d=4),
     {"num_samples": "pos_int", "correlation": "num", "d": "pos_int", "c": "num", "m": "nonneg_int",
      "noise_std": "nonneg_num", "seed": "int"}),
    (ResidualMoE, dict(d_model=8, num_experts=4),
     {"d_model": "pos_int", "num_experts": "pos_int", "top_k": "pos_int_or_none", "d_hidden": "pos_int_or_none",
      "mlp_d_hidden": "pos_int_or_none", "coefficient": "bool"}),
    (PyramidMoE, dict(d_model=8, num_experts=[2, 4]),
     {"num_experts": "int_list", "residual_mlp": "bool", "allow_any_order": "bool"}),
    (HierarchicalMoE, dict(d_model=4), {"d_model": "pos_int", "d_out": "pos_int", "min_var": "pos_num"}),
    (M3oE, dict(d_model=5, num_domains=2, num_tasks=2, star_dim=8, bottom_dim=8, expert_dims=(6,)),
     {"d_model": "pos_int", "num_domains": "pos_int", "num_tasks": "pos_int", "num_shared_experts": "pos_int",
      "star_dim": "pos_int", "bottom_dim": "pos_int", "expert_dims": "int_list",
      "tower_hidden": "pos_int_or_none", "structure_init": "num", "detach_gate_input": "bool"}),
    (STAR, dict(d_model=5, num_domains=2, num_tasks=2),
     {"d_model": "pos_int", "num_domains": "pos_int", "num_tasks": "pos_int", "dims": "int_list",
      "tower_hidden": "pos_int", "aux_hidden": "pos_int"}),
    (StarLinear, dict(d_in=5, d_out=4, num_domains=2),
     {"d_in": "pos_int", "d_out": "pos_int", "num_domains": "pos_int"}),
    (MixtureOfAttentionHeads, dict(d_model=8, num_experts=4),
     {"d_model": "pos_int", "num_experts": "pos_int", "top_k": "pos_int", "head_dim": "pos_int_or_none",
      "causal": "bool", "aux_loss_coef": "nonneg_num", "z_loss_coef": "nonneg_num"}),
    (CondConv2d, dict(in_channels=4, out_channels=4, kernel_size=3),
     {"in_channels": "pos_int", "out_channels": "pos_int", "kernel_size": "pos_int", "num_experts": "pos_int",
      "stride": "pos_int", "padding": "nonneg_int", "dilation": "pos_int", "groups": "pos_int",
      "bias": "bool", "routing_dropout": "prob_open_high"}),
    (_molora, dict(num_experts=4, rank=2), {"num_experts": "pos_int", "rank": "pos_int",
                                            "top_k": "pos_int_or_none", "alpha": "pos_num_or_none",
                                            "dropout": "prob_open_high"}),
    (_mov, dict(num_experts=4), {"num_experts": "pos_int", "top_k": "pos_int_or_none"}),
    (SMEAR, dict(d_model=8, num_experts=4), {"d_model": "pos_int", "num_experts": "pos_int", "expert": "choice",
                                             "d_hidden": "pos_int_or_none", "activation": "choice"}),
    (MoESM, dict(d_model=8, num_experts=4, top_k=2),
     {"d_model": "pos_int", "num_experts": "pos_int", "top_k": "pos_int", "d_hidden": "pos_int_or_none",
      "activation": "choice", "merger": "choice", "balance_coef": "nonneg_num", "with_noise": "bool"}),
    (_mod, dict(d_model=8, capacity=0.5),
     {"d_model": "pos_int", "capacity": "pos_num", "predictor": "bool", "aux_loss_coef": "nonneg_num",
      "score_activation": "choice"}),
    (_early_exit, {}, {"criterion": "choice", "threshold": "nonneg_num"}),
    (_add_experts, dict(n=1), {"n": "pos_int", "router_bias": "num"}),
    (_offload, dict(cache_size=2), {"cache_size": "pos_int", "prefetch": "bool"}),
    # expert banks
    (MLPExperts, dict(num_experts=4, d_model=8, d_hidden=6),
     {"num_experts": "pos_int", "d_model": "pos_int", "d_hidden": "pos_int", "activation": "choice",
      "bias": "bool"}),
    (GLUExperts, dict(num_experts=4, d_model=8, d_hidden=6),
     {"num_experts": "pos_int", "d_model": "pos_int", "d_hidden": "pos_int", "activation": "choice"}),
    (SharedExperts, dict(d_model=8, d_hidden=6),
     {"d_model": "pos_int", "d_hidden": "pos_int", "num_shared": "pos_int", "expert": "choice", "gate": "bool"}),
    (DenseFFN, dict(d_model=8, d_hidden=6), {"d_model": "pos_int", "d_hidden": "pos_int", "expert": "choice"}),
    (_module_experts, dict(d_model=8), {"d_model": "pos_int", "d_out": "pos_int_or_none"}),
    (HeterogeneousExperts, dict(d_model=8, d_hiddens=[4, 6]),
     {"d_model": "pos_int", "d_hiddens": "int_list", "expert": "choice"}),
    (_offloaded_bank, dict(cache_size=2), {"cache_size": "pos_int", "pin_memory": "bool_or_none"}),
    (build_experts, dict(expert="mlp", num_experts=4, d_model=8, d_hidden=6),
     {"expert": "choice", "num_experts": "pos_int", "d_model": "pos_int", "d_hidden": "pos_int"}),
    # optim
    (_build_optimizer, {}, {"lr": "pos_num", "weight_decay": "nonneg_num", "eps": "pos_num", "name": "choice"}),
    (_update_step, {}, {"lr": "pos_num_or_none", "total_steps": "pos_int", "warmup_steps": "nonneg_int",
                        "min_lr_ratio": "prob", "grad_clip": "nonneg_num", "schedule": "choice"}),
    # recipes
    (_upcycle, dict(num_experts=4, top_k=2),
     {"num_experts": "pos_int", "top_k": "pos_int", "granularity": "pos_int", "noise": "nonneg_num",
      "reinit_fraction": "prob", "every": "pos_int"}),
    (_btx, dict(top_k=1), {"top_k": "pos_int", "include_base": "bool", "seed": "int"}),
    (_btm, {}, {"context_tokens": "pos_int_or_none", "top_k": "pos_int_or_none"}),
    (_distill, dict(steps=1),
     {"steps": "pos_int", "lr": "pos_num", "temperature": "pos_num", "ignore_index": "int",
      "warmup_steps": "nonneg_int", "min_lr_ratio": "prob", "weight_decay": "nonneg_num",
      "grad_clip": "nonneg_num", "eps": "nonneg_num", "beta1": "prob_open_high", "beta2": "prob_open_high"}),
    (_distillation_loss, {}, {"alpha": "prob", "temperature": "pos_num", "ignore_index": "int"}),
    (_prune_model, dict(keep=2), {"keep": "pos_int"}),
    (_similar_groups, dict(num_groups=2), {"num_groups": "pos_int"}),
]

# (factory, good kwargs, arg, extra bad values): out of range for this object only.
EXTRA = [
    (_mod, dict(d_model=8), "capacity", [1.5, 2.0]),
    (make_mmoe_synthetic, dict(num_samples=4, correlation=0.5), "correlation", [1.5, -2]),
    (make_mmoe_synthetic, dict(num_samples=4, correlation=0.5), "d", [1]),
    (_molora, dict(num_experts=4, rank=2), "top_k", [5]),
    (_mov, dict(num_experts=4), "top_k", [5]),
    (_offload, dict(cache_size=2), "cache_size", [5]),
    (_offloaded_bank, dict(cache_size=2), "cache_size", [5]),
    (_upcycle, dict(num_experts=4, top_k=2), "top_k", [5]),
    (_btx, dict(top_k=1), "top_k", [3]),
    (_prune_model, dict(keep=2), "keep", [5, 1.5, -0.5, NAN]),
    (_similar_groups, dict(num_groups=2), "num_groups", [5]),
    (_freeze, {}, "ids", [[4], [-5]]),
    (_prune_experts, {}, "keep", [[], [4], [0, 0], [True], [1.5]]),
    (_merge, {}, "groups", [[[0, 1]], [[0, 1], [1, 2, 3]], [[0, 1, 2, 3, 4]]]),
    (PLE, dict(d_model=8, num_tasks=2, num_shared_experts=2, num_specific_experts=1), "d_hidden",
     [[6], [6, 0], [6, True], 8.0]),
    (HierarchicalMoE, dict(d_model=4), "branching", [None, (), (2,), (0, 2), (2, True), (2, 1.5), 2.5, "22"]),
    (MixtureOfAttentionHeads, dict(d_model=8, num_experts=4), "top_k", [5]),
    (CondConv2d, dict(in_channels=4, out_channels=4, kernel_size=3), "groups", [3]),
    (CondConv2d, dict(in_channels=4, out_channels=4), "kernel_size", [(3,), (3, 0), (3, True)]),
]


def _table_cases():
    out = []
    for factory, base, settings in TABLE:
        for arg, kind in settings.items():
            for v in BAD[kind]:
                out.append((factory, base, arg, v))
    for factory, base, arg, values in EXTRA:
        for v in values:
            out.append((factory, base, arg, v))
    return out


@pytest.mark.parametrize("factory, base, arg, value", _table_cases(), ids=_ids)
def test_setting_names_the_argument(factory, base, arg, value):
    with pytest.raises((ValueError, TypeError), match=arg):
        factory(**{**base, arg: value})


def test_every_layer_with_settings_is_in_the_table():
    # A layer added to moekit.layers must join the table (or this list of exemptions with a reason).
    covered = {f.__name__ for f, _, _ in TABLE} | {f.__name__ for f, *_ in EXTRA}
    covered |= {"MoLoRALinear", "MoVLinear", "add_experts", "freeze_experts", "offload_experts",
                "MixtureOfDepths", "EarlyExit", "dynmoe_adapt"}   # through _mod, _early_exit, _dynmoe_adapt
    exempt = {"MoE",            # tests/test_trust_inputs.py
              "MoEConfig", "MoEStats", "MoELayer", "LayerStats", "MixtureStats",   # data / protocols
              "aux_loss", "moe_layers", "default_hidden", "offload_stats", "restore_experts",
              "irls_multinomial", "DepthStats"}  # takes tensors; its steps / damping are HME's
    missing = [n for n in moekit.layers.__all__ if n not in covered | exempt]
    assert not missing, f"layers without a bad-settings table entry: {missing}"


# ------------------------------------------------------------------------------------------
# Run configuration through `--set`-style overrides.
def _toml(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    if isinstance(v, float) and math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if v is None:
        return "none"
    if isinstance(v, str):
        return f'"{v}"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    return repr(v)


CONFIG_SETTINGS = {
    "optim.lr": "pos_num", "optim.eps": "pos_num", "optim.min_lr_ratio": "prob", "optim.beta1": "prob",
    "optim.beta2": "prob", "optim.weight_decay": "nonneg_num", "optim.grad_clip": "nonneg_num",
    "optim.warmup_steps": "nonneg_int",
    "train.steps": "pos_int", "train.grad_accum": "pos_int", "train.eval_every": "pos_int",
    "train.eval_batches": "pos_int", "train.log_every": "pos_int", "train.ckpt_every": "pos_int",
    "train.keep_checkpoints": "pos_int", "train.seed": "nonneg_int", "train.threads": "pos_int_or_none",
    "train.amp": "choice", "train.compile": "bool", "train.fsdp": "bool", "train.device": "choice",
    "data.seq_len": "pos_int", "data.batch_size": "pos_int", "data.val_fraction": "prob_open",
    "data.split_seed": "nonneg_int", "data.source": "choice", "data.tokenizer": "choice",
    "model.num_experts": "pos_int", "model.top_k": "pos_int_or_none", "model.d_model": "pos_int",
    "model.n_layers": "pos_int", "model.aux_loss_coef": "nonneg_num", "model.z_loss_coef": "nonneg_num",
    "model.capacity_factor": "pos_num_or_none",
}


def _config_cases():
    out = []
    for key, kind in CONFIG_SETTINGS.items():
        for v in BAD[kind]:
            out.append((key, v))
    out += [("model.router_kwargs", v) for v in ({"top_k": 1}, {"d_model": 16}, {"num_experts": 3},
                                                  {"capacity_factor": 1.0})]
    return out


def _override(key, v):
    if isinstance(v, dict):
        return f"{key}={{" + ", ".join(f"{k} = {_toml(x)}" for k, x in v.items()) + "}"
    return f"{key}={_toml(v)}"


@pytest.mark.parametrize("key, value", _config_cases(), ids=_ids)
def test_config_override_names_the_key(key, value):
    name = key.split(".", 1)[1]
    with pytest.raises((ValueError, TypeError), match=name):
        apply_overrides(get_preset("tiny"), [_override(key, value)])


# ------------------------------------------------------------------------------------------
# The CLI: exit status 2 and the flag named on stderr, before any file is read.
CLI_CASES = [
    (["generate", "no-such-run", "--top-k", v], "--top-k") for v in ("0", "-3")
] + [
    (["generate", "no-such-run", f"--temperature={v}"], "--temperature") for v in ("nan", "inf", "-inf", "-1")
] + [
    (["generate", "no-such-run", "--max-new-tokens", "-1"], "--max-new-tokens"),
    (["generate", "no-such-run", "--offload-cache", "0"], "--offload-cache"),
    (["generate", "no-such-run", "--device", "tpu"], "--device"),
    (["generate", "no-such-run", "--device", "meta"], "--device"),
] + [
    (["upcycle", "src", "out", "-E", v], "--num-experts") for v in ("0", "-2")
] + [
    (["upcycle", "src", "out", "-k", v], "--top-k") for v in ("0", "-1", "9")
] + [
    (["upcycle", "src", "out", "--noise", v], "--noise") for v in ("nan", "inf", "-0.5")
] + [
    (["upcycle", "src", "out", "--reinit-fraction", v], "--reinit-fraction") for v in ("nan", "1.5", "-1")
] + [
    (["upcycle", "src", "out", "--granularity", "0"], "--granularity"),
    (["upcycle", "src", "out", "--every", "0"], "--every"),
    (["merge", "base", "out", "--experts", "a", "b", "-k", "0"], "--top-k"),
] + [
    (["train", "--set", _override(k, v)], k.split(".", 1)[1])
    for k, v in [("optim.lr", NAN), ("optim.lr", INF), ("optim.grad_clip", NAN), ("optim.weight_decay", -1),
                 ("train.steps", True), ("train.steps", 0), ("train.grad_accum", 1.5), ("train.amp", "fp8"),
                 ("data.val_fraction", NAN), ("data.seq_len", -1), ("model.num_experts", 0),
                 ("model.aux_loss_coef", NAN), ("model.router_kwargs", {"top_k": 1})]
]


@pytest.mark.parametrize("argv, flag", CLI_CASES, ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_cli_flag_is_named(argv, flag, capsys):
    assert cli.main(argv) == 2
    assert flag in capsys.readouterr().err


@pytest.mark.parametrize("argv, flag", [(["upcycle", "s", "o", "-E", "two"], "-E"),
                                        (["generate", "r", "--top-k", "1.5"], "--top-k"),
                                        (["generate", "r", "--temperature", "warm"], "--temperature")])
def test_cli_flag_of_the_wrong_type_is_named_by_argparse(argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2 and flag in capsys.readouterr().err


# ------------------------------------------------------------------------------------------
# Contradictory arguments.
CONTRADICTIONS = [
    (lambda: MoE(d_model=8, num_experts=4, top_k=5), "top_k"),
    (lambda: MoE(d_model=8, num_experts=4, router="sigmoid", router_kwargs={"num_groups": 3}), "num_groups"),
    (lambda: MoE(d_model=8, num_experts=4, router="sigmoid", router_kwargs={"num_groups": 2, "topk_groups": 3}),
     "topk_groups"),
    (lambda: MoE(d_model=8, num_experts=4, router="cosine",
                 router_kwargs={"min_temperature": 0.5, "init_temperature": 0.1}), "init_temperature"),
    (lambda: MoE(d_model=8, num_experts=4, router="dense_to_sparse",
                 router_kwargs={"start_temperature": 0.1, "end_temperature": 1.0}), "start_temperature"),
    (lambda: MoE(d_model=8, num_experts=4, router="dense_to_sparse", router_kwargs={"threshold": 0.5}),
     "threshold"),
    (lambda: MoE(d_model=8, num_experts=4, router="expert_choice", capacity_factor=5.0), "capacity_factor"),
    (lambda: MoE(d_model=8, num_experts=4, router="topk", router_kwargs={"route_scale": 2.0}), "route_scale"),
    (lambda: MoE(d_model=8, num_experts=4, router="switch", top_k=2), "top_k"),
    (lambda: MoE(d_model=8, num_experts=4, router="hash", top_k=2), "top_k"),
    (lambda: MMoE(d_model=8, num_experts=4, num_tasks=2, d_hidden=6, shared_gate=1), "shared_gate"),
    (lambda: PLE(d_model=8, num_tasks=2, num_shared_experts=2, num_specific_experts=1, d_hidden=[6, 6, 6]),
     "d_hidden"),
    (lambda: SMEAR(d_model=8, num_experts=4, expert="linear", d_hidden=8), "d_hidden"),
    (lambda: CondConv2d(4, 6, 3, groups=4), "groups"),
    (lambda: PyramidMoE(d_model=8, num_experts=[4, 2]), "num_experts"),
    (lambda: distill(None, _dense_lm(), [], steps=1, alpha=0.5), "alpha"),
    (lambda: OptimConfig(lr=1e-3, min_lr_ratio=2.0), "min_lr_ratio"),
    (lambda: apply_overrides(get_preset("tiny"), ["model.max_seq_len=8", "data.seq_len=16"]), "max_seq_len"),
]


@pytest.mark.parametrize("make, arg", CONTRADICTIONS, ids=[a for _, a in CONTRADICTIONS])
def test_contradictory_arguments_name_the_argument(make, arg):
    with pytest.raises((ValueError, TypeError), match=arg):
        make()


# ------------------------------------------------------------------------------------------
# The exact cases of the issue text, one test each.
def test_issue_aux_loss_coef_nan_does_not_turn_the_loss_off():
    with pytest.raises(ValueError, match="aux_loss_coef must be a finite number >= 0, got nan"):
        MoE(d_model=8, num_experts=4, top_k=2, aux_loss_coef=NAN)


def test_issue_grad_clip_nan_does_not_turn_clipping_off():
    with pytest.raises(ValueError, match="optim.grad_clip must be a finite number >= 0, got nan"):
        apply_overrides(get_preset("tiny"), ["optim.grad_clip=nan"])
    with pytest.raises(ValueError, match="grad_clip"):
        OptimConfig(grad_clip=NAN)


def test_issue_lr_inf_is_refused():
    with pytest.raises(ValueError, match="optim.lr must be a finite number > 0, got inf"):
        OptimConfig(lr=INF)
    with pytest.raises(ValueError, match="lr must be a finite number > 0, got inf"):
        build_optimizer(_lin(), lr=INF)


def test_issue_true_is_not_an_int_size():
    with pytest.raises(TypeError, match=r"num_experts must be a positive int, got True \(bool\)"):
        MoE(d_model=8, num_experts=True)
    with pytest.raises(TypeError, match=r"train.steps must be a positive int, got True \(bool\)"):
        TrainConfig(steps=True)


@pytest.mark.parametrize("clash", [{"d_model": 16}, {"num_experts": 3}, {"top_k": 1}])
def test_issue_router_kwargs_cannot_contradict_the_layer(clash):
    (key,) = clash
    with pytest.raises(ValueError, match=f"router_kwargs must not set .*{key}"):
        MoE(d_model=8, num_experts=4, top_k=2, router_kwargs=clash)


@pytest.mark.parametrize("value", [0, -4])
def test_issue_shared_d_hidden_zero_or_negative(value):
    with pytest.raises(ValueError, match=f"shared_d_hidden must be a positive int or None, got {value}"):
        MoE(d_model=8, num_experts=4, top_k=2, num_shared_experts=1, shared_d_hidden=value)


def test_issue_mmoe_d_out_zero():
    with pytest.raises(ValueError, match="d_out must be a positive int, got 0"):
        MMoE(d_model=8, num_experts=4, num_tasks=2, d_hidden=6, d_out=0)


def test_issue_ple_float_hidden():
    # The issue's `expert_hidden` is PLE's `d_hidden` argument.
    with pytest.raises(TypeError, match=r"d_hidden must be a positive int, got 8.0 \(float\)"):
        PLE(d_model=8, num_tasks=2, num_shared_experts=2, num_specific_experts=1, d_hidden=8.0)


def test_issue_hme_branching_none():
    with pytest.raises(TypeError, match="branching must be a pair of positive ints"):
        HierarchicalMoE(d_model=4, branching=None)


def test_issue_hme_fit_em_on_empty_or_nan_data():
    hme = HierarchicalMoE(d_model=3)
    with pytest.raises(ValueError, match="at least one example"):
        hme.fit_em(torch.zeros(0, 3), torch.zeros(0, 1))
    x, y = torch.randn(5, 3), torch.randn(5, 1)
    x[2, 1] = NAN
    with pytest.raises(ValueError, match="finite"):
        hme.fit_em(x, y)


def test_issue_generate_top_k_zero(capsys):
    assert cli.main(["generate", "no-such-run", "--top-k", "0"]) == 2
    assert "--top-k must be a positive int or None, got 0" in capsys.readouterr().err


def test_issue_generate_temperature_nan(capsys):
    assert cli.main(["generate", "no-such-run", "--temperature", "nan"]) == 2
    assert "--temperature must be a finite number >= 0, got nan" in capsys.readouterr().err


def test_issue_generate_device_that_is_not_here(capsys):
    missing = "cuda:%d" % torch.cuda.device_count() if torch.cuda.is_available() else "cuda"
    assert cli.main(["generate", "no-such-run", "--device", missing]) == 2
    err = capsys.readouterr().err
    assert "--device" in err and missing in err
