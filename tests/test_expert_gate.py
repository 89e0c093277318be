"""Expert Gate (`moekit.models.expert_gate`): per-task auto-encoders route inputs to task experts."""
import pytest
import torch

from moekit.models import ExpertGate, gated_accuracy
from moekit.models.continual import dense_task_net, task_accuracy
from moekit.models.expert_gate import gated_predict

TASK_CLASSES = [(0, 1), (2, 3), (4, 5)]


def _subspace_tasks(M=3, n=300, d=20, rank=3, seed=0):
    """M tasks whose inputs lie near different random rank-3 subspaces of R^d (well separated
    for an auto-encoder of width ≥ rank: it reconstructs its own subspace, not the others)."""
    g = torch.Generator().manual_seed(seed)
    xs = []
    for _ in range(M):
        basis_RD = torch.linalg.qr(torch.randn(d, rank, generator=g))[0].T
        xs.append(3 * torch.randn(2 * n, rank, generator=g) @ basis_RD + 0.05 * torch.randn(2 * n, d, generator=g))
    return [(x[:n], x[n:]) for x in xs]


def _gate(tasks, **kw):
    gate = ExpertGate(20, **{**dict(d_hidden=6, epochs=20, lr=1e-2, batch_size=64), **kw})
    for x_train, _ in tasks:
        gate.add_task(x_train)
    return gate


@pytest.fixture(scope="module")
def tasks():
    return _subspace_tasks()


@pytest.fixture(scope="module")
def gate(tasks):
    return _gate(tasks)


def test_gate_identifies_well_separated_tasks(tasks, gate):
    x_BD = torch.cat([x for _, x in tasks])
    true_B = torch.arange(len(tasks)).repeat_interleave(len(tasks[0][1]))
    assert (gate.predict_task(x_BD) == true_B).float().mean() > 0.95
    # each auto-encoder reconstructs its own task best on average
    er_MM = torch.stack([gate.reconstruction_errors(x).mean(0) for _, x in tasks])
    assert torch.equal(er_MM.argmin(1), torch.arange(len(tasks)))


def test_errors_and_gate_against_hand_computation(tasks, gate):
    x_BD = torch.cat([x[:7] for _, x in tasks])
    er_BM = gate.reconstruction_errors(x_BD)
    assert er_BM.shape == (21, 3)
    for m, ae in enumerate(gate.autoencoders):
        with torch.no_grad():
            h = torch.relu(x_BD @ ae.encoder.weight.T + ae.encoder.bias)
            x_hat = h @ ae.decoder.weight.T + ae.decoder.bias
        torch.testing.assert_close(er_BM[:, m], ((x_hat - x_BD) ** 2).mean(-1))
    assert torch.equal(gate.predict_task(x_BD), er_BM.argmin(1))      # gate = argmin error
    assert torch.equal(gate.probs(x_BD).argmax(1), er_BM.argmin(1))


def test_probs_sum_to_one_and_temperature(tasks, gate):
    x_BD = torch.cat([x[:10] for _, x in tasks])
    er_BM = gate.reconstruction_errors(x_BD)
    for t in (0.5, 2.0, 50.0):
        p_BM = gate.probs(x_BD, temperature=t)
        torch.testing.assert_close(p_BM.sum(1), torch.ones(30))
        torch.testing.assert_close(p_BM, torch.softmax(-er_BM / t, -1))
    cold_BM = gate.probs(x_BD, temperature=1e-6)            # t → 0: one-hot at the argmin
    assert torch.equal(cold_BM, torch.nn.functional.one_hot(er_BM.argmin(1), 3).float())
    hot_BM = gate.probs(x_BD, temperature=1e6)              # t → ∞: uniform
    torch.testing.assert_close(hot_BM, torch.full((30, 3), 1 / 3), rtol=0, atol=1e-4)
    # a higher temperature never sharpens: the winner's probability falls
    assert (gate.probs(x_BD, 1.0).max(1).values >= gate.probs(x_BD, 4.0).max(1).values).all()


def test_adding_a_task_leaves_earlier_autoencoders_bit_identical(tasks):
    gate = _gate(tasks[:2])
    before = {k: v.clone() for k, v in gate.state_dict().items()}
    x_BD = torch.cat([x for _, x in tasks])
    er_before = gate.reconstruction_errors(x_BD)
    rng_before = torch.random.get_rng_state()
    assert gate.add_task(tasks[2][0]) == 2 and gate.num_tasks == 3
    assert torch.equal(torch.random.get_rng_state(), rng_before)      # the global RNG is left alone
    after = gate.state_dict()
    assert before.keys() <= after.keys() and len(after) == len(before) + 4
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    assert torch.equal(gate.reconstruction_errors(x_BD)[:, :2], er_before)
    assert not any(p.requires_grad for p in gate.parameters())        # every auto-encoder frozen
    # deterministic: the same data and seed give the same auto-encoder
    assert all(torch.equal(a, b) for a, b in zip(gate.state_dict().values(), _gate(tasks).state_dict().values()))


