"""M3oE (METHODS.md MT3): the layer against a row-by-row reference, its invariants, the multi-domain
models, and the bi-level update step against a hand-written reference (the Census-Income study is
tests/projects/m3oe_census)."""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moekit.layers import M3oE, MoELayer
from moekit.layers.m3oe import STRUCTURE_NAMES, MLPGroup
from moekit.models.multidomain import ARCHS, BiLevelStep, MultiDomainConfig, domain_task_bce
from moekit.optim import NonFiniteError


def _m3oe(d_in=11, D=3, K=2, E=3, seed=0, **kw):
    torch.manual_seed(seed)
    kw = {"star_dim": 7, "bottom_dim": 6, "expert_dims": (5, 4), **kw}
    return M3oE(d_model=d_in, num_domains=D, num_tasks=K, num_shared_experts=E, **kw).double()


def _inputs(m, B=13, seed=1, ids=None):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, m.d_in, generator=gen, dtype=torch.float64)
    if ids is None:
        ids = torch.randint(0, m.num_domains, (B,), generator=gen)
    return x, torch.as_tensor(ids)


def _star(m, x_1I, d):
    """The STAR features of one row of domain d, written out from METHODS' formula."""
    s = x_1I @ (m.star_shared_weight * m.star_weight[d]) + m.star_bias[d] + m.star_shared_bias
    return m.star_mlp.member_forward(0, s) + m.skip.member_forward(0, x_1I)


def _tower(m, d, t, h_1O):
    f = m.towers[d].member_forward(t, h_1O)
    return f @ m.head_weight[d, t] + m.head_bias[d, t]                                  # (1,)


def _reference(m, x, ids):
    """M3oE row by row, cell by cell, with METHODS' sums over the other domains / tasks spelled out."""
    a_D, a_T, b_D, b_T = m.structure_weights()
    D, K, E = m.num_domains, m.num_tasks, m.num_experts
    rows = []
    for b in range(x.shape[0]):
        d = int(ids[b])
        z = _star(m, x[b:b + 1], d)
        S = [m.shared_experts.member_forward(i, z) for i in range(E)]
        Dx = [m.domain_experts.member_forward(i, z) for i in range(D)]
        T = [m.task_experts.member_forward(i, z) for i in range(K)]
        D_tilde = a_D * Dx[d] + sum((1 - a_D) / (D - 1) * Dx[e] for e in range(D) if e != d)
        out = []
        for t in range(K):
            T_tilde = a_T * T[t] + sum((1 - a_T) / (K - 1) * T[u] for u in range(K) if u != t)
            z_gate = z.detach() if m.detach_gate_input else z
            g = torch.softmax(F.linear(z_gate, m.gate_weight[d, t], m.gate_bias[d, t]), -1)[0]
            h = sum(g[i] * S[i] for i in range(E)) + b_D * D_tilde + b_T * T_tilde
            out.append(_tower(m, d, t, h))
        rows.append(torch.cat(out))
    return torch.stack(rows)


# ---------------------------------------------------------------- the layer
@pytest.mark.parametrize("B, d_in", [(1, 3), (13, 11), (29, 100)])
def test_mlp_group_equals_one_sequential_per_member(B, d_in):
    torch.manual_seed(B)
    g = MLPGroup(3, (d_in, 6, 4)).double()
    for p in g.parameters():                         # move LayerNorm off its identity init
        nn.init.normal_(p)
    x = torch.randn(B, d_in, dtype=torch.float64)
    xs = torch.randn(B, 3, d_in, dtype=torch.float64)
    for n in range(3):
        seq = nn.Sequential(nn.Linear(d_in, 6), nn.LayerNorm(6), nn.ReLU(), nn.Linear(6, 4), nn.LayerNorm(4),
                            nn.ReLU()).double()
        with torch.no_grad():
            for lin, norm, layer in ((seq[0], seq[1], 0), (seq[3], seq[4], 1)):
                lin.weight.copy_(g.weights[layer][n])
                lin.bias.copy_(g.biases[layer][n])
                norm.weight.copy_(g.norm_weights[layer][n])
                norm.bias.copy_(g.norm_biases[layer][n])
        torch.testing.assert_close(g(x)[:, n], seq(x))
        torch.testing.assert_close(g(xs)[:, n], seq(xs[:, n]))
        torch.testing.assert_close(g.member_forward(n, x), seq(x))
    with pytest.raises(ValueError, match=r"x must be \(B, %d\) or \(B, 3, %d\)" % (d_in, d_in)):
        g(torch.randn(B, 2, d_in, dtype=torch.float64))


