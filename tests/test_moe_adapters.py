"""METHODS.md C3 (MoE adapters with a distribution-discriminative auto-selector, Yu et al. 2024):
out-of-distribution inputs get exactly the frozen backbone's output; experts activated by earlier
tasks, older routers and the backbone are bit-identical after a new task; the sparse adapter
equals its dense reference; task routers are softmax over the top-k logits."""
import copy

import pytest
import torch
from torch import nn

from moekit.continual import DistributionSelector, MoEAdapters, auto_forward, train_adapter_task


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(d), nn.Linear(d, d)

    def forward(self, h):
        return h + torch.tanh(self.fc(self.norm(h)))


def _model(d=12, E=5, K=2, L=2, **kw):
    torch.manual_seed(0)
    return MoEAdapters([Block(d) for _ in range(L)], d_model=d, num_experts=E, top_k=K, d_adapter=4,
                       stem=nn.Linear(7, d), head=nn.LayerNorm(d), **kw)


def _task(shift, n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 7, generator=g) + shift
    y = (x[:, 0] - shift > 0).long()
    return x, y


def _train_task(model, head, x, y, seed=0):
    model.add_task()
    train_adapter_task(model, head, x, y, epochs=3, batch_size=16, lr=1e-2, seed=seed)
    return model.finish_task(x)


def test_adapters_start_at_zero_and_task_none_is_the_frozen_backbone():
    m = _model()
    x = torch.randn(9, 7)
    backbone = nn.Sequential(m.stem, *m.blocks, m.head)
    torch.testing.assert_close(m(x), backbone(x), rtol=0, atol=0)
    m.add_task()
    torch.testing.assert_close(m(x, 0), m(x), rtol=0, atol=0)          # zero down-projections
    assert not any(p.requires_grad for p in backbone.parameters())
    m.train()
    assert not any(mod.training for part in (m.stem, m.blocks, m.head) for mod in part.modules())
    assert m.adapters.training


def test_sparse_adapter_equals_dense_reference_and_gates_are_topk_softmax():
    m = _model(d=10, E=6, K=3)
    m.add_task()
    for bank in m.adapters:
        nn.init.normal_(bank.down_proj, std=0.3)
    for shape in ((1, 10), (97, 10), (4, 5, 10)):
        h = torch.randn(*shape, requires_grad=True)
        out, ref = m.adapter(h, 0, 1), m.adapter_reference(h, 0, 1)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        g1, = torch.autograd.grad(out.square().sum(), h)
        g2, = torch.autograd.grad(ref.square().sum(), h)
        torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-6)
    h = torch.randn(20, 10)
    g_TE = m.gates(h, 0, 0)
    logits = h @ m.routers[0][0].weight.T
    top = logits.topk(3, -1)
    want = torch.zeros(20, 6).scatter(-1, top.indices, torch.softmax(top.values, -1))
    torch.testing.assert_close(g_TE, want, rtol=1e-5, atol=1e-6)
    assert ((g_TE > 0).sum(-1) == 3).all()


def test_activated_experts_old_routers_and_backbone_are_bit_identical_after_a_new_task():
    m = _model()
    heads = [nn.Linear(12, 2), nn.Linear(12, 2)]
    x0, y0 = _task(0.0, seed=0)
    used0 = _train_task(m, heads[0], x0, y0)
    assert all(len(u) >= 1 for u in used0) and m.task_usage[0].sum(-1).allclose(torch.ones(2))
    snap = copy.deepcopy(m.state_dict())
    x1, y1 = _task(3.0, seed=1)
    _train_task(m, heads[1], x1, y1, seed=1)
    after = m.state_dict()
    for k, v in snap.items():
        if k.startswith(("stem", "blocks", "head", "routers.0")):
            assert torch.equal(after[k], v), k
    moved = 0
    for l, bank in enumerate(m.adapters):
        for name in ("up_proj", "down_proj"):
            old, new = snap[f"adapters.{l}.{name}"], getattr(bank, name).detach()
            for e in range(m.num_experts):
                if e in used0[l]:
                    assert torch.equal(old[e], new[e]), (l, name, e)
                else:
                    moved += int(not torch.equal(old[e], new[e]))
    assert moved > 0                         # the free experts did train


