"""METHODS.md C2 completed: Lifelong-MoE routed by input (no task id at test time), grown with
frozen old experts and router rows, and its output-level KL regulariser (`distillation_kl`)."""
import copy

import pytest
import torch

from moekit.models.continual import (
    average_forgetting,
    dense_task_net,
    distillation_kl,
    start_task,
    task_moe_net,
    token_moe_net,
    train_sequentially,
    train_task,
)


def _shifted_tasks(T=3, n=200, d=10, seed=0):
    """T two-class tasks, each a linear rule on inputs around its own centre (routable by input)."""
    g = torch.Generator().manual_seed(seed)
    tasks = []
    for t in range(T):
        w, shift = torch.randn(d, generator=g), 3 * torch.randn(d, generator=g)
        x = torch.randn(2 * n, d, generator=g) + shift
        y = (((x - shift) @ w) > 0).long() + 2 * t
        tasks.append((x[:n], y[:n], x[n:], y[n:]))
    return tasks


def test_distillation_kl_matches_the_formula_and_vanishes_on_agreement():
    torch.manual_seed(0)
    s_BL, t_BL = torch.randn(7, 6, requires_grad=True), torch.randn(7, 6, requires_grad=True)
    cols, tau = [1, 3, 4], 2.5
    p = torch.softmax(t_BL[:, cols] / tau, -1)
    q = torch.softmax(s_BL[:, cols] / tau, -1)
    want = tau ** 2 * (p * (p.log() - q.log())).sum(-1).mean()
    got = distillation_kl(s_BL, t_BL, cols, temperature=tau)
    torch.testing.assert_close(got, want)
    got.backward()
    assert t_BL.grad is None and s_BL.grad[:, [0, 2, 5]].abs().sum() == 0 and s_BL.grad.abs().sum() > 0
    shifted = s_BL.detach() + 3.0                   # one constant per row: the same distribution
    assert distillation_kl(s_BL.detach(), shifted, cols).abs() < 1e-6
    with pytest.raises(ValueError, match="temperature"):
        distillation_kl(s_BL, t_BL, cols, temperature=0)
    with pytest.raises(ValueError, match=r"one shape \(B, L\)"):
        distillation_kl(s_BL, t_BL[:, :5], cols)
    with pytest.raises(ValueError, match="at least one"):
        distillation_kl(s_BL, t_BL, [])


def test_zero_kl_coefficient_is_the_plain_loss_bit_for_bit():
    tasks, tc = _shifted_tasks(T=2, n=64), [(0, 1), (2, 3)]
    kw = dict(epochs=2, batch_size=16, lr=1e-2)
    torch.manual_seed(0)
    a = token_moe_net(d_in=10, d_expert=4, num_experts=2, top_k=1, num_classes=4, task_classes=tc)
    b = copy.deepcopy(a)
    train_task(a, *tasks[1][:2], 1, **kw)
    train_task(b, *tasks[1][:2], 1, teacher=copy.deepcopy(b), kl_coef=0.0, **kw)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k


def test_token_routed_net_needs_no_task_id():
    torch.manual_seed(0)
    net = token_moe_net(d_in=10, d_expert=4, num_experts=3, top_k=2, num_classes=4, task_classes=[(0, 1), (2, 3)])
    x = torch.randn(9, 10)
    assert not net.routed
    assert torch.equal(net(x, 0), net(x, 1))


def test_growing_token_moe_freezes_old_parts_and_masking_new_rows_restores_old_routing():
    tasks, tc = _shifted_tasks(T=2), [(0, 1), (2, 3)]
    torch.manual_seed(0)
    net = token_moe_net(d_in=10, d_expert=4, num_experts=2, top_k=1, num_classes=4, task_classes=tc)
    train_task(net, *tasks[0][:2], 0, epochs=2, batch_size=32, lr=1e-2)
    before = copy.deepcopy(net).eval()
    n_before = sum(p.numel() for p in net.parameters())
    new = start_task(net, 1, experts_per_task=3)
    assert new == [2, 3, 4]
    per_expert = sum(p[0].numel() for p in net.body.experts.parameters())
    assert sum(p.numel() for p in net.parameters()) - n_before == 3 * (per_expert + 10)   # experts + router rows
    train_task(net, *tasks[1][:2], 1, epochs=3, batch_size=32, lr=1e-2, teacher=before, kl_coef=1.0)
    moe, old_moe = net.body, before.body
    for (name, p), p_old in zip(moe.named_parameters(), old_moe.parameters()):
        if p.shape[0] == moe.num_experts and name.startswith(("experts", "router")):
            assert torch.equal(p[:2], p_old), name          # frozen rows bit-identical
            assert not torch.equal(p[2:], torch.zeros_like(p[2:])), name
    # new router rows at −∞: the old experts are chosen with the old weights, the old body output
    x = torch.cat([t[2] for t in tasks])
    with torch.no_grad():
        moe.router.weight[2:] = 0
        y_old = old_moe(x)
        moe.router.weight[2:] = float("nan")            # never read when masked below
        logits_TE = torch.nn.functional.linear(x, moe.router.weight[:2])
        ids_T = logits_TE.argmax(-1)
        net.eval()
        y_masked = torch.stack([moe.experts[int(e)](x[i:i + 1])[0] for i, e in enumerate(ids_T)])
    torch.testing.assert_close(y_masked, y_old, rtol=1e-5, atol=1e-6)


def test_kl_teacher_must_route_by_input():
    tasks, tc = _shifted_tasks(T=2, n=32), [(0, 1), (2, 3)]
    net = task_moe_net(d_in=10, d_expert=4, num_experts=1, top_k=1, num_classes=4, task_classes=tc)
    teacher = copy.deepcopy(net)
    start_task(net, 1, experts_per_task=1)
    with pytest.raises(ValueError, match="route by input"):
        train_task(net, *tasks[1][:2], 1, epochs=1, batch_size=8, lr=1e-2, teacher=teacher, kl_coef=1.0)
    with pytest.raises(ValueError, match="needs a teacher"):
        train_task(net, *tasks[1][:2], 1, epochs=1, batch_size=8, lr=1e-2, kl_coef=1.0)


def test_output_kl_reduces_forgetting_of_a_dense_net():
    """LwF-style: the same KL on a dense body keeps old classes' outputs on the new inputs; when
    tasks share one input distribution (different labelling rules) that is where they are tested."""
    g = torch.Generator().manual_seed(1)
    tasks, tc = [], [(0, 1), (2, 3), (4, 5)]
    for t in range(3):
        w, x = torch.randn(10, generator=g), torch.randn(600, 10, generator=g)
        y = (x @ w > 0).long() + 2 * t
        tasks.append((x[:300], y[:300], x[300:], y[300:]))
    kw = dict(epochs=10, batch_size=50, lr=1e-2)
    out = {}
    for coef in (0.0, 4.0):
        torch.manual_seed(0)
        net = dense_task_net(d_in=10, d_hidden=16, num_classes=6, task_classes=tc)
        R, _ = train_sequentially(net, tasks, kl_coef=coef, **kw)
        out[coef] = average_forgetting(R)
    assert out[4.0] < 0.5 * out[0.0] and out[0.0] > 0.1     # measured 0.005 vs 0.258