def test_relatedness_against_hand_computation():
    # D = 3, H = 1; task k's data x = (u, 0, 1) with u ∈ {1, 2}.
    gate = ExpertGate(3, d_hidden=1, epochs=1)
    x_ND = torch.tensor([[1.0, 0, 1], [2.0, 0, 1]])
    gate.add_task(x_ND)
    gate.add_task(x_ND)
    a, k = gate.autoencoders
    with torch.no_grad():
        for p in a.parameters():           # a reconstructs 0: er_a = mean((u² + 1) / 3) = 7/6
            p.zero_()
        k.encoder.weight.copy_(torch.tensor([[1.0, 0, 0]]))      # k keeps u: er_k = mean(1 / 3) = 1/3
        k.encoder.bias.zero_()
        k.decoder.weight.copy_(torch.tensor([[1.0], [0], [0]]))
        k.decoder.bias.zero_()
    rel_M = gate.relatedness(x_ND)                   # k = the latest task
    assert rel_M.dtype == torch.float64
    assert rel_M.tolist() == pytest.approx([1 - (7 / 6 - 1 / 3) / (1 / 3), 1.0])    # [-1.5, 1]
    assert gate.relatedness(x_ND, task=0).tolist() == pytest.approx([1.0, 1 - (1 / 3 - 7 / 6) / (7 / 6)])


def test_relatedness_prefers_the_similar_old_task():
    g = torch.Generator().manual_seed(1)
    (a, _), (b, _) = _subspace_tasks(M=2, seed=3)
    gate = _gate([(a, None), (b, None)])
    close = a[:200] + 0.05 * torch.randn(200, 20, generator=g)         # a new task much like task 0
    gate.add_task(close)
    rel_M = gate.relatedness(close)
    assert rel_M[2] == 1.0 and rel_M[0] > rel_M[1]


# -- the gate in front of a task-incremental net ----------------------------------------------------

def _net_and_data(n=40, seed=0):
    torch.manual_seed(seed)
    net = dense_task_net(d_in=10, d_hidden=16, num_classes=6, task_classes=TASK_CLASSES)
    g = torch.Generator().manual_seed(seed)
    x_BD = torch.randn(3 * n, 10, generator=g)
    y_B = torch.cat([torch.randint(2 * t, 2 * t + 2, (n,), generator=g) for t in range(3)])
    return net, x_BD, y_B


def _perfect_gate(true_B, D=8):
    """Gate inputs that name the task (5 · one-hot(task)) and a gate forced to read them right:
    auto-encoder t outputs the constant code of task t (zero weights, decoder bias = code), so
    its error is the squared distance to that code and the argmin is the true task."""
    code_BD = 5 * torch.nn.functional.one_hot(true_B, D).float()
    gate = ExpertGate(D, d_hidden=2, epochs=1)
    for t in range(3):
        gate.add_task(code_BD[true_B == t])
        with torch.no_grad():
            for p in gate.autoencoders[t].parameters():
                p.zero_()
            gate.autoencoders[t].decoder.bias[t] = 5.0
    return gate, code_BD


def test_gated_accuracy_with_a_perfect_gate_equals_task_incremental_accuracy():
    net, x_BD, y_B = _net_and_data()
    true_B = y_B // 2
    gate, code_BD = _perfect_gate(true_B)
    res = gated_accuracy(net, gate, x_BD, y_B, gate_inputs=code_BD, batch_size=17)
    assert res.task_identification == 1.0
    assert torch.equal(res.confusion, torch.diag(torch.tensor([40, 40, 40])))
    known = sum(task_accuracy(net, x_BD[true_B == t], y_B[true_B == t], t) * 40 for t in range(3)) / 120
    assert res.accuracy == pytest.approx(known, abs=1e-12)


