"""Continual learning: growing / freezing experts (`moekit.layers.grow`, re-exported by
`moekit.recipes`), the task-routed growing MoE and the CL metrics (`moekit.models.continual`).
The Split Fashion-MNIST study is `projects/continual_split_fmnist` (tests in tests/projects/)."""
import math

import pytest
import torch

import moekit
from moekit.layers.grow import add_experts, freeze_experts
from moekit.models.continual import (
    GrowingTaskRouter,
    accuracy_matrix,
    average_accuracy,
    average_forgetting,
    backward_transfer,
    dense_task_net,
    start_task,
    task_moe_net,
    train_sequentially,
)

EPS32 = torch.finfo(torch.float32).eps


def _expert_outputs_TE(moe, x_TD):
    """(T, D, E) every expert's output on every token, for error bounds."""
    return torch.stack([moe.experts[e](x_TD) for e in range(moe.num_experts)], -1)


def _assert_same_up_to_softmax_rounding(moe, x_TD, y_old, ids_old):
    """Same experts chosen; outputs within a few float32 ulps of the combine weights, times
    the experts' outputs (softmax over a wider row may round its last bit differently)."""
    y_new = moe(x_TD)
    r = moe.last_routing
    assert torch.equal(r.expert_ids, ids_old)
    bound = 4 * EPS32 * _expert_outputs_TE(moe, x_TD).abs().sum(-1) + 1e-7
    assert ((y_new - y_old).abs() <= bound).all()


@pytest.mark.parametrize("expert", ["mlp", "swiglu"])
def test_add_experts_keeps_outputs_when_new_rows_never_win(expert):
    torch.manual_seed(0)
    moe = moekit.MoE(d_model=20, num_experts=4, top_k=2, expert=expert, router_kwargs=dict(bias=True)).eval()
    x_TD = torch.randn(97, 20)
    with torch.no_grad():
        y_old = moe(x_TD)
        ids_old = moe.last_routing.expert_ids.clone()
        old = {k: v.clone() for k, v in moe.state_dict().items()}
        n_before = sum(p.numel() for p in moe.parameters())
        new = add_experts(moe, 3, router_rows=torch.randn(3, 20), router_bias=-1e4)
        _assert_same_up_to_softmax_rounding(moe, x_TD, y_old, ids_old)
    assert new == [4, 5, 6] and moe.num_experts == moe.router.num_experts == len(moe.experts) == 7
    for k, v in moe.state_dict().items():          # old rows copied, not re-initialised
        assert torch.equal(v[: old[k].shape[0]], old[k])
    per_expert = sum(p[0].numel() for p in moe.experts.parameters())
    assert sum(p.numel() for p in moe.parameters()) - n_before == 3 * (per_expert + 20 + 1)
    assert moe.experts.up_proj[4:].abs().sum() > 0 if expert == "mlp" else True     # fresh, not zero


def test_growing_task_router_hides_new_experts_from_old_tasks():
    torch.manual_seed(0)
    r = GrowingTaskRouter(8, 2, top_k=2, d_task=4)
    before = r.task_logits().clone()
    moe = moekit.MoE(d_model=8, num_experts=2, router=r, expert="mlp", d_hidden=4, aux_loss_coef=0.0)
    add_experts(moe, 2)
    assert r.add_task(prefer=[2, 3], margin=4.0) == 1
    L = r.task_logits()
    # Same dot products (a wider matmul may round the last bit differently); new experts hidden.
    torch.testing.assert_close(L[0, :2], before[0], rtol=4 * EPS32, atol=0)
    assert torch.isinf(L[0, 2:]).all()
    assert torch.allclose(L[1, 2:], torch.full((2,), 4.0))        # zero rows + margin
    assert sorted(r.task_experts(1)[0].tolist()) == [2, 3]


@pytest.mark.parametrize("opt_cls", [torch.optim.Adam, lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9)])
def test_frozen_experts_do_not_change_and_stay_frozen_after_growth(opt_cls):
    torch.manual_seed(0)
    moe = moekit.MoE(d_model=12, num_experts=4, top_k=4, router="topk", expert="mlp", d_hidden=8)
    assert freeze_experts(moe, [0, 2]) == (0, 2)
    add_experts(moe, 2, router_rows=torch.randn(2, 12))
    frozen = [0, 2]
    snap = [p.detach()[frozen].clone() for p in (moe.experts.up_proj, moe.experts.down_proj, moe.router.weight)]
    start = [p.detach().clone() for p in moe.parameters()]
    opt = opt_cls(moe.parameters()) if opt_cls is torch.optim.Adam else opt_cls(moe.parameters())
    for _ in range(3):
        moe(torch.randn(33, 12)).square().sum().backward()
        opt.step()
        opt.zero_grad()
    now = [p.detach()[frozen] for p in (moe.experts.up_proj, moe.experts.down_proj, moe.router.weight)]
    assert all(torch.equal(a, b) for a, b in zip(snap, now))
    assert all(not torch.equal(a, b.detach()) for a, b in zip(start, moe.parameters()))   # the rest learns


def test_recipes_reexport_the_layer_functions():
    import moekit.layers
    import moekit.recipes
    import moekit.recipes.grow
    assert moekit.recipes.add_experts is moekit.recipes.grow.add_experts is moekit.layers.add_experts is add_experts
    assert moekit.recipes.freeze_experts is moekit.recipes.grow.freeze_experts is freeze_experts


