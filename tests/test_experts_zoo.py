"""Expert designs (METHODS.md X3–X7, G1, F4): stacked MLP/GLU banks against nn.Linear loops,
any-module, heterogeneous, LoRA/(IA)³, CondConv, SMEAR, attention-head experts, dense and
residual mixtures."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moekit
from moekit.experts.heterogeneous import HeterogeneousExperts
from moekit.experts.module import ModuleExperts
from moekit.layers.lora import MoLoRALinear, MoVLinear, soft_gate


def defining_identity(moe, x_TD):
    """Σ_{kept (t, e, w)} w · moe.experts[e](x[t]) — the MoE layer's contract."""
    r = moe.last_routing
    out = torch.zeros_like(x_TD)
    for t, e, w in zip(r.token_ids.tolist(), r.expert_ids.tolist(), r.weights):
        out[t] += w * moe.experts[e](x_TD[t:t + 1])[0]
    return out


# ---------------------------------------------------------------------------------------- Stacked FFN banks
def _mlp_bank(bias, E=4, D=20, F=12):
    torch.manual_seed(0)
    bank = moekit.MLPExperts(E, D, F, activation="gelu", bias=bias)
    if bias:
        with torch.no_grad():          # biases start at zero; make them matter
            bank.up_bias.normal_()
            bank.down_bias.normal_()
    return bank


def _linear_loop(bank, x, counts, g, dtype):
    """Output, input grad and stacked weight grads of `bank`'s experts rebuilt by hand as
    ``nn.Linear(D, F) → GELU → nn.Linear(F, D)`` in `dtype`, run one expert at a time."""
    bias = bank.up_bias is not None
    experts = []
    for e in range(bank.num_experts):
        up = nn.Linear(bank.d_model, bank.d_hidden, bias=bias, dtype=dtype)
        down = nn.Linear(bank.d_hidden, bank.d_model, bias=bias, dtype=dtype)
        with torch.no_grad():
            up.weight.copy_(bank.up_proj[e])
            down.weight.copy_(bank.down_proj[e])
            if bias:
                up.bias.copy_(bank.up_bias[e])
                down.bias.copy_(bank.down_bias[e])
        experts.append(nn.Sequential(up, nn.GELU(), down))
    x = x.to(dtype).requires_grad_()
    y = torch.cat([m(xs) for m, xs in zip(experts, torch.split(x, counts.tolist()))])
    y.backward(g.to(dtype))
    out = {"y": y, "x": x.grad, "up_proj": torch.stack([m[0].weight.grad for m in experts]),
           "down_proj": torch.stack([m[2].weight.grad for m in experts])}
    if bias:
        out["up_bias"] = torch.stack([m[0].bias.grad for m in experts])
        out["down_bias"] = torch.stack([m[2].bias.grad for m in experts])
    return out


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("backend", ["eager", "grouped_mm"])
@pytest.mark.parametrize("counts", [[3, 0, 5, 1], [0, 0, 1, 0], [40, 0, 0, 57]])
def test_mlp_experts_equal_per_expert_linear_loop(bias, backend, counts):
    """Outputs and all gradients against nn.Linear experts; the bound is twice the error of the
    same loop in float32 against it in float64 (experts with no rows included)."""
    bank = _mlp_bank(bias)
    counts = torch.tensor(counts)
    x = torch.randn(int(counts.sum()), bank.d_model)
    g = torch.randn_like(x)
    xg = x.clone().requires_grad_()
    y = bank(xg, counts, backend=backend)
    y.backward(g)
    got = {"y": y, "x": xg.grad, **{n: p.grad for n, p in bank.named_parameters()}}
    exact, plain = _linear_loop(bank, x, counts, g, torch.float64), _linear_loop(bank, x, counts, g, torch.float32)
    assert got.keys() == exact.keys()
    for k, ref in exact.items():
        err = (got[k].double() - ref).abs().max().item()
        base = (plain[k].double() - ref).abs().max().item()
        assert err <= 2 * base + 1e-6, f"{k}: error {err:.2e}, float32 nn.Linear loop {base:.2e}"
    for e in (counts == 0).nonzero().flatten().tolist():     # no rows: exactly zero weight grads
        assert all(not got[k][e].any() for k in got if k not in ("y", "x"))