@pytest.mark.parametrize("D, K, E, B, detach", [(3, 2, 3, 13, True), (3, 2, 3, 13, False), (1, 1, 1, 5, True),
                                                (4, 3, 2, 1, False), (2, 2, 4, 97, True)])
def test_forward_and_gradients_equal_the_row_by_row_reference(D, K, E, B, detach):
    m = _m3oe(D=D, K=K, E=E, seed=D + K, detach_gate_input=detach)
    gen = torch.Generator().manual_seed(B)
    m.fix_structure(a_domain=0.3, b_task=0.8)                  # two pinned, two learnable
    with torch.no_grad():
        m.structure_logits.copy_(torch.randn(4, generator=gen, dtype=torch.float64))
    x, ids = _inputs(m, B=B, seed=B)
    x.requires_grad_(True)
    got = m(x, ids)
    assert got.shape == (B, K) and got.dtype == torch.float64
    w = torch.randn(B, K, generator=gen, dtype=torch.float64)
    params = [m.star_weight, m.gate_weight, m.head_weight, m.structure_logits, m.domain_experts.weights[0]]
    g_got = torch.autograd.grad((got * w).sum(), [x] + params)
    ref = _reference(m, x, ids)
    torch.testing.assert_close(got, ref)
    g_ref = torch.autograd.grad((ref * w).sum(), [x] + params)
    for a, b in zip(g_got, g_ref):
        torch.testing.assert_close(a, b)
    assert g_got[4][[0, 3]].abs().sum() == 0 and g_got[4][[1, 2]].abs().min() > 0   # pinned a_D, b_T: none


def test_a_domain_one_uses_only_the_own_domain_expert():
    m = _m3oe(D=3, K=2, seed=3)
    x, ids = _inputs(m, B=30, seed=3)
    for a in (1.0, 0.6):
        m.fix_structure(a_domain=a)
        base = m(x, ids).detach()
        for d in range(3):
            perturbed = _m3oe(D=3, K=2, seed=3)
            perturbed.load_state_dict(m.state_dict())
            with torch.no_grad():                              # every domain expert but d's
                for p in perturbed.domain_experts.parameters():
                    p[torch.arange(3) != d] += torch.randn_like(p[torch.arange(3) != d])
            out = perturbed(x, ids).detach()
            own = ids == d
            if a == 1.0:
                torch.testing.assert_close(out[own], base[own], rtol=0, atol=0)
                assert (out[~own] - base[~own]).abs().min() > 0     # other domains do read them
            else:
                assert (out[own] - base[own]).abs().min() > 0


def test_b_zero_reduces_to_an_mmoe_over_the_star_features():
    m = _m3oe(D=3, K=2, E=4, seed=4)
    m.fix_structure(b_domain=0.0, b_task=0.0)
    x, ids = _inputs(m, B=17, seed=4)
    expect = []
    for b in range(17):
        d = int(ids[b])
        z = _star(m, x[b:b + 1], d)
        experts = torch.cat([m.shared_experts.member_forward(i, z) for i in range(4)])       # (E, O)
        row = []
        for t in range(2):
            g = torch.softmax(z @ m.gate_weight[d, t].T + m.gate_bias[d, t], -1)             # (1, E)
            row.append(_tower(m, d, t, g @ experts))                                         # MMoE cell (d, t)
        expect.append(torch.cat(row))
    torch.testing.assert_close(m(x, ids), torch.stack(expect))
    # the domain and task experts are then dead weight
    with torch.no_grad():
        for p in list(m.domain_experts.parameters()) + list(m.task_experts.parameters()):
            p.add_(torch.randn_like(p))
    torch.testing.assert_close(m(x, ids), torch.stack(expect))


def test_every_domain_task_gate_is_a_distribution():
    m = _m3oe(D=3, K=2, E=5, seed=5)
    x, _ = _inputs(m, B=23, seed=5)
    for d in range(3):
        ids = torch.full((23,), d)
        z = m.bottom(x, ids)
        torch.testing.assert_close(z, torch.cat([_star(m, x[b:b + 1], d) for b in range(23)]))
        g = m.gate_probs(z, ids)
        assert g.shape == (23, 2, 5) and (g >= 0).all()
        torch.testing.assert_close(g.sum(-1), torch.ones(23, 2, dtype=torch.float64))
        for t in range(2):
            torch.testing.assert_close(g[:, t], torch.softmax(F.linear(z, m.gate_weight[d, t], m.gate_bias[d, t]), -1))


