"""M3oE (METHODS.md MT3): the layer against a row-by-row reference, its invariants, the multi-domain
trainer, and the Census-Income age domains on the committed slice (no network)."""
import csv
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moekit.layers import M3oE, MoELayer
from moekit.layers.m3oe import STRUCTURE_NAMES, MLPGroup
from moekit.models.multidomain import (ARCHS, MultiDomainConfig, MultiDomainModel, config_for_budget,
                                       domain_task_auc, domain_task_bce, evaluate_cells, train_multidomain)
from moekit.models.multitask import TabularEmbedding, binary_auc
from moekit.train.census import (AGE_EDGES, age_domain_ids, age_domain_names, encode_census, read_census_csv,
                                 with_age_domains)

CENSUS = Path(__file__).parent / "data" / "census"


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
    with pytest.raises(ValueError, match=r"b_task must be in \[0, 1\]"):
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
                    (dict(expert_dims=(4, 0)), "expert_dims entry must be a positive int, got 0"),
                    (dict(tower_hidden=0), "tower_hidden must be a positive int, got 0"),
                    (dict(structure_init=math.inf), "structure_init must be finite")]:
        args = {"d_model": 5, "num_domains": 2, "num_tasks": 2, **kw}
        with pytest.raises(ValueError, match=msg):
            M3oE(**args)


# ---------------------------------------------------------------- the trainer, on synthetic data
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


def test_training_on_synthetic_domains_lowers_the_loss():
    train, val, test = _synthetic(1200, 0), _synthetic(300, 1), _synthetic(300, 2)
    torch.manual_seed(0)
    m = _small("m3oe")
    before = m.structure()
    r = train_multidomain(m, train, val, test, epochs=4, batch_size=64, lr=1e-2, structure_lr=5e-2, patience=4)
    losses = [h["train_loss"] for h in r.history]
    assert losses[-1] < 0.6 * losses[0], losses
    assert len(r.test_auc) == 3 and all(len(row) == 2 for row in r.test_auc)
    assert min(a for row in r.test_auc for a in row) > 0.8, r.test_auc
    assert r.test_auc == evaluate_cells(m, test)                          # the best epoch is restored
    assert r.structure == m.structure() != before
    # the structure weights move only through the structure optimiser, the rest only through the main one
    torch.manual_seed(0)
    frozen = _small("m3oe")
    start = [p.detach().clone() for p in frozen.parameters()]
    train_multidomain(frozen, train, val, epochs=1, batch_size=64, lr=1e-2, structure_lr=0.0)
    assert torch.equal(frozen.backbone.structure_logits, start[[id(p) for p in frozen.parameters()].index(
        id(frozen.backbone.structure_logits))])
    torch.manual_seed(0)
    only_s = _small("m3oe")
    train_multidomain(only_s, train, val, epochs=1, batch_size=64, lr=0.0, weight_decay=0.0, structure_lr=5e-2)
    moved = [not torch.equal(p, q) for p, q in zip(only_s.parameters(), start)]
    assert [n for (n, _), mv in zip(only_s.named_parameters(), moved) if mv] == ["backbone.structure_logits"]


@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture_runs_and_uses_the_domain_as_designed(arch):
    data = _synthetic(64, 3)
    torch.manual_seed(1)
    m = _small(arch)
    cat, num, dom = (torch.as_tensor(a) for a in (data.cat, data.num, data.domain_ids))
    y = m(cat, num, dom)
    assert y.shape == (64, 2)
    changes = not torch.allclose(y, m(cat, num, (dom + 1) % 3))
    assert changes == (arch in ("mmoe_domain", "m3oe"))
    assert bool(m.structure_parameters()) == (arch == "m3oe")
    assert len(m.structure_parameters()) + len(m.model_parameters()) == len(list(m.parameters()))
    with pytest.raises(ValueError, match="domain_ids"):
        m(cat, num, dom.clamp(max=0) + 3)