@pytest.mark.parametrize("backend", ["eager", "grouped_mm"])
def test_mlp_experts_bias_in_moe_defining_identity(backend):
    bank = _mlp_bank(True)
    moe = moekit.MoE(d_model=20, num_experts=4, top_k=2, experts=bank, backend=backend).eval()
    x = torch.randn(2, 9, 20)
    y = moe(x)
    torch.testing.assert_close(y.reshape(-1, 20), defining_identity(moe, x.reshape(-1, 20)), atol=1e-5, rtol=1e-5)


def test_mlp_experts_bias_false_is_unchanged():
    """bias=False is the bias-free bank: same parameters, and zero biases change no bit."""
    plain, biased = _mlp_bank(False), moekit.MLPExperts(4, 20, 12, bias=True)
    assert set(plain.state_dict()) == {"up_proj", "down_proj"} and plain.up_bias is None
    assert {k: tuple(v.shape) for k, v in biased.state_dict().items()} == {
        "up_proj": (4, 12, 20), "down_proj": (4, 20, 12), "up_bias": (4, 12), "down_bias": (4, 20)}
    assert not biased.up_bias.any() and not biased.down_bias.any()          # zero at init
    biased.load_state_dict(plain.state_dict(), strict=False)
    counts = torch.tensor([2, 0, 3, 4])
    x = torch.randn(9, 20)
    for backend in ("eager", "grouped_mm"):
        assert torch.equal(biased(x, counts, backend=backend), plain(x, counts, backend=backend))
    assert torch.equal(biased[2](x), plain[2](x))
    assert "bias=True" in repr(biased) and "bias" not in repr(plain)


@pytest.mark.parametrize("backend", ["eager", "grouped_mm"])
def test_glu_experts_equal_per_expert_linear_loop(backend):
    """Gate rows first in gate_up_proj: expert e is ``down(silu(gate(x)) · up(x))``."""
    torch.manual_seed(1)
    bank = moekit.GLUExperts(3, 16, 8)
    counts = torch.tensor([4, 0, 5])
    x = torch.randn(9, 16, requires_grad=True)
    y = bank(x, counts, backend=backend)
    ref = []
    for e, xs in enumerate(torch.split(x, counts.tolist())):
        gate, up = bank.gate_up_proj[e].chunk(2, 0)
        ref.append(F.linear(F.silu(F.linear(xs, gate)) * F.linear(xs, up), bank.down_proj[e]))
    ref = torch.cat(ref)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, [x, *bank.parameters()], g),
                    torch.autograd.grad(ref, [x, *bank.parameters()], g)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_mlp_experts_bad_input():
    for bad in (1, "yes", None):
        with pytest.raises(TypeError, match="bias must be a bool"):
            moekit.MLPExperts(4, 8, 8, bias=bad)
    with pytest.raises(ValueError, match="d_hidden"):
        moekit.MLPExperts(4, 8, 0, bias=True)
    with pytest.raises(ValueError, match="activation"):
        moekit.MLPExperts(4, 8, 8, activation="nope", bias=True)


# ---------------------------------------------------------------------------------------- ModuleExperts
def _mixed_modules(D):
    return [nn.Sequential(nn.Linear(D, 8), nn.Tanh(), nn.Linear(8, D)),
            nn.Linear(D, D),
            nn.Sequential(nn.LayerNorm(D), nn.Linear(D, D, bias=False)),
            nn.Sequential(nn.Linear(D, 3), nn.ReLU(), nn.Linear(3, D))]


def test_module_experts_in_moe_defining_identity():
    torch.manual_seed(0)
    mods = _mixed_modules(12)
    bank = ModuleExperts(mods, d_model=12)
    moe = moekit.MoE(d_model=12, num_experts=4, top_k=2, experts=bank).eval()
    assert bank[1] is mods[1] and bank[-1] is mods[3]
    x = torch.randn(3, 5, 12)
    y = moe(x)
    torch.testing.assert_close(y.reshape(-1, 12), defining_identity(moe, x.reshape(-1, 12)),
                               atol=1e-5, rtol=1e-5)
    y.sum().backward()
    used = moe.last_stats.tokens_per_expert > 0
    for e, m in enumerate(mods):
        got = any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())
        assert got == bool(used[e])


def test_module_experts_matches_loop_with_empty_experts():
    torch.manual_seed(1)
    mods = _mixed_modules(6)
    bank = ModuleExperts(mods, d_model=6)
    x = torch.randn(5, 6)
    counts = torch.tensor([0, 3, 0, 2])
    y = bank(x, counts)
    torch.testing.assert_close(y, torch.cat([mods[1](x[:3]), mods[3](x[3:])]))
    assert bank(torch.zeros(0, 6), torch.zeros(4, dtype=torch.long)).shape == (0, 6)


