"""Balancing losses: values at perfect balance, hand-computed cases, masks, gradients."""
import math

import pytest
import torch

from moekit import losses


def test_switch_loss_is_one_at_perfect_balance_and_E_when_collapsed():
    E, T = 4, 8
    probs = torch.full((T, E), 1 / E)
    counts = torch.full((E,), T // E)
    assert losses.load_balancing_loss(probs, counts, 1).item() == pytest.approx(1.0)
    probs = torch.zeros(T, E)
    probs[:, 2] = 1
    counts = torch.tensor([0, 0, T, 0])
    assert losses.load_balancing_loss(probs, counts, 1).item() == pytest.approx(E)


def test_switch_loss_hand_computed_and_grad_through_probs_only():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]], requires_grad=True)
    counts = torch.tensor([2, 1, 1])            # top-2 of both tokens: {0,1} and {1,2}... hand-made counts
    loss = losses.load_balancing_loss(probs, counts, 2)
    f = torch.tensor([0.5, 0.25, 0.25])
    P = torch.tensor([0.4, 0.4, 0.2])
    assert loss.item() == pytest.approx(3 * float((f * P).sum()))
    loss.backward()
    torch.testing.assert_close(probs.grad, (3 * f / 2).expand(2, 3))


def test_switch_loss_mask_excludes_padding():
    probs = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    mask = torch.tensor([True, True, False])
    counts = torch.tensor([1, 1])
    assert losses.load_balancing_loss(probs, counts, 1, mask=mask).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="counts_E"):
        losses.load_balancing_loss(probs, torch.tensor([1, 1, 1]), 1)


def test_z_loss_value_and_mask():
    logits = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    lse = torch.logsumexp(logits, -1)
    assert losses.z_loss(logits).item() == pytest.approx(float(lse.square().mean()))
    assert losses.z_loss(logits, mask=torch.tensor([True, False])).item() == pytest.approx(math.log(2) ** 2)


def test_importance_and_load_losses_zero_when_uniform():
    gates = torch.full((6, 3), 1 / 3)
    assert losses.importance_loss(gates).item() == pytest.approx(0.0, abs=1e-7)
    assert losses.load_loss(gates).item() == pytest.approx(0.0, abs=1e-7)
    skew = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    # Importance (2, 0): var = 1, mean² = 1.
    assert losses.importance_loss(skew).item() == pytest.approx(1.0)
    assert losses.importance_loss(skew, mask=torch.tensor([True, False])).item() == pytest.approx(1.0)


def test_sequence_balance_loss():
    # Two sequences of 2 tokens, E=2, K=1: balanced inside each sequence -> 1.
    probs = torch.tensor([[0.5, 0.5]] * 4)
    topk = torch.tensor([[0], [1], [1], [0]])
    assert losses.sequence_balance_loss(probs, topk, seq_len=2).item() == pytest.approx(1.0)
    # Globally balanced but each sequence collapsed: f = (2, 0) in seq 1 with P = (1, 0) -> 2.
    probs = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    topk = torch.tensor([[0], [0], [1], [1]])
    assert losses.sequence_balance_loss(probs, topk, seq_len=2).item() == pytest.approx(2.0)
    assert losses.load_balancing_loss(probs, torch.tensor([2, 2]), 1).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="seq_len"):
        losses.sequence_balance_loss(probs, topk, seq_len=3)


def test_router_entropy():
    p = torch.full((3, 4), 0.25)
    assert losses.router_entropy(p).item() == pytest.approx(math.log(4))


def test_bias_update_sign_rule():
    b = torch.zeros(4)
    load = torch.tensor([10.0, 2.0, 4.0, 4.0])
    nb = losses.bias_update(b, load, rate=0.1)
    torch.testing.assert_close(nb, torch.tensor([-0.1, 0.1, 0.1, 0.1]))
    assert torch.equal(b, torch.zeros(4))                  # pure
    with pytest.raises(ValueError):
        losses.bias_update(b, torch.zeros(3))


# ---------------------------------------------------------------------------------------------
# Bad arguments: every public loss names the argument (shapes, dtypes, masks, top_k vs counts)
T_, E_, K_ = 6, 4, 2
_g = torch.Generator().manual_seed(0)
PROBS = torch.softmax(torch.randn(T_, E_, generator=_g), -1)
IDS = torch.topk(PROBS, K_).indices
COUNTS = torch.bincount(IDS.reshape(-1), minlength=E_)
MASK = torch.tensor([True, True, False, True, True, True])