def test_loss_counts_each_cell_on_its_own_domain_only():
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(20, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 2, (20, 2), generator=gen).double()
    ids = torch.tensor([0, 2] * 10)                         # domain 1 absent
    loss = domain_task_bce(logits, y, ids, num_domains=3)
    expect = sum(F.binary_cross_entropy_with_logits(logits[ids == d, t], y[ids == d, t])
                 for d in (0, 2) for t in range(2))
    torch.testing.assert_close(loss, expect)
    # a row's logit only feeds its own domain's cells: gradient = (σ(l) − y) / n_d
    (g,) = torch.autograd.grad(loss, logits)
    torch.testing.assert_close(g, (torch.sigmoid(logits) - y) / 10)
    # through the model: a batch without domain 1 gives domain 1's gates, towers and STAR weights no gradient
    m = _m3oe(D=3, K=2, seed=6)
    x, _ = _inputs(m, B=20, seed=6)
    domain_task_bce(m(x, ids), y, ids, num_domains=3).backward()
    for name, p in [("star_weight", m.star_weight), ("star_bias", m.star_bias), ("gate_weight", m.gate_weight),
                    ("gate_bias", m.gate_bias), ("head_weight", m.head_weight), ("head_bias", m.head_bias)]:
        assert p.grad[1].abs().sum() == 0 and p.grad[0].abs().sum() > 0 and p.grad[2].abs().sum() > 0, name
    for p in m.towers[1].parameters():
        assert p.grad is None or p.grad.abs().sum() == 0
    assert all(p.grad.abs().sum() > 0 for p in m.towers[0].parameters())
    # ... while domain 1's own expert still learns as an "other domain" expert (a_D < 1)
    assert m.domain_experts.weights[0].grad[1].abs().sum() > 0


def test_structure_and_model_parameters_partition_the_module():
    m = _m3oe()
    s, rest = m.structure_parameters(), m.model_parameters()
    assert [p is m.structure_logits for p in s] == [True]
    assert {id(p) for p in s}.isdisjoint({id(p) for p in rest})
    assert len(s) + len(rest) == len(list(m.parameters()))
    torch.testing.assert_close(m.structure_weights(), torch.sigmoid(torch.ones(4, dtype=torch.float64)))
    m.fix_structure(a_task=1.0, b_domain=0.0)
    assert m.structure() == pytest.approx({"a_domain": 1 / (1 + math.exp(-1)), "a_task": 1.0, "b_domain": 0.0,
                                           "b_task": 1 / (1 + math.exp(-1))})
    other = _m3oe()
    other.load_state_dict(m.state_dict())                   # pinned values are saved
    assert other.structure() == m.structure()
    m.fix_structure(a_task=None)                            # learnable again
    assert m.structure()["a_task"] == pytest.approx(1 / (1 + math.exp(-1)))
    with pytest.raises(ValueError, match="must be one of"):
        m.fix_structure(alpha=0.5)
    with pytest.raises(ValueError, match=r"b_task must be a finite number in \[0, 1\] or None, got 1.5"):
        m.fix_structure(b_task=1.5)
    assert tuple(m.structure()) == STRUCTURE_NAMES


def test_detached_gate_input_changes_gradients_not_outputs():
    a, b = _m3oe(seed=7), _m3oe(seed=7, detach_gate_input=False)
    x, ids = _inputs(a, seed=7)
    ya, yb = a(x, ids), b(x, ids)
    torch.testing.assert_close(ya, yb)
    ya.sum().backward()
    yb.sum().backward()
    torch.testing.assert_close(a.gate_weight.grad, b.gate_weight.grad)
    torch.testing.assert_close(a.head_weight.grad, b.head_weight.grad)
    assert not torch.allclose(a.star_weight.grad, b.star_weight.grad)    # the gates' path into the bottom


def test_shapes_and_dtypes():
    torch.manual_seed(8)
    m = M3oE(d_model=9, num_domains=2, num_tasks=3, num_shared_experts=2, star_dim=8, bottom_dim=8, expert_dims=(6,))
    assert m.head_weight.shape == (2, 3, 6)                      # tower hidden defaults to O
    for B in (1, 4):
        y = m(torch.randn(B, 9), torch.zeros(B, dtype=torch.int32))
        assert y.shape == (B, 3) and y.dtype == torch.float32
    assert m(torch.randn(0, 9), torch.zeros(0, dtype=torch.long)).shape == (0, 3)
    assert m.double()(torch.randn(4, 9, dtype=torch.float64), torch.tensor([0, 1, 1, 0])).dtype == torch.float64
    assert m.aux_loss.item() == 0 and isinstance(m, MoELayer)