def test_module_experts_dtype_follows_module():
    torch.manual_seed(2)
    mods = [nn.Linear(4, 4), nn.Linear(4, 4).double()]
    bank = ModuleExperts(mods, d_model=4)
    x = torch.randn(4, 4)
    y = bank(x, torch.tensor([2, 2]))
    assert y.dtype == torch.float32
    torch.testing.assert_close(y[2:], mods[1](x[2:].double()).float())


def test_module_experts_bad_input():
    mods = _mixed_modules(6)
    bank = ModuleExperts(mods, d_model=6)
    with pytest.raises(ValueError, match="backend"):
        bank(torch.randn(2, 6), torch.tensor([1, 1, 0, 0]), backend="grouped_mm")
    with pytest.raises(ValueError, match="supports backend in"):     # refused at construction
        moekit.MoE(d_model=6, num_experts=4, top_k=1, experts=bank, backend="grouped_mm")
    with pytest.raises(ValueError, match="at least one"):
        ModuleExperts([], d_model=6)
    with pytest.raises(TypeError, match="modules\\[1\\]"):
        ModuleExperts([nn.Linear(6, 6), "x"], d_model=6)
    with pytest.raises(TypeError, match="sequence"):
        ModuleExperts(nn.Linear(6, 6), d_model=6)
    wrong = ModuleExperts([nn.Linear(6, 6), nn.Linear(6, 5)], d_model=6)
    with pytest.raises(ValueError, match="expert 1 must map"):
        wrong(torch.randn(4, 6), torch.tensor([2, 2]))
    with pytest.raises(ValueError, match="counts sum"):
        bank(torch.randn(3, 6), torch.tensor([1, 1, 0, 0]))
    with pytest.raises(IndexError):
        bank[4]


# ---------------------------------------------------------------------------------------- Heterogeneous
def _loop(bank, x, counts):
    return torch.cat([bank.expert_forward(e, xs) for e, xs in enumerate(torch.split(x, counts.tolist()))])


@pytest.mark.parametrize("expert", ["mlp", "swiglu"])
@pytest.mark.parametrize("backend", ["eager", "grouped_mm", "auto"])
@pytest.mark.parametrize("sizes", [[8, 16, 8, 4, 16], [4, 4, 8, 12], [8, 8, 8]])
def test_heterogeneous_equals_per_expert_loop(expert, backend, sizes):
    torch.manual_seed(3)
    D = 16
    bank = HeterogeneousExperts(D, sizes, expert=expert)
    E = len(sizes)
    counts = torch.randint(0, 5, (E,))
    counts[0] = 0                                            # an expert with no rows
    x = torch.randn(int(counts.sum()), D, requires_grad=True)
    y = bank(x, counts, backend=backend)
    x2 = x.detach().clone().requires_grad_(True)
    ref = _loop(bank, x2, counts)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y)
    params = list(bank.parameters())
    gp = torch.autograd.grad(y, [x] + params, g, allow_unused=True)
    gr = torch.autograd.grad(ref, [x2] + params, g, allow_unused=True)
    for a, b, p in zip(gp, gr, [x] + params):    # a size group with no rows may have no grad at all
        a = torch.zeros_like(p) if a is None else a
        torch.testing.assert_close(a, torch.zeros_like(p) if b is None else b, atol=1e-5, rtol=1e-5)


def test_heterogeneous_groups_and_sizes():
    bank = HeterogeneousExperts(8, [16, 4, 16, 8], expert="mlp")
    assert len(bank.groups) == 3                              # one stacked tensor per distinct size
    assert [tuple(g.up_proj.shape) for g in bank.groups] == [(1, 4, 8), (1, 8, 8), (2, 16, 8)]
    assert bank.expert_num_params().tolist() == [2 * 8 * 16, 2 * 8 * 4, 2 * 8 * 16, 2 * 8 * 8]
    n_params = sum(p.numel() for p in bank.parameters())
    assert n_params == int(bank.expert_num_params().sum())
    assert bank[2](torch.randn(3, 8)).shape == (3, 8)
    # parameter penalty: 1 for equal sizes, larger when probability mass sits on large experts
    eq = HeterogeneousExperts(8, [4, 4, 4])
    assert abs(eq.parameter_penalty(torch.softmax(torch.randn(5, 3), -1)).item() - 1) < 1e-6
    on_big = torch.tensor([[1.0, 0, 0, 0]])
    on_small = torch.tensor([[0, 1.0, 0, 0]])
    assert bank.parameter_penalty(on_big) > 1 > bank.parameter_penalty(on_small)


