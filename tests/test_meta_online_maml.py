"""Online mixture of MAML initialisations (METHODS.md M2): responsibilities sum to 1, one component
with no spawning is MAML step for step, and a new component appears only when its CRP-weighted
likelihood wins."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moekit.meta import OnlineMAMLMixture


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 1))


def _task(fn, seed, n=10):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(2 * n, 1, generator=g) * 4 - 2
    y = fn(x)
    return x[:n], y[:n], x[n:], y[n:]


def test_one_component_without_spawning_is_maml():
    net = _net()
    ref = copy.deepcopy(net)
    mix = OnlineMAMLMixture(net, inner_lr=0.05, inner_steps=2, meta_lr=1e-2, concentration=0.0)
    opt = torch.optim.Adam(ref.parameters(), lr=1e-2)
    for s in range(4):
        xs, ys, xq, yq = _task(lambda x, s=s: torch.sin(x + s), s)
        out = mix.observe(xs, ys, xq, yq)
        assert not out["spawned"] and torch.equal(out["responsibilities"], torch.ones(1))
        # plain MAML (Finn et al. 2017), written out: two SGD steps on the support, query MSE, Adam
        params = list(ref.parameters())
        fast = params
        for _ in range(2):
            pred = F.linear(torch.tanh(F.linear(xs, fast[0], fast[1])), fast[2], fast[3])
            grads = torch.autograd.grad(F.mse_loss(pred, ys), fast, create_graph=True)
            fast = [p - 0.05 * g for p, g in zip(fast, grads)]
        loss = F.mse_loss(F.linear(torch.tanh(F.linear(xq, fast[0], fast[1])), fast[2], fast[3]), yq)
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert out["loss"] == pytest.approx(loss.item(), rel=1e-6)
        for a, b in zip(mix.components[0].parameters(), ref.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert len(mix.components) == 1 and mix.counts == [4.0]


def test_responsibilities_sum_to_one_and_the_new_component_wins_when_it_appears():
    torch.manual_seed(0)
    mix = OnlineMAMLMixture(_net(), inner_lr=0.05, concentration=1.0, noise_std=0.3, max_components=4)
    fns = [lambda x: torch.sin(2 * x), lambda x: 3 * x + 2, lambda x: -x.pow(2)]
    spawned_any = False
    for s in range(12):
        out = mix.observe(*_task(fns[s % 3], s))
        for key in ("responsibilities", "candidate_responsibilities"):
            torch.testing.assert_close(out[key].sum(), torch.tensor(1.0))
            assert (out[key] >= 0).all()
        cand = out["candidate_responsibilities"]
        if out["spawned"]:
            spawned_any = True
            assert int(cand.argmax()) == len(cand) - 1           # the candidate's CRP-weighted likelihood won
            assert len(out["responsibilities"]) == len(mix.components)
        elif s > 0 and len(cand) == len(mix.components) + 1:
            assert int(cand.argmax()) != len(cand) - 1
        assert len(mix.counts) == len(mix.components) <= 4
    assert spawned_any
    assert sum(mix.counts) == pytest.approx(12.0)


def test_the_concentration_decides_spawning():
    tasks = [_task(lambda x: torch.sin(3 * x), 0), _task(lambda x: 5 * x - 4, 1)]
    never = OnlineMAMLMixture(_net(), concentration=1e-30)
    always = OnlineMAMLMixture(_net(), concentration=1e30)
    for t in tasks:
        a, b = never.observe(*t), always.observe(*t)
    assert not a["spawned"] and len(never.components) == 1
    assert b["spawned"] and len(always.components) == 2
    # the first task always goes to component 0, whatever α
    fresh = OnlineMAMLMixture(_net(), concentration=1e30)
    assert not fresh.observe(*tasks[0])["spawned"] and fresh.counts == [1.0]


def test_select_and_predict_use_the_matching_component():
    torch.manual_seed(0)
    mix = OnlineMAMLMixture(_net(), inner_lr=0.05, meta_lr=1e-2, concentration=0.0)
    mix.components.append(_net(1))          # a second, untrained component with no tasks: prior 0
    mix.counts.append(0.0)
    mix._updates.append(mix._update_for(mix.components[1]))
    xs, ys, xq, yq = _task(torch.sin, 0)
    mix.observe(xs, ys, xq, yq)
    assert mix.select(xs, ys) == 0
    assert mix.predict(xs, ys, xq).shape == (10, 1)
    with pytest.raises(ValueError, match="component"):
        mix.predict(xs, ys, xq, component=5)


def test_bad_inputs():
    with pytest.raises(TypeError, match="net"):
        OnlineMAMLMixture("net")
    with pytest.raises(ValueError, match="concentration"):
        OnlineMAMLMixture(_net(), concentration=-1.0)
    mix = OnlineMAMLMixture(_net())
    xs, ys, xq, yq = _task(torch.sin, 0)
    with pytest.raises(ValueError, match="y_query"):
        mix.observe(xs, ys, xq, yq[:3])
