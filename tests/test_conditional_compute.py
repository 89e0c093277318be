"""Conditional computation beyond MoE: Mixture-of-Depths (METHODS.md CC1) and early exits (CC2)."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moekit
from moekit.layers import EarlyExit, MixtureOfDepths, MoELayer
from moekit.layers.depths import capacity_tokens
from moekit.layers.early_exit import exit_scores

# ---------------------------------------------------------------------------------------------
# Mixture-of-Depths (CC1)

class CausalMix(nn.Module):
    """A block whose update at position k depends on positions ≤ k (a running mean, then a
    linear map): order-sensitive and causal, like attention in a decoder."""

    def __init__(self, d):
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.shapes = []

    def forward(self, x_BKD):
        self.shapes.append(tuple(x_BKD.shape))
        n = torch.arange(1, x_BKD.shape[1] + 1, device=x_BKD.device, dtype=x_BKD.dtype)[:, None]
        return torch.tanh(self.lin(x_BKD.cumsum(1) / n))


def gate(layer, r):
    return torch.sigmoid(r) if layer.score_activation == "sigmoid" else r


def reference_mod(layer: MixtureOfDepths, x_BSD, mask_BS=None):
    """Per-sequence loop from the paper's definition: stable descending sort of ``w·x`` (padding
    last), the first K positions, ascending, through the block; others untouched."""
    B, S, D = x_BSD.shape
    K = capacity_tokens(layer.capacity, S)
    r_BS = (x_BSD.double() @ layer.router.weight.double().T).squeeze(-1)
    y = x_BSD.clone()
    sel = torch.zeros(B, S, dtype=torch.bool)
    for b in range(B):
        r = r_BS[b] if mask_BS is None else r_BS[b].masked_fill(~mask_BS[b], -math.inf)
        pos = torch.sort(r, descending=True, stable=True).indices[:K].sort().values
        upd = layer.block(x_BSD[b, pos][None])[0]
        for j, s in enumerate(pos.tolist()):
            if mask_BS is None or mask_BS[b, s]:
                y[b, s] = x_BSD[b, s] + gate(layer, r_BS[b, s]).to(x_BSD.dtype) * upd[j]
                sel[b, s] = True
    return y, sel


@pytest.mark.parametrize("S,capacity,K", [(97, 0.125, 13), (30, 0.1, 3), (10, 0.3, 3), (1, 0.5, 1),
                                          (8, 1.0, 8), (7, 0.01, 1)])
def test_exactly_ceil_cT_tokens_processed(S, capacity, K):
    torch.manual_seed(0)
    D = 12
    layer = MixtureOfDepths(CausalMix(D), d_model=D, capacity=capacity)
    x = torch.randn(3, S, D)
    layer(x)
    assert capacity_tokens(capacity, S) == K
    assert layer.block.shapes == [(3, K, D)]
    assert layer.last_selected.shape == (3, S) and layer.last_selected.dtype == torch.bool
    assert layer.last_selected.sum(1).tolist() == [K] * 3
    assert layer.last_stats.processed_per_sequence.tolist() == [K] * 3


@pytest.mark.parametrize("score_activation", ["sigmoid", "none"])
def test_equals_reference_loop_and_skipped_tokens_unchanged(score_activation):
    torch.manual_seed(1)
    D, S = 16, 23
    layer = MixtureOfDepths(CausalMix(D), d_model=D, capacity=0.25, score_activation=score_activation)
    x = torch.randn(4, S, D)
    y = layer(x)
    y_ref, sel_ref = reference_mod(layer, x)
    assert torch.equal(layer.last_selected, sel_ref)
    assert torch.equal(y[~sel_ref], x[~sel_ref])                      # skipped: bit-for-bit the input
    torch.testing.assert_close(y, y_ref, atol=1e-6, rtol=1e-5)
    assert not torch.equal(y[sel_ref], x[sel_ref])


def test_ties_go_to_the_earlier_position():
    D = 4
    layer = MixtureOfDepths(CausalMix(D), d_model=D, capacity=0.5)
    x = torch.ones(1, 6, D)                                             # every score equal
    layer(x)
    assert layer.last_selected[0].tolist() == [True, True, True, False, False, False]


@pytest.mark.parametrize("score_activation", ["sigmoid", "none"])
def test_capacity_one_is_the_plain_block_with_score_scaling(score_activation):
    torch.manual_seed(2)
    D, S = 8, 11
    layer = MixtureOfDepths(CausalMix(D), d_model=D, capacity=1.0, score_activation=score_activation)
    x1 = torch.randn(2, S, D, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    y = layer(x1)
    assert layer.last_selected.all()
    r = layer.router(x2).squeeze(-1)
    y_ref = x2 + gate(layer, r)[..., None] * layer.block(x2)
    torch.testing.assert_close(y, y_ref, atol=1e-6, rtol=1e-5)
    g = torch.randn_like(y)
    grads = torch.autograd.grad((y * g).sum(), [x1, layer.router.weight, layer.block.lin.weight])
    grads_ref = torch.autograd.grad((y_ref * g).sum(), [x2, layer.router.weight, layer.block.lin.weight])
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_router_learns_through_the_score_and_predictor_is_stop_gradient():
    torch.manual_seed(3)
    D = 8
    layer = MixtureOfDepths(CausalMix(D), d_model=D, capacity=0.5, predictor=True, aux_loss_coef=1.0)
    x = torch.randn(2, 9, D, requires_grad=True)
    y = layer(x)
    gr, gp = torch.autograd.grad(y.sum(), [layer.router.weight, layer.predictor[0].weight], allow_unused=True)
    assert gr is not None and gr.abs().sum() > 0
    assert gp is None                                                   # the output never reaches the predictor
    # The predictor's BCE trains the predictor only: no gradient to the router or to x.
    gr, gp, gx = torch.autograd.grad(layer.aux_loss, [layer.router.weight, layer.predictor[0].weight, x],
                                     allow_unused=True)
    assert gr is None and gx is None and gp.abs().sum() > 0


def test_router_bce_without_predictor_trains_the_router():
    torch.manual_seed(4)
    D = 8
    layer = MixtureOfDepths(CausalMix(D), d_model=D, capacity=0.25, predictor=False, aux_loss_coef=1.0)
    assert layer.predictor is None
    x = torch.randn(2, 12, D)
    layer(x)
    r = layer.router(x).squeeze(-1)
    target = layer.last_selected.float()
    torch.testing.assert_close(layer.aux_loss, F.binary_cross_entropy_with_logits(r, target))
    (g,) = torch.autograd.grad(layer.aux_loss, [layer.router.weight])
    assert g.abs().sum() > 0


def test_aux_loss_is_bce_of_predictor_against_topk_membership():
    torch.manual_seed(5)
    D = 6
    layer = MixtureOfDepths(CausalMix(D), d_model=D, capacity=0.4, aux_loss_coef=0.3)
    x = torch.randn(3, 10, D)
    layer(x)
    logits = layer.predictor(x).squeeze(-1)
    target = layer.last_selected.float()
    torch.testing.assert_close(layer.aux_loss, 0.3 * F.binary_cross_entropy_with_logits(logits, target))
    acc = ((logits > 0) == layer.last_selected).float().mean()
    torch.testing.assert_close(layer.last_stats.decision_accuracy, acc)
    off = MixtureOfDepths(CausalMix(D), d_model=D, capacity=0.4, aux_loss_coef=0.0)
    off(x)
    assert off.aux_loss.item() == 0.0


def test_predictor_learns_the_topk_rule():
    """Training the predictor alone on its BCE makes its causal decisions agree with top-K."""
    torch.manual_seed(6)
    D = 8
    layer = MixtureOfDepths(CausalMix(D), d_model=D, capacity=0.5, aux_loss_coef=1.0)
    opt = torch.optim.Adam(layer.predictor.parameters(), lr=1e-2)
    x_eval = torch.randn(16, 32, D)
    layer(x_eval)
    before = layer.last_stats.decision_accuracy.item()
    for _ in range(150):
        layer(torch.randn(16, 32, D))
        opt.zero_grad()
        layer.aux_loss.backward()
        opt.step()
    layer(x_eval)
    after = layer.last_stats.decision_accuracy.item()
    assert after > 0.85 and after > before + 0.1, (before, after)


@pytest.mark.parametrize("predictor", [True, False])
def test_causal_decisions_follow_the_per_token_rule_and_prefixes_agree(predictor):
    torch.manual_seed(7)
    D, S = 10, 19
    layer = MixtureOfDepths(CausalMix(D), d_model=D, capacity=0.25, predictor=predictor)
    with torch.no_grad():                                               # a mix of decisions, not all one way
        (layer.predictor[-1] if predictor else layer.router).weight.mul_(20)
    x = torch.randn(3, S, D)
    y = layer(x, causal=True)
    sel = layer.last_selected
    rule = layer.predictor(x).squeeze(-1) > 0 if predictor else torch.sigmoid(layer.router(x).squeeze(-1)) > 0.5
    assert torch.equal(sel, rule)
    assert 0 < sel.sum() < sel.numel() and len(set(sel.sum(1).tolist())) > 1
    assert layer.aux_loss.item() == 0 and layer.last_stats.decision_accuracy is None
    # The reference: each sequence's chosen tokens, ascending, through the block; the rest untouched.
    r = layer.router(x).squeeze(-1)
    for b in range(3):
        pos = sel[b].nonzero().squeeze(1)
        y_b = x[b].clone()
        if pos.numel():
            y_b[pos] += gate(layer, r[b, pos])[:, None] * layer.block(x[b, pos][None])[0]
        torch.testing.assert_close(y[b], y_b, atol=1e-6, rtol=1e-5)
    # A prefix decides its tokens as the full sequence did, and (causal block) computes the same.
    for p in (1, 7, S - 1):
        y_p = layer(x[:, :p], causal=True)
        assert torch.equal(layer.last_selected, sel[:, :p])
        torch.testing.assert_close(y_p, y[:, :p], atol=1e-6, rtol=1e-5)


def test_causal_pass_with_nothing_selected_is_identity():
    D = 4
    layer = MixtureOfDepths(CausalMix(D), d_model=D, capacity=0.5, predictor=False)
    with torch.no_grad():
        layer.router.weight.zero_()                                     # σ(0) = 0.5, not > 0.5
    x = torch.randn(2, 5, D)
    y = layer(x, causal=True)
    assert torch.equal(y, x) and not layer.last_selected.any() and layer.block.shapes == []


def test_padding_is_never_selected_and_never_leaks():
    torch.manual_seed(8)
    D, S = 8, 12
    layer = MixtureOfDepths(CausalMix(D), d_model=D, capacity=0.25)     # K = 3
    x = torch.randn(3, S, D)
    mask = torch.ones(3, S, dtype=torch.bool)
    mask[0, 8:] = False                                                 # 8 valid ≥ K
    mask[1, :2] = False                                                 # left padding
    mask[2, 2:] = False                                                 # 2 valid < K: both processed
    y = layer(x, mask=mask)
    sel = layer.last_selected
    assert not (sel & ~mask).any()
    assert sel.sum(1).tolist() == [3, 3, 2] and sel[2, :2].all()
    assert torch.equal(y[~mask], x[~mask])
    y_ref, sel_ref = reference_mod(layer, x, mask)
    assert torch.equal(sel, sel_ref)
    torch.testing.assert_close(y, y_ref, atol=1e-6, rtol=1e-5)
    # Rows with at least K valid tokens do not depend on what sits in their padding.
    x2 = x.clone()
    x2[~mask] = 1e3
    y2 = layer(x2, mask=mask)
    torch.testing.assert_close(y2[:2][mask[:2]], y[:2][mask[:2]])
    torch.testing.assert_close(layer.last_stats.processed_fraction, torch.tensor(8 / mask.sum().item()))
    # The causal rule never picks padding either.
    layer(x, mask=mask, causal=True)
    assert not (layer.last_selected & ~mask).any()


def test_mixture_of_depths_with_moe_block_mode():
    """MoDE: an MoE FFN as the block; the inner layer's aux loss still reaches moekit.aux_loss."""
    torch.manual_seed(9)
    D = 16
    moe = moekit.MoE(d_model=D, num_experts=4, top_k=2, d_hidden=8, aux_loss_coef=0.01)
    layer = MixtureOfDepths(moe, d_model=D, capacity=0.25)
    model = nn.Sequential(layer)
    x = torch.randn(2, 16, D)
    y = model(x)
    assert isinstance(layer, MoELayer) and len(moekit.moe_layers(model)) == 2
    assert int(moe.last_stats.tokens_per_expert.sum()) == 2 * 4 * 2     # B · K · top_k pairs
    torch.testing.assert_close(moekit.aux_loss(model), layer.aux_loss + moe.aux_loss)
    y_ref, _ = reference_mod(layer, x)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-4)
    moekit.aux_loss(model).backward()
    assert moe.router.weight.grad.abs().sum() > 0                       # the inner balancing loss trains
    assert layer.predictor[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_dtypes_round_trip(dtype):
    torch.manual_seed(10)
    D = 8
    layer = MixtureOfDepths(CausalMix(D), d_model=D, capacity=0.5).to(dtype)
    x = torch.randn(2, 6, D, dtype=dtype)
    y = layer(x)
    assert y.dtype == dtype and layer.last_selected.sum(1).tolist() == [3, 3]
    assert torch.equal(y[~layer.last_selected], x[~layer.last_selected])
    assert torch.isfinite(layer.aux_loss)


def test_mod_bad_arguments_raise():
    blk = CausalMix(4)
    for kwargs, err in [(dict(capacity=0.0), ValueError), (dict(capacity=1.5), ValueError),
                        (dict(capacity=float("nan")), ValueError), (dict(capacity="half"), TypeError),
                        (dict(capacity=0.5, d_model=0), ValueError), (dict(capacity=0.5, predictor=1), TypeError),
                        (dict(capacity=0.5, score_activation="relu"), ValueError),
                        (dict(capacity=0.5, predictor=False, predictor_hidden=4), ValueError),
                        (dict(capacity=0.5, aux_loss_coef=-1.0), ValueError)]:
        kw = dict(d_model=4) | kwargs
        with pytest.raises(err):
            MixtureOfDepths(blk, **kw)
    with pytest.raises(TypeError, match="block"):
        MixtureOfDepths(lambda x: x, d_model=4, capacity=0.5)
    layer = MixtureOfDepths(blk, d_model=4, capacity=0.5)
    with pytest.raises(ValueError, match="d_model=4"):
        layer(torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match=r"\(B, S, 4\)"):
        layer(torch.randn(3, 4))
    with pytest.raises(ValueError, match="float"):
        layer(torch.ones(2, 3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="mask"):
        layer(torch.randn(2, 3, 4), mask=torch.ones(2, 3))
    with pytest.raises(TypeError, match="causal"):
        layer(torch.randn(2, 3, 4), causal=1)
    bad = MixtureOfDepths(nn.Linear(4, 3), d_model=4, capacity=0.5)
    with pytest.raises(ValueError, match="block must map"):
        bad(torch.randn(2, 3, 4))


# ---------------------------------------------------------------------------------------------
# Early exits (CC2)

class Counting(nn.Module):
    """A block that records how many samples it was run on."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.seen = inner, []

    def forward(self, h):
        self.seen.append(h.shape[0])
        return self.inner(h)


def make_early_exit(*, L=4, D=12, C=5, exit_after=None, criterion="confidence", threshold=0.9, scale=1.0,
                    exit_weights=None, seed=0):
    torch.manual_seed(seed)
    blocks = [Counting(nn.Sequential(nn.Linear(D, D), nn.Tanh())) for _ in range(L)]
    X = L if exit_after is None else len(exit_after)
    heads = [nn.Linear(D, C) for _ in range(X)]
    with torch.no_grad():
        for i, h in enumerate(heads):
            h.weight.mul_(scale * (i + 1))                             # later exits more confident
    return EarlyExit(blocks, heads, exit_after=exit_after, criterion=criterion, threshold=threshold,
                     exit_weights=exit_weights).double().eval()


def reference_exits(ee: EarlyExit, x, threshold):
    """Run every head on the whole batch; each sample takes the first exit it passes."""
    with torch.no_grad():
        all_z = ee.forward_all(x)
    X = len(all_z)
    depth = torch.full((x.shape[0],), X - 1, dtype=torch.long)
    for b in range(x.shape[0]):
        for i, z in enumerate(all_z[:-1]):
            p = torch.softmax(z[b].double(), -1)
            score = p.max() if ee.criterion == "confidence" else -(p * p.log()).sum()
            if (score > threshold) if ee.criterion == "confidence" else (score < threshold):
                depth[b] = i
                break
    out = torch.stack([all_z[d][b] for b, d in enumerate(depth.tolist())])
    return out, depth, all_z


@pytest.mark.parametrize("criterion,threshold,expect", [("confidence", 0.0, "first"), ("confidence", 1.01, "last"),
                                                        ("confidence", 1.0, "last"), ("entropy", 0.0, "last"),
                                                        ("entropy", math.log(5) + 0.1, "first")])
def test_threshold_extremes(criterion, threshold, expect):
    ee = make_early_exit(criterion=criterion, threshold=threshold)
    x = torch.randn(9, 12, dtype=torch.float64)
    with torch.no_grad():
        z = ee(x)
        all_z = ee.forward_all(x)
    want = 0 if expect == "first" else len(ee.heads) - 1
    assert ee.last_exit_depth.tolist() == [want] * 9 and ee.last_exit_depth.dtype == torch.long
    assert torch.equal(z, all_z[want])


@pytest.mark.parametrize("criterion", ["confidence", "entropy"])
@pytest.mark.parametrize("exit_after", [None, [1, 2, 5]])
def test_per_sample_depth_equals_reference_and_exited_samples_skip_blocks(criterion, exit_after):
    L = 4 if exit_after is None else 6
    ee = make_early_exit(L=L, exit_after=exit_after, criterion=criterion, scale=3.0, seed=1)
    x = torch.randn(64, 12, dtype=torch.float64)
    # A threshold between the two middle scores of the first exit, so samples spread over the exits.
    with torch.no_grad():
        s0 = exit_scores(ee.forward_all(x)[0], criterion).sort().values
    threshold = (s0[31] + s0[32]).item() / 2
    for blk in ee.blocks:
        blk.seen.clear()
    with torch.no_grad():
        z = ee(x, threshold=threshold)
    depth = ee.last_exit_depth.clone()
    seen = [list(b.seen) for b in ee.blocks]
    z_ref, depth_ref, _ = reference_exits(ee, x, threshold)
    assert torch.equal(depth, depth_ref)
    assert len(set(depth.tolist())) >= 2
    torch.testing.assert_close(z, z_ref, atol=1e-12, rtol=1e-12)
    # Block j ran only on the samples whose exit follows it.
    exits = torch.tensor(ee.exit_after)
    for j, s in enumerate(seen):
        active = int((exits[depth] >= j).sum())
        assert s == ([active] if active else []), (j, s, active)


def test_hidden_states_with_trailing_dims_and_training_mode():
    torch.manual_seed(2)
    D, C = 6, 3

    class PoolHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(D, C)

        def forward(self, h_BSD):
            return self.lin(h_BSD.mean(1))

    blocks = [nn.Linear(D, D) for _ in range(3)]
    ee = EarlyExit(blocks, [PoolHead(), PoolHead()], exit_after=[0, 2], threshold=0.5, exit_weights=[0.3, 1.0])
    x = torch.randn(5, 7, D)
    logits = ee(x)                                                      # training mode: every exit
    assert isinstance(logits, list) and [z.shape for z in logits] == [(5, C), (5, C)]
    target = torch.randint(0, C, (5,))
    loss = ee.loss(logits, target)
    torch.testing.assert_close(loss, 0.3 * F.cross_entropy(logits[0], target) + F.cross_entropy(logits[1], target))
    loss.backward()
    assert all(p.grad is not None for p in ee.parameters())
    mse = ee.loss(logits, torch.zeros(5, C), loss_fn=F.mse_loss)
    torch.testing.assert_close(mse, 0.3 * F.mse_loss(logits[0], torch.zeros(5, C)) + F.mse_loss(logits[1],
                                                                                                torch.zeros(5, C)))
    z = ee(x, early_exit=True, threshold=0.0)
    assert z.shape == (5, C) and ee.last_exit_depth.tolist() == [0] * 5
    ee.eval()
    z = ee(x)
    assert isinstance(z, torch.Tensor) and z.shape == (5, C)
    assert isinstance(ee(x, early_exit=False), list)


def test_early_exit_collects_inner_moe_aux_losses():
    torch.manual_seed(3)
    D = 8
    blocks = [moekit.MoE(d_model=D, num_experts=4, top_k=2, d_hidden=8) for _ in range(2)]
    ee = EarlyExit(blocks, [nn.Linear(D, 3), nn.Linear(D, 3)])
    ee.forward_all(torch.randn(6, D))
    torch.testing.assert_close(moekit.aux_loss(ee), blocks[0].aux_loss + blocks[1].aux_loss)


def test_early_exit_bad_arguments_raise():
    D = 4
    b = [nn.Linear(D, D) for _ in range(3)]
    h = [nn.Linear(D, 2) for _ in range(3)]
    cases = [(dict(blocks=[], heads=h), ValueError), (dict(blocks=b, heads=h[:2]), ValueError),
             (dict(blocks=nn.Linear(D, D), heads=h), TypeError), (dict(blocks=b, heads=[nn.Linear(D, 2), 3, 4]),
                                                                  TypeError),
             (dict(blocks=b, heads=h[:2], exit_after=[1, 1]), ValueError),
             (dict(blocks=b, heads=h[:2], exit_after=[0, 1]), ValueError),
             (dict(blocks=b, heads=h[:2], exit_after=[0, 3]), ValueError),
             (dict(blocks=b, heads=h[:2], exit_after=[0.0, 2]), TypeError),
             (dict(blocks=b, heads=h, exit_weights=[1, -1, 1]), ValueError),
             (dict(blocks=b, heads=h, exit_weights=[0, 0, 0]), ValueError),
             (dict(blocks=b, heads=h, exit_weights=[1, 1]), ValueError),
             (dict(blocks=b, heads=h, criterion="margin"), ValueError),
             (dict(blocks=b, heads=h, threshold=-0.1), ValueError),
             (dict(blocks=b, heads=h, threshold=float("nan")), ValueError)]
    for kwargs, err in cases:
        with pytest.raises(err):
            EarlyExit(**kwargs)
    ee = EarlyExit(b, h)
    with pytest.raises(ValueError, match="threshold applies"):
        ee(torch.randn(2, D), threshold=0.5)                            # training mode returns every exit
    with pytest.raises(ValueError, match="threshold"):
        ee(torch.randn(2, D), early_exit=True, threshold=-1.0)
    with pytest.raises(TypeError, match="early_exit"):
        ee(torch.randn(2, D), early_exit="yes")
    with pytest.raises(ValueError, match="logits"):
        ee.loss([torch.randn(2, 2)], torch.zeros(2, dtype=torch.long))
    bad = EarlyExit([nn.Linear(D, D)], [nn.Identity()])
    with pytest.raises(ValueError, match=r"heads\[0\]"):
        bad(torch.randn(2, 3, D), early_exit=True)
    mixed = EarlyExit([nn.Linear(D, D), nn.Linear(D, D)], [nn.Linear(D, 2), nn.Linear(D, 3)], threshold=2.0)
    with pytest.raises(ValueError, match="same number of classes"):
        mixed(torch.randn(2, D), early_exit=True)