def test_heterogeneous_in_moe_identity_and_backends():
    torch.manual_seed(4)
    bank = HeterogeneousExperts(16, [4, 32, 8, 8, 16, 4])
    moe = moekit.MoE(d_model=16, num_experts=6, top_k=2, experts=bank).eval()
    x = torch.randn(29, 16)
    y = moe(x)
    torch.testing.assert_close(y, defining_identity(moe, x), atol=1e-5, rtol=1e-5)
    moe.backend = "eager"
    torch.testing.assert_close(moe(x), y, atol=1e-5, rtol=1e-5)


def test_heterogeneous_bad_input():
    with pytest.raises(ValueError, match="d_hiddens\\[1\\]"):
        HeterogeneousExperts(8, [4, 0])
    with pytest.raises(ValueError, match="empty"):
        HeterogeneousExperts(8, [])
    with pytest.raises(ValueError, match="expert must be"):
        HeterogeneousExperts(8, [4], expert="conv")
    bank = HeterogeneousExperts(8, [4, 8])
    with pytest.raises(ValueError, match="\\(N, 8\\)"):
        bank(torch.randn(3, 7), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="probs"):
        bank.parameter_penalty(torch.rand(3, 3))


# ---------------------------------------------------------------------------------------- LoRA / (IA)³
@pytest.mark.parametrize("top_k", [None, 2])
def test_molora_identity_at_init_and_frozen_base(top_k):
    torch.manual_seed(5)
    base = nn.Linear(10, 7)
    ref = nn.Linear(10, 7)
    ref.load_state_dict(base.state_dict())
    layer = MoLoRALinear(base, num_experts=4, rank=3, top_k=top_k)
    x = torch.randn(2, 5, 10)
    torch.testing.assert_close(layer(x), ref(x))              # B = 0 ⇒ equals the base
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B", "router.weight"}
    n_adapter = sum(p.numel() for p in layer.parameters() if p.requires_grad)
    assert n_adapter == 4 * 3 * (10 + 7) + 4 * 10


@pytest.mark.parametrize("top_k", [None, 1, 3])
def test_molora_equals_reference_loop(top_k):
    torch.manual_seed(6)
    layer = MoLoRALinear(nn.Linear(8, 6), num_experts=4, rank=2, top_k=top_k, alpha=4.0)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(9, 8)
    g = soft_gate(x @ layer.router.weight.t(), top_k)
    if top_k is not None:
        assert ((g > 0).sum(-1) == top_k).all()
    torch.testing.assert_close(g.sum(-1), torch.ones(9))
    ref = layer.base(x)
    for e in range(4):
        ref = ref + 2.0 * g[:, e:e + 1] * (x @ layer.lora_A[e].t() @ layer.lora_B[e].t())
    y = layer(x)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    y.square().sum().backward()
    assert layer.lora_A.grad.abs().sum() > 0 and layer.router.weight.grad.abs().sum() > 0
    assert layer.base.weight.grad is None
    # a fixed gate vector merges into one dense weight
    gv = torch.softmax(torch.randn(4), 0)
    merged = layer.merged_weight(gv)
    expect = layer.base.weight + 2.0 * sum(gv[e] * layer.lora_B[e] @ layer.lora_A[e] for e in range(4))
    torch.testing.assert_close(merged, expect)


def test_mov_identity_at_init_and_formula():
    torch.manual_seed(7)
    base = nn.Linear(8, 5)
    layer = MoVLinear(base, num_experts=3)
    x = torch.randn(4, 8)
    torch.testing.assert_close(layer(x), base(x))
    nn.init.normal_(layer.ia3)
    g = torch.softmax(x @ layer.router.weight.t(), -1)
    ref = sum(g[:, e:e + 1] * layer.ia3[e] for e in range(3)) * base(x)
    y = layer(x)
    torch.testing.assert_close(y, ref, atol=1e-6, rtol=1e-5)
    y.sum().backward()
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {"ia3", "router.weight"}
    assert layer.ia3.grad.abs().sum() > 0 and base.weight.grad is None


