"""MMoE / OMoE / shared-bottom / CGC / PLE (METHODS.md MT1, MT2) and the R4 synthetic generator."""
import pytest
import torch

import moekit
from moekit.layers.multigate import CGC, PLE, MMoE, SharedBottom, make_mmoe_synthetic


def test_mmoe_shapes_and_gates_sum_to_one():
    torch.manual_seed(0)
    m = MMoE(d_model=10, num_experts=4, num_tasks=3, d_hidden=6, tower_hidden=5, d_out=2)
    ys = m(torch.randn(2, 7, 10))
    assert len(ys) == 3 and all(y.shape == (2, 7, 2) for y in ys)
    assert len(m.last_gates) == 3
    for g in m.last_gates:
        assert g.shape == (2, 7, 4)
        torch.testing.assert_close(g.sum(-1), torch.ones(2, 7))
        assert (g >= 0).all()
    assert m.last_stats.mean_gate.shape == (3, 4)
    assert m.aux_loss.item() == 0.0 and moekit.aux_loss(m).item() == 0.0


def test_mmoe_matches_manual_formula():
    torch.manual_seed(1)
    m = MMoE(d_model=5, num_experts=3, num_tasks=2, d_hidden=4)
    x = torch.randn(6, 5)
    ys = m(x)
    for k in range(2):
        g = torch.softmax(m.gates[k](x), -1)
        f = sum(g[:, i:i + 1] * m.experts.expert_forward(i, x) for i in range(3))
        torch.testing.assert_close(ys[k], m.towers[k](f))


def test_mmoe_one_expert_equals_shared_bottom():
    torch.manual_seed(2)
    m = MMoE(d_model=6, num_experts=1, num_tasks=2, d_hidden=5, tower_hidden=3)
    sb = SharedBottom(d_model=6, num_tasks=2, d_hidden=5, tower_hidden=3)
    sb.bottom.load_state_dict(m.experts.state_dict())
    sb.towers.load_state_dict(m.towers.state_dict())
    x = torch.randn(9, 6)
    for a, b in zip(m(x), sb(x)):
        torch.testing.assert_close(a, b)
    assert all((g == 1).all() for g in m.last_gates)


def test_identical_gates_equal_omoe():
    torch.manual_seed(3)
    omoe = MMoE(d_model=6, num_experts=3, num_tasks=2, d_hidden=4, shared_gate=True)
    mmoe = MMoE(d_model=6, num_experts=3, num_tasks=2, d_hidden=4)
    mmoe.experts.load_state_dict(omoe.experts.state_dict())
    mmoe.towers.load_state_dict(omoe.towers.state_dict())
    for g in mmoe.gates:
        g.load_state_dict(omoe.gates[0].state_dict())
    x = torch.randn(5, 6)
    for a, b in zip(mmoe(x), omoe(x)):
        torch.testing.assert_close(a, b)
    assert len(omoe.gates) == 1


@pytest.mark.parametrize("model", ["mmoe", "ple", "cgc"])
def test_gradients_reach_every_gate_and_expert(model):
    torch.manual_seed(4)
    if model == "mmoe":
        m = MMoE(d_model=6, num_experts=3, num_tasks=3, d_hidden=4)
    elif model == "ple":
        m = PLE(d_model=6, num_tasks=3, num_shared_experts=2, num_specific_experts=1, d_hidden=[16, 12], num_levels=2,
                tower_hidden=8)
    else:
        m = CGC(d_model=6, num_tasks=3, num_shared_experts=2, num_specific_experts=2, d_hidden=4)
    ys = m(torch.randn(32, 6))
    sum(y.square().sum() for y in ys).backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_cgc_task_gate_never_weights_other_tasks_experts():
    torch.manual_seed(5)
    m = CGC(d_model=6, num_tasks=3, num_shared_experts=2, num_specific_experts=2, d_hidden=4)
    x = torch.randn(8, 6)
    ys = m(x)
    for g in m.last_gates:
        assert g.shape == (8, 2 + 2)                     # n specific + S shared
        torch.testing.assert_close(g.sum(-1), torch.ones(8))
    # task 0's output does not depend on tasks 1 and 2's specific experts at all
    level = m.levels[0]
    ys[0].sum().backward()
    assert level.specific[0].weight.grad.abs().sum() > 0
    for k in (1, 2):
        assert level.specific[k].weight.grad is None or level.specific[k].weight.grad.abs().sum() == 0
    assert level.shared_gate is None                     # single level: no shared gate


def test_cgc_without_specific_experts_equals_mmoe():
    torch.manual_seed(6)
    cgc = CGC(d_model=6, num_tasks=2, num_shared_experts=3, num_specific_experts=0, d_hidden=4)
    mmoe = MMoE(d_model=6, num_experts=3, num_tasks=2, d_hidden=4)
    mmoe.experts.load_state_dict(cgc.levels[0].shared.state_dict())
    for k in range(2):
        mmoe.gates[k].load_state_dict(cgc.levels[0].task_gates[k].state_dict())
    mmoe.towers.load_state_dict(cgc.towers.state_dict())
    x = torch.randn(7, 6)
    for a, b in zip(cgc(x), mmoe(x)):
        torch.testing.assert_close(a, b)