def _routing(**over):
    from moekit.routing import Routing

    kw = dict(token_ids=torch.arange(T_).repeat_interleave(K_), expert_ids=IDS.reshape(-1),
              weights=torch.full((T_ * K_,), 0.5), logits=PROBS.log(), dropped=torch.zeros((), dtype=torch.long),
              num_experts=E_, probs=PROBS, topk_ids=IDS)
    kw.update(over)
    return Routing(**kw)


BAD = {
    # load_balancing_loss
    "lbl probs 1-D": (lambda: losses.load_balancing_loss(PROBS[0], COUNTS, K_), ValueError, "probs_TE"),
    "lbl probs 3-D": (lambda: losses.load_balancing_loss(PROBS[None], COUNTS, K_), ValueError, "probs_TE"),
    "lbl probs int": (lambda: losses.load_balancing_loss(IDS, COUNTS[:2], K_), ValueError, "probs_TE"),
    "lbl probs list": (lambda: losses.load_balancing_loss(PROBS.tolist(), COUNTS, K_), TypeError, "probs_TE"),
    "lbl probs no experts": (lambda: losses.load_balancing_loss(PROBS[:, :0], COUNTS[:0], K_), ValueError, "probs_TE"),
    "lbl counts short": (lambda: losses.load_balancing_loss(PROBS, COUNTS[:3], K_), ValueError, "counts_E"),
    "lbl counts 2-D": (lambda: losses.load_balancing_loss(PROBS, COUNTS[None], K_), ValueError, "counts_E"),
    "lbl counts bool": (lambda: losses.load_balancing_loss(PROBS, COUNTS > 2, K_), ValueError, "counts_E"),
    "lbl counts list": (lambda: losses.load_balancing_loss(PROBS, COUNTS.tolist(), K_), TypeError, "counts_E"),
    "lbl counts negative": (lambda: losses.load_balancing_loss(PROBS, torch.tensor([8, 6, -2, 0]), K_),
                            ValueError, "counts_E must be >= 0"),
    "lbl top_k 0": (lambda: losses.load_balancing_loss(PROBS, COUNTS, 0), ValueError, "top_k"),
    "lbl top_k bool": (lambda: losses.load_balancing_loss(PROBS, COUNTS, True), TypeError, "top_k"),
    "lbl top_k float": (lambda: losses.load_balancing_loss(PROBS, COUNTS, 2.0), TypeError, "top_k"),
    "lbl top_k contradicts counts": (lambda: losses.load_balancing_loss(PROBS, COUNTS, 1), ValueError,
                                     r"counts_E must sum to .* top_k = 6 · 1 = 6 .*got 12"),
    "lbl counts include padding": (lambda: losses.load_balancing_loss(PROBS, COUNTS, K_, mask=MASK), ValueError,
                                   r"counts_E must sum to .* = 5 · 2 = 10"),
    "lbl mask length 1": (lambda: losses.load_balancing_loss(PROBS, COUNTS, K_, mask=MASK[:1]), ValueError,
                          r"mask must have shape \(6,\)"),
    "lbl mask long": (lambda: losses.load_balancing_loss(PROBS, COUNTS, K_, mask=torch.ones(7, dtype=torch.bool)),
                      ValueError, "mask"),
    "lbl mask float": (lambda: losses.load_balancing_loss(PROBS, COUNTS, K_, mask=MASK.float()), ValueError,
                       "mask must have dtype torch.bool"),
    "lbl mask 2-D": (lambda: losses.load_balancing_loss(PROBS, COUNTS, K_, mask=MASK[:, None]), ValueError, "mask"),
    "lbl mask list": (lambda: losses.load_balancing_loss(PROBS, COUNTS, K_, mask=MASK.tolist()), TypeError, "mask"),
    # z_loss
    "z logits 1-D": (lambda: losses.z_loss(PROBS[0]), ValueError, "logits_TE"),
    "z logits 3-D": (lambda: losses.z_loss(PROBS[None]), ValueError, "logits_TE"),
    "z logits int": (lambda: losses.z_loss(IDS), ValueError, "logits_TE"),
    "z mask length 1": (lambda: losses.z_loss(PROBS, mask=torch.tensor([True])), ValueError,
                        r"mask must have shape \(6,\)"),
    "z mask int": (lambda: losses.z_loss(PROBS, mask=MASK.long()), ValueError, "mask"),
    # importance / load / cv²
    "importance 1-D": (lambda: losses.importance_loss(PROBS[0]), ValueError, "gates_TE"),
    "importance mask": (lambda: losses.importance_loss(PROBS, mask=MASK[:4]), ValueError, "mask"),
    "load 3-D": (lambda: losses.load_loss(PROBS[None]), ValueError, "load_probs_TE"),
    "load mask": (lambda: losses.load_loss(PROBS, mask=MASK.float()), ValueError, "mask"),
    "cv 2-D": (lambda: losses.cv_squared(PROBS), ValueError, "x_E"),
    "cv bool": (lambda: losses.cv_squared(MASK), ValueError, "x_E"),
    "cv list": (lambda: losses.cv_squared([1.0, 2.0]), TypeError, "x_E"),
    "cv eps negative": (lambda: losses.cv_squared(COUNTS, eps=-1.0), ValueError, "eps"),
    "cv eps nan": (lambda: losses.cv_squared(COUNTS, eps=float("nan")), ValueError, "eps"),
    # sequence_balance_loss
    "seq ids short": (lambda: losses.sequence_balance_loss(PROBS, IDS[:5], seq_len=3), ValueError, "topk_ids_TK"),
    "seq ids 1-D": (lambda: losses.sequence_balance_loss(PROBS, IDS[:, 0], seq_len=3), ValueError, "topk_ids_TK"),
    "seq ids no slot": (lambda: losses.sequence_balance_loss(PROBS, IDS[:, :0], seq_len=3), ValueError, "topk_ids_TK"),
    "seq ids float": (lambda: losses.sequence_balance_loss(PROBS, IDS.float(), seq_len=3), ValueError, "topk_ids_TK"),
    "seq ids out of range": (lambda: losses.sequence_balance_loss(PROBS, IDS + E_, seq_len=3), ValueError,
                             r"topk_ids_TK must hold expert ids in \[0, 4\)"),
    "seq probs 1-D": (lambda: losses.sequence_balance_loss(PROBS[0], IDS, seq_len=3), ValueError, "probs_TE"),
    "seq seq_len 0": (lambda: losses.sequence_balance_loss(PROBS, IDS, seq_len=0), ValueError, "seq_len"),
    "seq seq_len float": (lambda: losses.sequence_balance_loss(PROBS, IDS, seq_len=3.0), TypeError, "seq_len"),
    "seq seq_len not dividing": (lambda: losses.sequence_balance_loss(PROBS, IDS, seq_len=4), ValueError, "seq_len"),
    "seq mask": (lambda: losses.sequence_balance_loss(PROBS, IDS, seq_len=3, mask=MASK[:1]), ValueError, "mask"),
    # router_entropy, selection_counts
    "entropy 1-D": (lambda: losses.router_entropy(PROBS[0]), ValueError, "probs_TE"),
    "entropy mask": (lambda: losses.router_entropy(PROBS, mask=MASK[:1]), ValueError, "mask"),
    "counts ids float": (lambda: losses.selection_counts(IDS.float(), E_), ValueError, "topk_ids_TK"),
    "counts num_experts 0": (lambda: losses.selection_counts(IDS, 0), ValueError, "num_experts"),
    "counts mask": (lambda: losses.selection_counts(IDS, E_, MASK[:1]), ValueError, "mask"),
    # balance_loss / balance_stats from a Routing
    "balance kind": (lambda: losses.balance_loss("nope", _routing()), ValueError, "kind"),
    "balance mask": (lambda: losses.balance_loss("switch", _routing(), mask=MASK[:1]), ValueError, "mask"),
    "balance seq_len": (lambda: losses.balance_loss("sequence", _routing(), seq_len=4), ValueError, "seq_len"),
    "balance topk short": (lambda: losses.balance_loss("switch", _routing(topk_ids=IDS[:5])), ValueError,
                           "routing.topk_ids"),
    "balance probs 3-D": (lambda: losses.balance_loss("switch", _routing(probs=PROBS[None])), ValueError,
                          "routing.probs"),
    "balance no gates": (lambda: losses.balance_loss("importance_load", _routing()), ValueError, "gates"),
    "stats statistics flag": (lambda: losses.balance_stats(_routing(), statistics=1), TypeError, "statistics"),
    "stats num_tokens": (lambda: losses.balance_stats(_routing(), num_tokens=-1), ValueError, "num_tokens"),
    "stats reducer shape": (lambda: losses.balance_stats(_routing(), balance="switch").reduce(lambda p: p[:1]),
                            ValueError, "reducer"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_arguments_raise_naming_the_argument(case):
    fn, exc, match = BAD[case]
    with pytest.raises(exc, match=match):
        fn()


def test_good_arguments_of_the_bad_cases_pass():
    """The valid counterparts of the cases above go through (the checks are not over-strict)."""
    losses.load_balancing_loss(PROBS, COUNTS, K_)
    losses.load_balancing_loss(PROBS.double(), COUNTS.float(), K_)
    losses.load_balancing_loss(PROBS, losses.selection_counts(IDS, E_, MASK), K_, mask=MASK)
    losses.z_loss(PROBS.half(), mask=MASK)
    losses.sequence_balance_loss(PROBS, IDS, seq_len=3, mask=MASK)
    losses.cv_squared(COUNTS)
    for kind in ("switch", "sequence", "none"):
        losses.balance_loss(kind, _routing(), mask=MASK, seq_len=3)


PUBLIC_LOSSES = {
    "load_balancing_loss": lambda m: losses.load_balancing_loss(PROBS, losses.selection_counts(IDS, E_, m), K_, mask=m),
    "z_loss": lambda m: losses.z_loss(PROBS.log(), mask=m),
    "importance_loss": lambda m: losses.importance_loss(PROBS, mask=m),
    "load_loss": lambda m: losses.load_loss(PROBS, mask=m),
    "sequence_balance_loss": lambda m: losses.sequence_balance_loss(PROBS, IDS, seq_len=3, mask=m),
    "router_entropy": lambda m: losses.router_entropy(PROBS, mask=m),
    "balance_loss switch": lambda m: losses.balance_loss("switch", _routing(), mask=m),
    "balance_loss sequence": lambda m: losses.balance_loss("sequence", _routing(), mask=m, seq_len=2),
    "balance_loss importance_load": lambda m: losses.balance_loss(
        "importance_load", _routing(extras={"gates": PROBS, "load_probs": PROBS}), mask=m),
}


@pytest.mark.parametrize("name", list(PUBLIC_LOSSES))
def test_all_false_mask_gives_zero_losses(name):
    loss = PUBLIC_LOSSES[name](torch.zeros(T_, dtype=torch.bool))
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert torch.isfinite(loss) and loss.item() == 0.0
    assert torch.isfinite(PUBLIC_LOSSES[name](MASK)).all()          # and a partial mask is a number too


@pytest.mark.parametrize("router", ["topk", "sigmoid", "noisy_topk", "top_p"])
def test_all_false_mask_gives_finite_zero_layer_losses_and_statistics(router):
    import moekit

    kw = {} if router == "top_p" else {"top_k": 2}
    moe = moekit.MoE(d_model=8, num_experts=4, d_hidden=8, router=router, aux_loss_coef=0.1, z_loss_coef=0.01, **kw)
    x = torch.randn(2, 3, 8, requires_grad=True)
    y = moe(x, mask=torch.zeros(2, 3, dtype=torch.bool))
    assert torch.equal(y, torch.zeros_like(y))
    assert torch.isfinite(moe.aux_loss) and moe.aux_loss.item() == 0.0
    (y.sum() + moe.aux_loss).backward()
    s = moe.last_stats
    assert s.num_tokens == 0 and int(s.dropped) == 0 and int(s.tokens_per_expert.sum()) == 0
    for name in ("drop_fraction", "router_entropy", "experts_per_token", "load_imbalance", "fraction_per_expert",
                 "mean_prob_per_expert"):
        v = getattr(s, name)
        assert torch.isfinite(v).all() and (v == 0).all(), name