def test_lora_bad_input():
    with pytest.raises(TypeError, match="nn.Linear"):
        MoLoRALinear(nn.Conv1d(3, 3, 1), num_experts=2, rank=2)
    with pytest.raises(ValueError, match="top_k"):
        MoLoRALinear(nn.Linear(4, 4), num_experts=2, rank=2, top_k=3)
    with pytest.raises(ValueError, match="rank"):
        MoLoRALinear(nn.Linear(4, 4), num_experts=2, rank=0)
    layer = MoVLinear(nn.Linear(4, 3), num_experts=2)
    with pytest.raises(ValueError, match="in_features=4"):
        layer(torch.randn(2, 5))


# ---------------------------------------------------------------------------------------- Dense mixture (G1, F4)
from moekit.layers.dense_mixture import DenseMoE, StackedDenseMoE  # noqa: E402


@pytest.mark.parametrize("expert,backend", [("mlp", "eager"), ("swiglu", "grouped_mm"), ("mlp", "auto")])
def test_dense_moe_is_the_oracle_for_topk_equal_E(expert, backend):
    torch.manual_seed(8)
    dense = DenseMoE(d_model=16, num_experts=4, d_hidden=8, expert=expert, backend=backend).eval()
    moe = moekit.MoE(d_model=16, num_experts=4, top_k=4, experts=dense.experts).eval()
    moe.router.weight.data.copy_(dense.gate_weight.data)
    x = torch.randn(3, 7, 16)
    y = dense(x)
    torch.testing.assert_close(y, moe(x), atol=1e-5, rtol=1e-5)
    # and the formula Σ_e g_e f_e(x) with the per-expert views
    x_TD = x.reshape(-1, 16)
    g = torch.softmax(x_TD @ dense.gate_weight.t(), -1)
    ref = sum(g[:, e:e + 1] * dense.experts[e](x_TD) for e in range(4))
    torch.testing.assert_close(y.reshape(-1, 16), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dense.last_stats.mean_gate, g.mean(0))


def test_dense_moe_temperature_and_single_expert():
    torch.manual_seed(9)
    d = DenseMoE(d_model=8, num_experts=3, d_hidden=8, expert="mlp", temperature=0.5)
    x = torch.randn(5, 8)
    torch.testing.assert_close(d.gate(x), torch.softmax(2.0 * (x @ d.gate_weight.t()), -1))
    one = DenseMoE(d_model=8, num_experts=1, d_hidden=8, expert="mlp")
    torch.testing.assert_close(one(x), one.experts[0](x))          # E = 1: the layer is its expert
    with pytest.raises(ValueError, match="temperature"):
        DenseMoE(d_model=8, num_experts=2, temperature=0)
    with pytest.raises(ValueError, match="d_model=8"):
        d(torch.randn(2, 7))


def test_stacked_dense_moe_composition_and_gradients():
    torch.manual_seed(10)
    st = StackedDenseMoE(d_model=8, num_experts=[3, 2], d_hidden=8, expert="mlp")
    x = torch.randn(6, 8)
    y = st(x)
    torch.testing.assert_close(y, st.layers[1](st.layers[0](x)))
    y.square().sum().backward()
    for layer in st.layers:
        assert layer.gate_weight.grad is not None and layer.gate_weight.grad.abs().sum() > 0
    res = StackedDenseMoE(d_model=8, num_experts=[2, 2], d_hidden=8, expert="mlp", residual=True)
    z = x + res.layers[0](x)
    torch.testing.assert_close(res(x), z + res.layers[1](z))


# ---------------------------------------------------------------------------------------- CondConv (X7)
from moekit.layers.condconv import CondConv2d  # noqa: E402


@pytest.mark.parametrize("kw", [dict(padding=1), dict(stride=2, padding=0, groups=2), dict(dilation=2, padding=2,
                                                                                           bias=False)])
def test_condconv_equals_weighted_sum_of_expert_convs(kw):
    torch.manual_seed(11)
    cc = CondConv2d(4, 6, 3, num_experts=5, **kw)
    x = torch.randn(3, 4, 9, 9, requires_grad=True)
    y = cc(x)
    r = cc.routing_weights(x)
    assert ((r > 0) & (r < 1)).all()
    assert not torch.allclose(r.sum(-1), torch.ones(3))         # independent sigmoids, not a softmax
    ref = sum(r[:, e, None, None, None] * cc.expert_conv(e, x) for e in range(5))
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    y.square().sum().backward()
    assert cc.weight.grad.abs().sum() > 0 and cc.routing.weight.grad.abs().sum() > 0
    assert x.grad is not None