def test_bad_inputs_raise_with_expected_and_actual():
    m = _m3oe(d_in=11, D=3)
    x, ids = _inputs(m, B=4)
    with pytest.raises(ValueError, match=r"shape \(B, d_model=11\), got \(4, 10\)"):
        m(x[:, :10], ids)
    with pytest.raises(ValueError, match=r"shape \(B, d_model=11\), got \(2, 2, 11\)"):
        m(x.reshape(2, 2, 11), ids)
    with pytest.raises(ValueError, match=r"\[0, num_domains=3\), got values from 0 to 3"):
        m(x, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match=r"got values from -1"):
        m(x, torch.tensor([0, -1, 2, 1]))
    with pytest.raises(ValueError, match=r"domain_ids must have shape \(B,\) = \(4,\), got \(3,\)"):
        m(x, ids[:3])
    with pytest.raises(ValueError, match="integer tensor, got dtype torch.float32"):
        m(x, ids.float())
    with pytest.raises(ValueError, match="float tensor"):
        m(x.long(), ids)
    with pytest.raises(ValueError, match="dtype torch.float32 but the parameters torch.float64"):
        m(x.float(), ids)
    with pytest.raises(TypeError, match="torch.Tensor"):
        m(x, [0, 1, 2, 0])
    for kw, msg in [(dict(d_model=0), "d_model must be a positive int, got 0"),
                    (dict(num_domains=0), "num_domains must be a positive int, got 0"),
                    (dict(num_tasks=-1), "num_tasks must be a positive int, got -1"),
                    (dict(num_shared_experts=True), "num_shared_experts must be a positive int, got True"),
                    (dict(star_dim=0), "star_dim must be a positive int"),
                    (dict(bottom_dim=2.5), "bottom_dim must be a positive int, got 2.5"),
                    (dict(expert_dims=()), "expert_dims must hold at least one width"),
                    (dict(expert_dims=(4, 0)), r"expert_dims\[1\] must be a positive int, got 0"),
                    (dict(tower_hidden=0), "tower_hidden must be a positive int, got 0"),
                    (dict(structure_init=math.inf), "structure_init must be a finite number, got inf")]:
        args = {"d_model": 5, "num_domains": 2, "num_tasks": 2, **kw}
        with pytest.raises((ValueError, TypeError), match=msg):
            M3oE(**args)


# ---------------------------------------------------------------- multi-domain models, on synthetic data
def _synthetic(n, seed, D=3, K=2, R=6):
    """Domains whose tasks depend on the inputs in different directions (a shared part plus a per-domain part)."""
    gen = torch.Generator().manual_seed(seed)
    w_shared = torch.randn(K, R, generator=torch.Generator().manual_seed(99))
    w_dom = torch.randn(D, K, R, generator=torch.Generator().manual_seed(100))
    num = torch.randn(n, R, generator=gen)
    dom = torch.randint(0, D, (n,), generator=gen)
    score = torch.einsum("nr,nkr->nk", num, w_shared + 1.5 * w_dom[dom])
    labels = (score + 0.5 * torch.randn(n, K, generator=gen) > 0).float()
    cat = torch.randint(0, 3, (n, 1), generator=gen)
    return SimpleNamespace(cat=cat.numpy(), num=num.numpy(), labels=labels.numpy(), domain_ids=dom.numpy())


def _small(arch, **kw):
    cfg = MultiDomainConfig(arch=arch, embed_dim=2, width=12, tower_hidden=6, num_experts=3, num_shared_experts=2,
                            **kw)
    return cfg.build(vocab_sizes=[3], num_continuous=6, num_domains=3, num_tasks=2)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture_runs_and_uses_the_domain_as_designed(arch):
    data = _synthetic(64, 3)
    torch.manual_seed(1)
    m = _small(arch)
    cat, num, dom = (torch.as_tensor(a) for a in (data.cat, data.num, data.domain_ids))
    y = m(cat, num, dom)
    assert y.shape == (64, 2)
    changes = not torch.allclose(y, m(cat, num, (dom + 1) % 3))
    assert changes == (arch in ("mmoe_domain", "star", "m3oe"))
    assert bool(m.structure_parameters()) == (arch == "m3oe")
    assert len(m.structure_parameters()) + len(m.model_parameters()) == len(list(m.parameters()))
    with pytest.raises(ValueError, match="domain_ids"):
        m(cat, num, dom.clamp(max=0) + 3)


# ---------------------------------------------------------------- the bi-level update step
def _batch_loss(m, data, idx):
    cat, num, y, dom = (torch.as_tensor(a) for a in (data.cat, data.num, data.labels, data.domain_ids))
    return domain_task_bce(m(cat[idx], num[idx], dom[idx]), y[idx], dom[idx], num_domains=3)


