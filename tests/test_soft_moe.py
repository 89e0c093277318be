"""Soft MoE (METHODS.md G9): dispatch/combine normalisation, equivariance, reference loop, gradients."""
import math

import pytest
import torch
import torch.nn.functional as F

import moekit
from moekit.experts import GLUExperts, MLPExperts
from moekit.layers.soft_moe import SoftMoE


def reference_soft_moe(layer: SoftMoE, x_BMD: torch.Tensor, mask_BM=None) -> torch.Tensor:
    """Per-sequence, per-slot loop straight from the paper's formulas, using ``layer.experts[e]``."""
    B, M, D = x_BMD.shape
    P = layer.slots_per_expert
    out = torch.zeros_like(x_BMD)
    for b in range(B):
        x = x_BMD[b].double()
        phi = layer.phi_DS.double()
        if layer.normalize:
            xn, phi = F.normalize(x, dim=-1), layer.scale.double() * F.normalize(phi, dim=0)
        else:
            xn = x
        L = xn @ phi                                                 # (M, S)
        Ld = L if mask_BM is None else L.masked_fill(~mask_BM[b][:, None], -math.inf)
        disp = torch.softmax(Ld, 0)
        comb = torch.softmax(L, 1)
        for s in range(layer.num_slots):
            slot_in = (disp[:, s:s + 1] * x).sum(0, keepdim=True).float()
            slot_out = layer.experts[s // P](slot_in).double()
            out[b] += (comb[:, s:s + 1] * slot_out).float()
        if mask_BM is not None:
            out[b] *= mask_BM[b][:, None]
    return out


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("P", [1, 3])
def test_dispatch_and_combine_sum_to_one(normalize, P):
    torch.manual_seed(0)
    layer = SoftMoE(d_model=12, num_experts=4, slots_per_expert=P, d_hidden=8, normalize=normalize)
    x = torch.randn(3, 7, 12)
    disp, comb = layer.dispatch_combine(x)
    assert disp.shape == comb.shape == (3, 7, 4 * P)
    torch.testing.assert_close(disp.sum(1), torch.ones(3, 4 * P))   # each slot: convex mix of tokens
    torch.testing.assert_close(comb.sum(2), torch.ones(3, 7))       # each token: convex mix of slots
    assert (disp >= 0).all() and (comb >= 0).all()


@pytest.mark.parametrize("expert,P,backend", [("mlp", 1, "eager"), ("mlp", 2, "auto"),
                                              ("swiglu", 2, "grouped_mm"), ("mlp", 1, "grouped_mm")])
def test_equals_reference_loop(expert, P, backend):
    torch.manual_seed(1)
    layer = SoftMoE(d_model=16, num_experts=3, slots_per_expert=P, d_hidden=8, expert=expert, backend=backend)
    x = torch.randn(2, 9, 16)
    torch.testing.assert_close(layer(x), reference_soft_moe(layer, x), atol=1e-5, rtol=1e-4)


def test_permutation_equivariance_and_batch_independence():
    torch.manual_seed(2)
    layer = SoftMoE(d_model=8, num_experts=4, slots_per_expert=2, d_hidden=16)
    x = torch.randn(2, 11, 8)
    y = layer(x)
    perm = torch.randperm(11)
    torch.testing.assert_close(layer(x[:, perm]), y[:, perm], atol=1e-5, rtol=1e-5)
    # Sequences do not mix: each sequence alone gives the same output.
    torch.testing.assert_close(layer(x[1]), y[1], atol=1e-5, rtol=1e-5)


def test_non_causal_and_flagged():
    torch.manual_seed(3)
    layer = SoftMoE(d_model=8, num_experts=2, slots_per_expert=1, d_hidden=8)
    assert SoftMoE.causal_safe is False
    x = torch.randn(1, 6, 8)
    x2 = x.clone()
    x2[:, -1] += 5.0                              # change only the last token
    # ... and the first token's output changes: every slot averages all tokens.
    assert not torch.allclose(layer(x)[:, 0], layer(x2)[:, 0])


def test_normalized_logits_scale_invariant():
    torch.manual_seed(4)
    layer = SoftMoE(d_model=8, num_experts=2, slots_per_expert=2, d_hidden=8, normalize=True)
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(layer.logits(x), layer.logits(7.5 * x))
    raw = SoftMoE(d_model=8, num_experts=2, slots_per_expert=2, d_hidden=8, normalize=False)
    assert not torch.allclose(raw.logits(x), raw.logits(7.5 * x))
    # with normalisation the logits are bounded by the learnable scale
    assert layer.logits(100 * x).abs().max() <= layer.scale.abs() + 1e-5


def test_all_parameters_get_gradients_and_stats():
    torch.manual_seed(5)
    layer = SoftMoE(d_model=8, num_experts=3, slots_per_expert=2, d_hidden=8)
    x = torch.randn(2, 6, 8, requires_grad=True)
    y = layer(x)
    (y.square().sum() + moekit.aux_loss(layer)).backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0
    assert layer.aux_loss.item() == 0.0
    st = layer.last_stats
    # FLOPs depend on slots, not tokens: every expert ran exactly B·P rows.
    assert st.slots_per_expert.tolist() == [4, 4, 4]
    assert 0 <= st.dispatch_entropy <= math.log(6) + 1e-5
    assert 0 <= st.combine_entropy <= math.log(6) + 1e-5
    assert st.num_tokens == 12 and st.num_slots == 12


def test_expert_rows_independent_of_tokens():
    torch.manual_seed(6)
    bank = MLPExperts(2, 8, 8)
    calls = []
    orig = bank.forward

    def spy(x_ND, counts_E, *, backend="auto"):
        calls.append((x_ND.shape[0], counts_E.tolist()))
        return orig(x_ND, counts_E, backend=backend)

    bank.forward = spy
    layer = SoftMoE(d_model=8, num_experts=2, slots_per_expert=3, experts=bank)
    layer(torch.randn(2, 5, 8))
    layer(torch.randn(2, 50, 8))
    assert calls == [(12, [6, 6]), (12, [6, 6])]


def test_mask_excludes_padding():
    torch.manual_seed(7)
    layer = SoftMoE(d_model=8, num_experts=2, slots_per_expert=2, d_hidden=8)
    x = torch.randn(2, 6, 8)
    mask = torch.tensor([[True] * 4 + [False] * 2, [True] * 6])
    y = layer(x, mask=mask)
    assert (y[0, 4:] == 0).all()
    disp, _ = layer.dispatch_combine(x, mask)
    assert (disp[0, 4:] == 0).all()
    torch.testing.assert_close(disp.sum(1), torch.ones(2, 4))
    # padded tokens' content has no effect on real tokens
    x2 = x.clone()
    x2[0, 4:] = 100.0
    torch.testing.assert_close(layer(x2, mask=mask), y)
    torch.testing.assert_close(y, reference_soft_moe(layer, x, mask), atol=1e-5, rtol=1e-4)


def test_dtype_preserved_bf16():
    torch.manual_seed(8)
    layer = SoftMoE(d_model=8, num_experts=2, slots_per_expert=1, d_hidden=8, expert="swiglu")
    x = torch.randn(2, 5, 8)
    y16 = layer(x.bfloat16())
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), layer(x), atol=5e-2, rtol=5e-2)