def test_condconv_bad_input():
    cc = CondConv2d(4, 6, 3, num_experts=2)
    with pytest.raises(ValueError, match="\\(B, 4, H, W\\)"):
        cc(torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match="routing_weights"):
        cc(torch.randn(2, 4, 8, 8), routing_weights=torch.rand(2, 3))
    with pytest.raises(ValueError, match="divisible"):
        CondConv2d(4, 6, 3, groups=4)


# ---------------------------------------------------------------------------------------- SMEAR (X6)
from moekit.layers.smear import SMEAR  # noqa: E402


def test_smear_linear_equals_dense_mixture():
    torch.manual_seed(12)
    sm = SMEAR(d_model=8, num_experts=4, expert="linear")
    x = torch.randn(3, 5, 8)
    y = sm(x)
    p = torch.softmax(x.mean(1) @ sm.router.weight.t(), -1)             # (B, E), per example
    ref = sum(p[:, e, None, None] * (x @ sm.weight[e].t() + sm.bias[e]) for e in range(4))
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)


def test_smear_mlp_merges_parameters_per_example():
    torch.manual_seed(13)
    sm = SMEAR(d_model=8, num_experts=3, d_hidden=6)
    x = torch.randn(2, 4, 8)
    mask = torch.tensor([[True, True, False, False], [True] * 4])
    y = sm(x, mask=mask)
    for b in range(2):
        xb = x[b][mask[b]].mean(0)
        p = torch.softmax(sm.router.weight @ xb, -1)
        up = sum(p[e] * sm.up_proj[e] for e in range(3))
        ub = sum(p[e] * sm.up_bias[e] for e in range(3))
        dn = sum(p[e] * sm.down_proj[e] for e in range(3))
        db = sum(p[e] * sm.down_bias[e] for e in range(3))
        torch.testing.assert_close(y[b], F.linear(F.gelu(F.linear(x[b], up, ub)), dn, db), atol=1e-5, rtol=1e-5)
    # the MLP mixture of parameters is not the mixture of outputs
    dense = sum(sm.last_gates[0, e] * F.linear(F.gelu(F.linear(x[0], sm.up_proj[e], sm.up_bias[e])),
                                                sm.down_proj[e], sm.down_bias[e]) for e in range(3))
    assert not torch.allclose(y[0], dense, atol=1e-4)
    y.sum().backward()
    assert sm.router.weight.grad.abs().sum() > 0 and sm.up_proj.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="d_hidden"):
        SMEAR(d_model=8, num_experts=2, expert="linear", d_hidden=4)
    with pytest.raises(ValueError, match="mask"):
        sm(x, mask=torch.ones(2, 3, dtype=torch.bool))


# ---------------------------------------------------------------------------------------- Attention-head experts (X4)
from moekit.layers.attention_heads import MixtureOfAttentionHeads  # noqa: E402


def _moa_reference(m, x, causal):
    B, S, D = x.shape
    logits = x @ m.router.weight.t()
    p = torch.softmax(logits, -1)
    y = torch.zeros_like(x)
    k, v = m.k_proj(x), m.v_proj(x)
    for b in range(B):
        for s in range(S):
            vals, ids = torch.sort(p[b, s], descending=True, stable=True)
            vals, ids = vals[:m.top_k], ids[:m.top_k]
            g = vals / vals.sum()
            T = s + 1 if causal else S
            for gi, e in zip(g, ids.tolist()):
                q = m.q_proj[e] @ x[b, s]
                a = torch.softmax(k[b, :T] @ q / m.head_dim ** 0.5, 0)
                y[b, s] += gi * (m.o_proj[e] @ (a @ v[b, :T]))
    return y