def test_config_for_budget_and_cell_auc():
    for arch in ARCHS:
        cfg = config_for_budget(MultiDomainConfig(arch=arch), 20_000, d_in=135, num_domains=3, num_tasks=2)
        n = cfg.build(vocab_sizes=[5] * 32, num_continuous=7, num_domains=3, num_tasks=2).backbone_parameters()
        assert abs(n - 20_000) < 0.03 * 20_000, (arch, cfg.width, n)
    with pytest.raises(ValueError, match="arch must be one of"):
        MultiDomainConfig(arch="star")
    s = torch.tensor([0.1, 0.9, 0.3, 0.2, 0.8, 0.4])
    y = torch.tensor([[0, 1], [1, 1], [0, 1], [1, 0], [1, 1], [0, 0]])
    ids = torch.tensor([0, 0, 0, 1, 1, 1])
    auc = domain_task_auc(torch.stack([s, s], 1), y, ids, num_domains=3)
    assert auc[0][0] == binary_auc(s[:3], y[:3, 0]) and math.isnan(auc[0][1])     # one class only
    assert auc[1] == [binary_auc(s[3:], y[3:, 0]), binary_auc(s[3:], y[3:, 1])]
    assert all(math.isnan(a) for a in auc[2])                                          # empty domain


# ---------------------------------------------------------------- Census-Income age domains (committed slice)
@pytest.fixture(scope="module")
def census():
    raw = read_census_csv(CENSUS / "train.csv"), read_census_csv(CENSUS / "test.csv")
    return with_age_domains(encode_census(*raw, val_fraction=0.2, seed=1))


def test_census_age_domains_come_from_the_raw_age_column(census):
    with open(CENSUS / "test.csv", newline="") as f:
        ages = [int(r[0]) for r in csv.reader(f)]                 # an independent parse
    np.testing.assert_array_equal(census.test.age, ages)
    np.testing.assert_array_equal(census.test.domain_ids, [0 if a < 30 else 1 if a < 50 else 2 for a in ages])
    for s in (census.train, census.val):                          # and the age input is the same person's
        np.testing.assert_allclose(s.num[:, 0] * census.num_std[0] + census.num_mean[0], s.age, atol=1e-3)
        assert s.domain_ids.dtype == np.int64 and set(np.unique(s.domain_ids)) == {0, 1, 2}
    assert AGE_EDGES == (30, 50) and age_domain_names() == ("age<30", "30-49", "age>=50")
    assert age_domain_names((18, 40, 65)) == ("age<18", "18-39", "40-64", "age>=65")
    np.testing.assert_array_equal(age_domain_ids(np.array([0, 17, 18, 64, 65, 90]), (18, 65)), [0, 0, 1, 1, 2, 2])
    with pytest.raises(ValueError, match="strictly increasing"):
        age_domain_ids(np.array([1]), (50, 30))


def test_m3oe_trains_on_the_census_slice(census):
    """The data path end to end; 240 training rows are far too few for meaningful per-cell AUCs."""
    torch.manual_seed(0)
    cfg = MultiDomainConfig(arch="m3oe", embed_dim=2, width=8, tower_hidden=4, num_shared_experts=2)
    m = cfg.build(vocab_sizes=census.vocab_sizes, num_continuous=7, num_domains=3, num_tasks=2)
    assert isinstance(m, MultiDomainModel) and isinstance(m.embedding, TabularEmbedding)
    r = train_multidomain(m, census.train, census.val, census.test, epochs=6, batch_size=32, lr=1e-2, patience=6)
    losses = [h["train_loss"] for h in r.history]
    assert r.epochs_run == 6 and losses[-1] < 0.7 * losses[0], losses
    # nobody under 30 in the slice's test rows earns > 50K: that cell has no AUC, every other one has
    assert census.test.labels[census.test.domain_ids == 0, 0].sum() == 0
    assert math.isnan(r.test_auc[0][0])
    assert all(0 <= a <= 1 for d, row in enumerate(r.test_auc) for t, a in enumerate(row) if (d, t) != (0, 0))
    assert math.isclose(r.test_mean, np.nanmean(np.array(r.test_auc)))


def test_trainer_refuses_an_empty_validation_split():
    empty = _synthetic(0, 1)
    with pytest.raises(ValueError, match="train and val must hold at least one row, got 200 and 0"):
        train_multidomain(_small("m3oe"), _synthetic(200, 0), empty, epochs=1)