def test_ple_multi_level_matches_manual():
    torch.manual_seed(7)
    m = PLE(d_model=5, num_tasks=2, num_shared_experts=2, num_specific_experts=1, d_hidden=[4, 3, 6], num_levels=3)
    x = torch.randn(4, 5)
    ys = m(x)
    assert [lv.shared_gate is None for lv in m.levels] == [False, False, True]
    assert m.levels[0].shared_gate.out_features == 2 * 1 + 2

    def mix(gate_lin, inp, hs):
        return torch.einsum("be,beh->bh", torch.softmax(gate_lin(inp), -1), torch.cat(hs, 1))

    task_in, shared_in = [x, x], x
    for lv in m.levels:       # the paper's recursion, written out per level
        sh = lv.shared(shared_in)
        sp = [lv.specific[k](task_in[k]) for k in range(2)]
        new_task = [mix(lv.task_gates[k], task_in[k], [sp[k], sh]) for k in range(2)]
        shared_in = mix(lv.shared_gate, shared_in, sp + [sh]) if lv.shared_gate is not None else None
        task_in = new_task
    for k in range(2):
        torch.testing.assert_close(ys[k], m.towers[k](task_in[k]))


def test_bad_inputs_raise():
    m = MMoE(d_model=6, num_experts=3, num_tasks=2, d_hidden=4)
    with pytest.raises(ValueError, match="d_model=6"):
        m(torch.randn(3, 5))
    with pytest.raises(ValueError, match="float"):
        m(torch.ones(3, 6, dtype=torch.long))
    with pytest.raises(ValueError, match="num_experts"):
        MMoE(d_model=6, num_experts=0, num_tasks=2, d_hidden=4)
    with pytest.raises(ValueError, match="num_levels=2"):
        PLE(d_model=6, num_tasks=2, num_shared_experts=1, num_specific_experts=1, d_hidden=[4, 4, 4], num_levels=2)
    with pytest.raises(ValueError, match="num_specific_experts"):
        CGC(d_model=6, num_tasks=2, num_shared_experts=1, num_specific_experts=-1, d_hidden=4)
    with pytest.raises(ValueError, match="correlation"):
        make_mmoe_synthetic(10, correlation=1.5)


def test_synthetic_generator_correlation_and_determinism():
    a = make_mmoe_synthetic(200, correlation=0.5, d=20, seed=3)
    b = make_mmoe_synthetic(200, correlation=0.5, d=20, seed=3)
    torch.testing.assert_close(a.x, b.x)
    torch.testing.assert_close(a.y, b.y)
    assert a.x.shape == (200, 20) and a.y.shape == (200, 2)
    for rho in (1.0, 0.9, 0.5, 0.0, -0.3):
        s = make_mmoe_synthetic(10, correlation=rho, d=20, c=2.0)
        cos = torch.nn.functional.cosine_similarity(s.w[0], s.w[1], dim=0)
        assert abs(cos.item() - rho) < 1e-5
        torch.testing.assert_close(s.w.norm(dim=1), torch.full((2,), 2.0))
    # y is the stated function of x (noise_std = 0 makes it exact)
    s = make_mmoe_synthetic(50, correlation=0.7, d=10, noise_std=0.0)
    lin = s.x @ s.w.t()
    expect = lin + torch.sin(lin[..., None] * s.alpha + s.beta).sum(-1)
    torch.testing.assert_close(s.y, expect, atol=1e-4, rtol=1e-4)
    # label correlation falls with rho
    c = [torch.corrcoef(make_mmoe_synthetic(4000, correlation=r, d=20, seed=1).y.t())[0, 1].item()
         for r in (1.0, 0.5, 0.0)]
    assert c[0] > 0.95 and c[0] > c[1] > c[2]


def test_mmoe_learns_synthetic_tasks():
    """A short full-batch fit on R4 data reduces both task losses well below the label variance."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)      # 60 tiny steps: thread hand-offs would dominate on a busy machine
    try:
        torch.manual_seed(0)
        data = make_mmoe_synthetic(256, correlation=0.5, d=8, seed=0)
        m = MMoE(d_model=8, num_experts=4, num_tasks=2, d_hidden=8, tower_hidden=8)
        opt = torch.optim.Adam(m.parameters(), lr=2e-2)
        var = data.y.var(0)
        for _ in range(60):
            ys = m(data.x)
            loss = sum(((y.squeeze(-1) - data.y[:, k]) ** 2).mean() for k, y in enumerate(ys))
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            mse = torch.stack([((y.squeeze(-1) - data.y[:, k]) ** 2).mean() for k, y in enumerate(m(data.x))])
    finally:
        torch.set_num_threads(threads)
    assert (mse < 0.5 * var).all(), (mse, var)