@pytest.mark.parametrize("causal", [False, True])
def test_moa_equals_reference(causal):
    torch.manual_seed(14)
    m = MixtureOfAttentionHeads(d_model=12, num_experts=5, top_k=2, head_dim=4, causal=causal)
    nn.init.normal_(m.router.weight)
    x = torch.randn(2, 6, 12)
    y, ref = m(x), _moa_reference(m, x, causal)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-4)
    params = [m.q_proj, m.o_proj, m.k_proj.weight, m.v_proj.weight, m.router.weight]
    g = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, params, g), torch.autograd.grad(ref, params, g)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_moa_all_heads_uniform_gates_is_averaged_multi_query_attention():
    torch.manual_seed(15)
    m = MixtureOfAttentionHeads(d_model=8, num_experts=3, top_k=3, head_dim=4)
    nn.init.zeros_(m.router.weight)                        # uniform gates 1/E on all E heads
    x = torch.randn(2, 5, 8)
    k, v = m.k_proj(x), m.v_proj(x)
    heads = []
    for e in range(3):
        q = x @ m.q_proj[e].t()
        a = torch.softmax(q @ k.transpose(1, 2) / 2.0, -1)
        heads.append((a @ v) @ m.o_proj[e].t())
    torch.testing.assert_close(m(x), sum(heads) / 3, atol=1e-5, rtol=1e-5)


def test_moa_causal_and_aux_loss():
    torch.manual_seed(16)
    m = MixtureOfAttentionHeads(d_model=8, num_experts=4, top_k=2, causal=True, z_loss_coef=1e-3)
    x = torch.randn(1, 7, 8)
    y = m(x)
    x2 = x.clone()
    x2[:, 4:] += 3.0
    torch.testing.assert_close(m(x2)[:, :4], y[:, :4])           # the future does not leak
    y = m(x)
    assert m.aux_loss > 0 and moekit.aux_loss(m) is m.aux_loss
    m.aux_loss.backward()
    assert m.router.weight.grad.abs().sum() > 0
    assert m.last_stats["tokens_per_expert"].sum() == 7 * 2
    kp = torch.tensor([[True] * 5 + [False] * 2])
    y_pad = m(x, mask=kp)
    torch.testing.assert_close(y_pad[:, :5], m(x[:, :5]))          # padding never attended to
    with pytest.raises(ValueError, match="top_k"):
        MixtureOfAttentionHeads(d_model=8, num_experts=2, top_k=3)
    with pytest.raises(ValueError, match="\\(B, S, 8\\)"):
        m(torch.randn(7, 8))


# ---------------------------------------------------------------------------------------- Residual / pyramid (X3)
from moekit.layers.residual_moe import PyramidMoE, ResidualMoE  # noqa: E402


def test_residual_moe_zero_experts_equals_dense_mlp():
    torch.manual_seed(17)
    r = ResidualMoE(d_model=8, num_experts=4, d_hidden=8, expert="mlp")
    x = torch.randn(2, 5, 8)
    y = r(x)
    torch.testing.assert_close(y, r.mlp(x) + r.moe(x))
    assert r.moe.top_k == 1
    with torch.no_grad():
        r.moe.experts.down_proj.zero_()
    torch.testing.assert_close(r(x), r.mlp(x))
    assert r.aux_loss is r.moe.aux_loss
    torch.testing.assert_close(moekit.aux_loss(r), r.moe.aux_loss)   # counted once


def test_residual_moe_coefficient_mix():
    torch.manual_seed(18)
    r = ResidualMoE(d_model=8, num_experts=3, d_hidden=8, coefficient=True)
    x = torch.randn(4, 8)
    c = torch.softmax(r.coefficient(x), -1)
    torch.testing.assert_close(r(x), c[:, :1] * r.moe(x) + c[:, 1:] * r.mlp(x), atol=1e-6, rtol=1e-5)
    r(x).sum().backward()
    assert r.coefficient.weight.grad.abs().sum() > 0


def test_pyramid_moe_counts_and_losses():
    torch.manual_seed(19)
    p = PyramidMoE(d_model=8, num_experts=[2, 4, 8], d_hidden=8, expert="mlp")
    assert [layer.moe.num_experts for layer in p.layers] == [2, 4, 8]
    x = torch.randn(3, 8)
    y = p(x)
    h = x
    for layer in p.layers:
        h = h + layer(h)
    torch.testing.assert_close(y, h)
    p(x)
    torch.testing.assert_close(moekit.aux_loss(p), sum(layer.moe.aux_loss for layer in p.layers))
    plain = PyramidMoE(d_model=8, num_experts=[2, 3], residual_mlp=False, d_hidden=8, expert="mlp")
    assert all(isinstance(layer, moekit.MoE) and layer.top_k == 1 for layer in plain.layers)
    with pytest.raises(ValueError, match="non-decreasing"):
        PyramidMoE(d_model=8, num_experts=[4, 2])
    assert len(PyramidMoE(d_model=8, num_experts=[4, 2], allow_any_order=True, d_hidden=8).layers) == 2