def test_train_task_uses_one_update_step_per_batch(monkeypatch):
    """`train_task` trains through moekit.optim.UpdateStep: ceil(N / batch) updates per epoch."""
    import moekit.models.continual as continual
    calls = []
    real = continual.UpdateStep

    class Counting(real):
        def __call__(self, loss=None, **kw):
            calls.append(self.current_lr())
            return super().__call__(loss, **kw)

    monkeypatch.setattr(continual, "UpdateStep", Counting)
    tasks, tc = _conflicting_tasks(T=1, n=50), [(0, 1)]
    net = dense_task_net(d_in=10, d_hidden=4, num_classes=2, task_classes=tc)
    continual.train_task(net, tasks[0][0], tasks[0][1], 0, epochs=3, batch_size=16, lr=1e-2)
    assert calls == [1e-2] * (3 * 4)              # constant lr, 4 batches (16, 16, 16, 2) per epoch
    with pytest.raises(ValueError, match="epochs"):
        continual.train_task(net, tasks[0][0], tasks[0][1], 0, epochs=0, batch_size=16, lr=1e-2)


def test_grow_and_freeze_refuse_bad_input():
    moe = moekit.MoE(d_model=8, num_experts=2, top_k=1, expert="mlp")
    with pytest.raises(ValueError, match="positive int"):
        add_experts(moe, 0)
    with pytest.raises(ValueError, match=r"shape \(2, 8\)"):
        add_experts(moe, 2, router_rows=torch.zeros(2, 7))
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        freeze_experts(moe, [5])
    with pytest.raises(ValueError, match="DenseRouter"):
        add_experts(moekit.MoE(d_model=8, num_experts=2, router="dense", expert="mlp"), 1)
    with pytest.raises(TypeError, match="moekit MoE"):
        add_experts(torch.nn.Linear(2, 2), 1)


# -- metrics ------------------------------------------------------------------------------------

# Hand-computed example, R[i, j] = accuracy on task j after task i (NaN: not yet trained).
R_ROWS = [[0.90, math.nan, math.nan],
          [0.70, 0.80, math.nan],
          [0.60, 0.85, 0.95]]


def test_metrics_against_hand_computed_matrix():
    R = accuracy_matrix(R_ROWS)
    assert average_accuracy(R) == pytest.approx((0.60 + 0.85 + 0.95) / 3)
    # task 0: max(0.90, 0.70) - 0.60 = 0.30; task 1: max(0.80) - 0.85 = -0.05
    assert average_forgetting(R) == pytest.approx((0.30 - 0.05) / 2)
    assert backward_transfer(R) == pytest.approx(((0.60 - 0.90) + (0.85 - 0.80)) / 2)
    # forgetting reads the best accuracy after learning, not the first
    R2 = accuracy_matrix([[0.5, 0, 0], [0.9, 0.8, 0], [0.7, 0.8, 0.9]])
    assert average_forgetting(R2) == pytest.approx((0.9 - 0.7 + 0.0) / 2)
    assert average_forgetting(accuracy_matrix([[0.4]])) == 0.0 == backward_transfer(accuracy_matrix([[0.4]]))


@pytest.mark.parametrize("rows, match", [([[0.5, 0.5]], "square"), ([], "square"),
                                          ([[1.2, 0], [0.5, 0.5]], r"\[0, 1\]"),
                                          ([[0.5, 0], [math.nan, 0.5]], r"\[0, 1\]")])
def test_accuracy_matrix_errors(rows, match):
    with pytest.raises(ValueError, match=match):
        accuracy_matrix(rows)


# -- a tiny sequential run ----------------------------------------------------------------------

def _conflicting_tasks(T=3, n=300, d=10, seed=0):
    """Same inputs, labels by T different random linear rules: a shared body must re-learn."""
    g = torch.Generator().manual_seed(seed)
    tasks = []
    for t in range(T):
        w = torch.randn(d, generator=g)
        x = torch.randn(2 * n, d, generator=g)
        y = (x @ w > 0).long() + 2 * t
        tasks.append((x[:n], y[:n], x[n:], y[n:]))
    return tasks


def test_growing_frozen_moe_forgets_less_than_fine_tuning():
    tasks, tc = _conflicting_tasks(), [(0, 1), (2, 3), (4, 5)]
    kw = dict(epochs=15, batch_size=50, lr=1e-2)
    torch.manual_seed(0)
    dense = dense_task_net(d_in=10, d_hidden=12, num_classes=6, task_classes=tc)
    R_dense, _ = train_sequentially(dense, tasks, **kw)
    torch.manual_seed(0)
    moe = task_moe_net(d_in=10, d_expert=4, num_experts=1, top_k=1, num_classes=6, task_classes=tc)
    R_moe, _ = train_sequentially(moe, tasks, **kw,
                                  before_task=lambda net, t: start_task(net, t, experts_per_task=1))
    assert R_moe.diagonal().min() > 0.85 and R_dense.diagonal().min() > 0.85     # both learn each task
    # Every old task's path is bit-identical after later tasks: accuracy cannot move.
    assert average_forgetting(R_moe) == 0.0
    assert average_forgetting(R_dense) > 0.1
    assert average_accuracy(R_moe) > average_accuracy(R_dense)