def test_gated_predict_matches_a_per_example_loop(tasks, gate):
    net, x_BD, y_B = _net_and_data(n=20)
    gate_in_BD = torch.cat([x[:20] for _, x in tasks])
    gate_in_BD[::7] = gate_in_BD[::7].flip(0)                # some inputs look like another task
    task_B, class_B = gated_predict(net, gate, x_BD, gate_inputs=gate_in_BD)
    for i in range(len(y_B)):
        t = int(gate.reconstruction_errors(gate_in_BD[i:i + 1]).argmin())
        assert int(task_B[i]) == t
        assert int(class_B[i]) == int(net.task_logits(x_BD[i:i + 1], t).argmax())
    res = gated_accuracy(net, gate, x_BD, y_B, gate_inputs=gate_in_BD)
    true_B = y_B // 2
    assert res.task_identification == pytest.approx(float((task_B == true_B).float().mean()))
    assert res.accuracy == pytest.approx(float((class_B == y_B).float().mean()))
    assert res.confusion.sum() == 60 and res.confusion.trace() == int((task_B == true_B).sum())


def test_bad_inputs_raise(gate):
    with pytest.raises(ValueError, match=r"under-complete.*d_in = 8, got 8"):
        ExpertGate(8, d_hidden=8)
    with pytest.raises(ValueError, match="d_in must be a positive int, got 0"):
        ExpertGate(0)
    with pytest.raises(ValueError, match="lr must be a finite number > 0, got 0.0"):
        ExpertGate(8, d_hidden=2, lr=0.0)
    empty = ExpertGate(20, d_hidden=4)
    with pytest.raises(ValueError, match="no tasks yet"):
        empty.reconstruction_errors(torch.zeros(2, 20))
    with pytest.raises(ValueError, match=r"x_train must be a tensor of shape \(B, 20\), got \(5, 19\)"):
        empty.add_task(torch.zeros(5, 19))
    with pytest.raises(ValueError, match=r"shape \(B, 20\), got \(5, 20, 1\)"):
        empty.add_task(torch.zeros(5, 20, 1))
    with pytest.raises(ValueError, match="at least one example"):
        empty.add_task(torch.zeros(0, 20))
    with pytest.raises(ValueError, match="floating point"):
        empty.add_task(torch.zeros(5, 20, dtype=torch.long))
    with pytest.raises(ValueError, match="finite"):
        empty.add_task(torch.full((5, 20), float("nan")))
    assert empty.num_tasks == 0
    with pytest.raises(ValueError, match=r"shape \(B, 20\), got \(3, 7\)"):
        gate.predict_task(torch.zeros(3, 7))
    with pytest.raises(ValueError, match="temperature must be a finite number > 0, got 0"):
        gate.probs(torch.zeros(3, 20), temperature=0)
    with pytest.raises(ValueError, match=r"task must be an int in \[-3, 3\), got 3"):
        gate.relatedness(torch.zeros(3, 20), task=3)
    net, x_BD, y_B = _net_and_data(n=5)
    with pytest.raises(ValueError, match=r"y must have shape \(15,\), got \(14,\)"):
        gated_accuracy(net, gate, x_BD, y_B[:14], gate_inputs=torch.zeros(15, 20))
    with pytest.raises(ValueError, match="one row per input: expected 15, got 14"):
        gated_accuracy(net, gate, x_BD, y_B, gate_inputs=torch.zeros(14, 20))
    two = _gate(_subspace_tasks(M=2, n=20), epochs=1)
    with pytest.raises(ValueError, match=r"labels \[4, 5\] belong to no task the gate has seen"):
        gated_accuracy(net, two, x_BD, y_B, gate_inputs=torch.zeros(15, 20))


def test_review_fixes_dtype_mode_and_labels():
    from moekit.models.continual import dense_task_net
    from moekit.models.expert_gate import gated_predict

    torch.manual_seed(0)
    g = ExpertGate(6, d_hidden=2, epochs=1)
    g.add_task(torch.randn(10, 6))
    g.add_task(torch.randn(10, 6, dtype=torch.float64))          # trained in the gate's dtype
    assert {p.dtype for p in g.parameters()} == {torch.float32}
    assert g.predict_task(torch.randn(3, 6, dtype=torch.float64)).shape == (3,)
    net = dense_task_net(d_in=6, d_hidden=8, num_classes=4, task_classes=[(0, 1), (2, 3)]).train()
    gated_predict(net, g, torch.randn(3, 6))
    assert net.training                                           # the caller's mode is kept
    with pytest.raises(ValueError, match=r"integer class labels in \[0, 4\)"):
        gated_accuracy(net, g, torch.randn(2, 6), torch.tensor([0, 7]))
    with pytest.raises(ValueError, match="integer class labels"):
        gated_accuracy(net, g, torch.randn(2, 6), torch.tensor([0.0, 1.0]))