def test_bilevel_step_equals_the_hand_written_first_order_update():
    """Two steps of BiLevelStep against the loop it replaced: AdamW on the model parameters with
    the training loss, then Adam on the structure weights alone with the held-out loss."""
    train, val = _synthetic(96, 0), _synthetic(64, 1)
    torch.manual_seed(0)
    a = _small("m3oe")
    b = _small("m3oe")
    b.load_state_dict(a.state_dict())
    step = BiLevelStep(a, lr=1e-2, weight_decay=1e-3, structure_lr=5e-2)
    opt = torch.optim.AdamW(b.model_parameters(), lr=1e-2, weight_decay=1e-3)
    s_opt = torch.optim.Adam(b.structure_parameters(), lr=5e-2)
    batches = [torch.arange(0, 48), torch.arange(48, 96)]
    held_out = [torch.arange(0, 32), torch.arange(32, 64)]
    for i in range(2):
        info = step(_batch_loss(a, train, batches[i]), lambda: _batch_loss(a, val, held_out[i]))
        opt.zero_grad(set_to_none=True)
        _batch_loss(b, train, batches[i]).backward()
        opt.step()
        grads = torch.autograd.grad(_batch_loss(b, val, held_out[i]), b.structure_parameters())
        for p, g in zip(b.structure_parameters(), grads):
            p.grad = g
        s_opt.step()
        assert info["structure_loss"] is not None and info["loss"] > 0
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, msg=name)
    assert step.step == 2


def test_bilevel_step_moves_each_group_only_through_its_own_optimiser():
    train, val = _synthetic(96, 0), _synthetic(64, 1)
    torch.manual_seed(0)
    m = _small("m3oe")
    start = {k: v.clone() for k, v in m.state_dict().items()}
    # structure_lr = 0: the structure weights stay, everything else moves, no held-out loss is asked for
    step = BiLevelStep(m, lr=1e-2, structure_lr=0.0)
    assert step(_batch_loss(m, train, torch.arange(96)))["structure_loss"] is None
    moved = {n for n, p in m.named_parameters() if not torch.equal(p, start[n])}
    assert "backbone.structure_logits" not in moved and len(moved) == len(list(m.parameters())) - 1
    # the same step with a structure update differs from it in the structure weights only
    other = _small("m3oe")
    other.load_state_dict(start)
    info = BiLevelStep(other, lr=1e-2, structure_lr=5e-2)(_batch_loss(other, train, torch.arange(96)),
                                                           lambda: _batch_loss(other, val, torch.arange(64)))
    assert info["structure_loss"] is not None
    differ = [n for (n, p), q in zip(m.named_parameters(), other.parameters()) if not torch.equal(p, q)]
    assert differ == ["backbone.structure_logits"]
    assert all(p.grad is None for p in other.parameters())    # no gradient is left behind


def test_bilevel_step_structure_every_and_errors():
    train, val = _synthetic(64, 0), _synthetic(32, 1)
    torch.manual_seed(0)
    m = _small("m3oe")
    calls = []

    def held_out():
        calls.append(1)
        return _batch_loss(m, val, torch.arange(32))

    step = BiLevelStep(m, lr=1e-2, structure_every=2)
    for _ in range(4):
        step(_batch_loss(m, train, torch.arange(64)), held_out)
    assert len(calls) == 2 and step.step == 4
    step(_batch_loss(m, train, torch.arange(64)))                       # step 5: no structure update due
    before = [p.detach().clone() for p in m.parameters()]
    with pytest.raises(ValueError, match="held_out_loss is needed at step 6"):
        step(_batch_loss(m, train, torch.arange(64)))
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), before)) and step.step == 5
    # a domain-blind model has no structure: no held-out loss is needed
    plain = _small("mmoe")
    assert BiLevelStep(plain, lr=1e-2)(_batch_loss(plain, train, torch.arange(64)))["structure_loss"] is None
    with pytest.raises(ValueError, match="structure_every must be"):
        BiLevelStep(m, lr=1e-2, structure_every=0)
    with pytest.raises(ValueError, match="structure_lr must be"):
        BiLevelStep(m, lr=1e-2, structure_lr=-1.0)
    with pytest.raises(TypeError, match="model_parameters"):
        BiLevelStep(nn.Linear(2, 2), lr=1e-2)
    with pytest.raises(NonFiniteError):
        BiLevelStep(m, lr=1e-2)(_batch_loss(m, train, torch.arange(64)) * float("nan"), held_out)
