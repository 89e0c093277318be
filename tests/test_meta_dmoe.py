"""METHODS.md M3 (Meta-DMoE, Zhong et al. 2022): the experts stay frozen through meta-training; the
inner loop reads no labels (it is exactly SGD on the feature distillation loss); the aggregator is
invariant to the order of the experts (as designed: no positions, mean pooling) and a masked
expert has no influence; the second-order meta-gradient reaches the aggregator."""
import copy
import inspect

import pytest
import torch
from torch import nn

from moekit.meta import ExpertAggregator, MetaDMoE, meta_train_dmoe


def _mlp(x=6, d=8):
    return nn.Sequential(nn.Linear(x, 16), nn.ReLU(), nn.Linear(16, d))


def _model(E=3, **kw):
    torch.manual_seed(0)
    return MetaDMoE([_mlp() for _ in range(E)], _mlp(), nn.Linear(8, 3), d_model=8, num_heads=2, **kw)


def test_aggregator_is_invariant_to_expert_order_and_ignores_masked_experts():
    torch.manual_seed(0)
    agg = ExpertAggregator(8, num_heads=2, num_layers=2)
    f = torch.randn(5, 4, 8)
    out = agg(f)
    for perm in ([3, 1, 0, 2], [1, 0, 3, 2]):
        torch.testing.assert_close(agg(f[:, perm]), out, rtol=1e-5, atol=1e-6)
    keep = torch.tensor([True, False, True, True])
    masked = agg(f, keep)
    g = f.clone()
    g[:, 1] = 100 * torch.randn(5, 8)               # the masked expert's features do not matter
    torch.testing.assert_close(agg(g, keep), masked, rtol=0, atol=0)
    torch.testing.assert_close(masked, agg(f[:, [0, 2, 3]]), rtol=1e-5, atol=1e-6)   # = dropping it
    assert not torch.allclose(masked, out)
    with pytest.raises(ValueError, match="keep at least one"):
        agg(f, torch.zeros(4, dtype=torch.bool))


def test_inner_loop_reads_no_labels_and_is_sgd_on_the_distillation_loss():
    m = _model(inner_lr=0.3, inner_steps=2)
    assert "y" not in "".join(inspect.signature(m.adapt).parameters)
    x = torch.randn(10, 6)
    params = m.adapt(x, exclude=1)
    # the same two steps by hand, on MSE(student(x), aggregator(experts, expert 1 masked))
    ref = copy.deepcopy(m.student)
    target = m.aggregator(torch.stack([e(x) for e in m.experts], 1), torch.tensor([True, False, True])).detach()
    opt = torch.optim.SGD(ref.parameters(), lr=0.3)
    for _ in range(2):
        opt.zero_grad()
        nn.functional.mse_loss(ref(x), target).backward()
        opt.step()
    for k, p in ref.named_parameters():
        torch.testing.assert_close(params[k], p, rtol=1e-5, atol=1e-6)
    # the query labels enter only the outer loss: permuting them changes the loss, not the adaptation
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    l1, l2 = m.meta_loss(x, x, y), m.meta_loss(x, x, y.roll(1))
    assert not torch.isclose(l1, l2)


def test_experts_frozen_through_meta_training_and_the_aggregator_gets_a_meta_gradient():
    m = _model()
    snap = copy.deepcopy(m.experts.state_dict())
    agg0 = copy.deepcopy(m.aggregator.state_dict())
    g = torch.Generator().manual_seed(1)

    def episode():
        x = torch.randn(16, 6, generator=g)
        return x[:8], x[8:], (x[8:, 0] > 0).long(), int(torch.randint(3, (1,), generator=g))

    losses = meta_train_dmoe(m, episode, steps=5, lr=1e-2)
    assert len(losses) == 5 and all(l == l for l in losses)
    assert all(torch.equal(v, snap[k]) for k, v in m.experts.state_dict().items())
    assert not any(p.requires_grad for p in m.experts.parameters()) and not m.experts.training
    assert any(not torch.equal(v, agg0[k]) for k, v in m.aggregator.state_dict().items())
    # first order: no path from the query loss to the aggregator
    fo = _model(first_order=True)
    fo.train()
    fo.meta_loss(torch.randn(8, 6), torch.randn(8, 6), torch.zeros(8, dtype=torch.long)).backward()
    assert all(p.grad is None or not p.grad.any() for p in fo.aggregator.parameters())
    so = _model()
    so.train()
    so.meta_loss(torch.randn(8, 6), torch.randn(8, 6), torch.zeros(8, dtype=torch.long)).backward()
    assert any(p.grad is not None and p.grad.any() for p in so.aggregator.parameters())


def test_zero_inner_steps_is_the_unadapted_student_and_bad_arguments():
    m = _model(inner_steps=0)
    x = torch.randn(4, 6)
    torch.testing.assert_close(m.adapt_and_predict(x), m.classifier(m.student(x)), rtol=0, atol=0)
    with pytest.raises(ValueError, match="exclude"):
        _model().teacher_signal(x, exclude=3)
    with pytest.raises(ValueError, match="divisible"):
        ExpertAggregator(6, num_heads=4)
    with pytest.raises(ValueError, match="experts must hold"):
        MetaDMoE([], _mlp(), nn.Linear(8, 3), d_model=8)
