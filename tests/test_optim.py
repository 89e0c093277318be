"""moekit.optim: the one update step equals a hand-written AdamW loop, refuses non-finite
updates without touching parameters, and checks its settings."""
import math

import pytest
import torch

import moekit
from moekit.optim import NonFiniteError, UpdateStep, build_optimizer, lr_at, param_groups


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(11, 16)
        self.norm = torch.nn.LayerNorm(16)
        self.moe = moekit.MoE(d_model=16, num_experts=4, top_k=2, router="sigmoid")
        self.head = torch.nn.Linear(16, 11)

    def forward(self, x):
        return self.head(self.moe(self.norm(self.embed(x))))


def _model(seed=0):
    torch.manual_seed(seed)
    return _Net()


def _loss(model, x):
    logits = model(x)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, 11), x.reshape(-1)) + moekit.aux_loss(model)


def test_schedule_formula():
    lrs = [lr_at(s, lr=1.0, total_steps=20, warmup_steps=5, min_lr_ratio=0.1) for s in range(20)]
    assert lrs[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert lrs[5] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1)
    mid = 5 + 7
    assert lrs[mid] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 7 / 14)))
    assert lr_at(10, lr=0.5, total_steps=20, warmup_steps=2, schedule="constant") == 0.5


def test_update_step_equals_hand_written_loop():
    x = torch.randint(0, 11, (4, 6), generator=torch.Generator().manual_seed(1))
    a, b = _model(), _model()
    opt_a = build_optimizer(a, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95))
    upd = UpdateStep(a, opt_a, lr=1e-2, total_steps=6, warmup_steps=2, min_lr_ratio=0.1, grad_clip=0.5)
    # Reference: AdamW over the same groups, schedule and clipping written out.
    decay = [p for n, p in b.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in b.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt_b = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                              lr=1e-2, betas=(0.9, 0.95))
    for step in range(6):
        upd(_loss(a, x))
        for g in opt_b.param_groups:
            g["lr"] = lr_at(step, lr=1e-2, total_steps=6, warmup_steps=2, min_lr_ratio=0.1)
        _loss(b, x).backward()
        torch.nn.utils.clip_grad_norm_(b.parameters(), 0.5)
        opt_b.step()
        opt_b.zero_grad()
        moekit.update_router_biases(b)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)
    assert upd.step == 6
    for pa, pb in zip(a.buffers(), b.buffers()):      # the bias balancer ran in both
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)


def test_embedding_and_norms_are_not_decayed():
    m = _model()
    m.head.bias.requires_grad_(False)
    groups = param_groups(m, 0.1)
    decayed = {id(p) for p in groups[0]["params"]}
    kept = decayed | {id(p) for p in groups[1]["params"]}
    assert id(m.embed.weight) not in decayed and id(m.norm.weight) not in decayed and id(m.norm.bias) not in decayed
    assert id(m.head.weight) in decayed and id(m.moe.experts.gate_up_proj) in decayed
    assert id(m.head.bias) not in kept and groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_update_changes_nothing(bad):
    m = _model()
    upd = UpdateStep(m, build_optimizer(m, lr=1e-2), lr=1e-2, total_steps=3)
    before = [p.detach().clone() for p in m.parameters()]
    loss = _loss(m, torch.randint(0, 11, (2, 5))) * bad
    with pytest.raises(NonFiniteError, match="non-finite at step 1"):
        upd(loss)
    for p, q in zip(m.parameters(), before):
        assert torch.equal(p, q) and p.grad is None
    assert upd.step == 0


@pytest.mark.parametrize("kwargs, err", [
    (dict(lr=float("nan")), ValueError), (dict(lr=0.0), ValueError), (dict(lr=True), TypeError),
    (dict(lr=1e-3, weight_decay=float("inf")), ValueError), (dict(lr=1e-3, name="lion"), ValueError),
    (dict(lr=1e-3, betas=(0.9, 1.0)), ValueError), (dict(lr=1e-3, betas=0.9), TypeError),
    (dict(lr=1e-3, eps=-1.0), ValueError), (dict(lr=1e-3, fused="yes"), TypeError),
])
def test_build_optimizer_checks(kwargs, err):
    with pytest.raises(err, match=list(kwargs)[-1] if list(kwargs)[-1] != "lr" else "lr"):
        build_optimizer(_model(), **kwargs)


@pytest.mark.parametrize("kwargs, err", [
    (dict(lr=1e-3), ValueError), (dict(lr=1e-3, total_steps=True), TypeError),
    (dict(lr=1e-3, total_steps=5, grad_clip=float("nan")), ValueError),
    (dict(lr=1e-3, total_steps=5, warmup_steps=-1), ValueError),
    (dict(lr=1e-3, total_steps=5, schedule="linear"), ValueError),
    (dict(lr=1e-3, total_steps=5, min_lr_ratio=2.0), ValueError),
])
def test_update_step_checks(kwargs, err):
    m = _model()
    with pytest.raises(err):
        UpdateStep(m, build_optimizer(m, lr=1e-3), **kwargs)
