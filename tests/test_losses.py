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