def test_a_task_whose_experts_are_all_frozen_keeps_its_outputs_bit_identical():
    m = _model(freeze_share=1e-9)            # every expert a task touches is frozen after it
    x0, y0 = _task(0.0, seed=0)
    _train_task(m, nn.Linear(12, 2), x0, y0)
    out0 = m(x0, 0)
    x1, y1 = _task(3.0, seed=1)
    _train_task(m, nn.Linear(12, 2), x1, y1, seed=1)
    torch.testing.assert_close(m(x0, 0), out0, rtol=0, atol=0)


def test_freeze_share_rule_and_trainable_parameter_count():
    m = _model(E=4)
    assert m.freeze_share == pytest.approx(1 / 4)
    m.add_task()
    per_expert = 2 * 12 * 4
    assert m.trainable_parameters() == 2 * (12 * 4) + 2 * 4 * per_expert
    x, _ = _task(0.0)
    used = m.finish_task(x)
    for l in range(2):
        share = m.task_usage[0][l]
        assert set(used[l]) == set((share >= 1 / 4).nonzero().squeeze(1).tolist())
        assert m.frozen[l] == set(used[l])
    m.add_task()
    assert m.trainable_parameters() == 2 * (12 * 4) + sum(4 - len(u) for u in used) * per_expert
    with pytest.raises(ValueError, match="not finished"):
        m.add_task()


def test_deep_copy_needs_refreeze():
    m = _model()
    x, y = _task(0.0)
    used = _train_task(m, nn.Linear(12, 2), x, y)
    c = copy.deepcopy(m)
    c.refreeze()
    c.add_task()
    before = c.adapters[0].up_proj.detach().clone()
    train_adapter_task(c, nn.Linear(12, 2), x, y, epochs=1, batch_size=16, lr=1e-2)
    for e in used[0]:
        assert torch.equal(before[e], c.adapters[0].up_proj[e])


def test_selector_sends_ood_inputs_to_the_exact_frozen_backbone_output():
    m = _model()
    sel = DistributionSelector(12, d_hidden=4, quantile=0.9, epochs=20, lr=1e-2, batch_size=32)
    heads = [nn.Linear(12, 2), nn.Linear(12, 2)]
    data = [_task(0.0, seed=0), _task(4.0, seed=1)]
    for t, (x, y) in enumerate(data):
        _train_task(m, heads[t], x, y, seed=t)
        assert sel.add_task(m(x)) == t
    for bank in m.adapters:       # make the adapter path visibly different from the backbone
        nn.init.normal_(bank.down_proj, std=0.5)
    # the threshold rule: tau_t is the 0.9-quantile of task t's own training errors
    for t, (x, _) in enumerate(data):
        er = sel.gate.reconstruction_errors(m(x))[:, t]
        assert sel.thresholds[t] == pytest.approx(float(torch.quantile(er.double(), 0.9)), rel=1e-6)
    x_ood = torch.randn(40, 7) * 6 - 20
    x_mix = torch.cat([data[0][0][:20], x_ood, data[1][0][:20]])
    out, task_B = auto_forward(m, sel, x_mix)
    frozen = m(x_mix)
    ood = task_B < 0
    assert ood[20:60].all()
    assert torch.equal(out[ood], frozen[ood])                   # exactly the untouched backbone
    ind = ~ood
    assert ind[:20].float().mean() > 0.5 and ind[60:].float().mean() > 0.5
    assert (task_B[:20][ind[:20]] == 0).all() and (task_B[60:][ind[60:]] == 1).all()
    torch.testing.assert_close(out[ind], m.forward_tasks(x_mix, task_B)[ind], rtol=0, atol=0)
    assert not torch.allclose(out[ind], frozen[ind])


def test_bad_arguments():
    with pytest.raises(ValueError, match="top_k"):
        _model(E=2, K=3)
    with pytest.raises(ValueError, match="blocks must hold"):
        MoEAdapters([], d_model=4)
    with pytest.raises(ValueError, match="freeze_share"):
        _model(freeze_share=0.0)
    m = _model()
    with pytest.raises(ValueError, match="task_id"):
        m(torch.randn(2, 7), 0)
    with pytest.raises(ValueError, match="finish_task needs"):
        m.finish_task(torch.randn(2, 7))
    with pytest.raises(ValueError, match="quantile"):
        DistributionSelector(8, d_hidden=2, quantile=1.5)