def test_bad_inputs_raise():
    layer = SoftMoE(d_model=8, num_experts=2, slots_per_expert=1, d_hidden=8)
    with pytest.raises(ValueError, match="d_model|8"):
        layer(torch.randn(2, 5, 7))
    with pytest.raises(ValueError, match="float"):
        layer(torch.ones(2, 5, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="shape"):
        layer(torch.randn(2, 3, 5, 8))
    with pytest.raises(ValueError, match="mask"):
        layer(torch.randn(2, 5, 8), mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="at least one"):
        layer(torch.randn(2, 5, 8), mask=torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="slots_per_expert"):
        SoftMoE(d_model=8, num_experts=2, slots_per_expert=0)
    with pytest.raises(ValueError, match="num_experts"):
        SoftMoE(d_model=8, num_experts=3, experts=GLUExperts(2, 8, 8))
    with pytest.raises(ValueError, match="backend"):
        SoftMoE(d_model=8, num_experts=2, backend="nope")


def test_any_module_experts_and_backend_check():
    from torch import nn

    from moekit.experts.module import ModuleExperts
    torch.manual_seed(9)
    mods = [nn.Sequential(nn.Linear(8, 4), nn.Tanh(), nn.Linear(4, 8)), nn.Linear(8, 8)]
    layer = SoftMoE(d_model=8, num_experts=2, slots_per_expert=2, experts=ModuleExperts(mods, d_model=8))
    x = torch.randn(2, 5, 8)
    assert layer.experts[1] is mods[1]
    torch.testing.assert_close(layer(x), reference_soft_moe(layer, x), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="supports backend"):
        SoftMoE(d_model=8, num_experts=2, slots_per_expert=2, experts=ModuleExperts(mods, d_model=8),
                backend="grouped_mm")
