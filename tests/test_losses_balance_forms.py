"""METHODS.md T1 (b), (d), (f): GShard's first-choice loss, DeepSeek's device-level loss and the
global-batch loss over micro-batches — each against an independent numpy / loop reference, at
its known minimum, and reachable by name from the MoE layer."""
import numpy as np
import pytest
import torch

import moekit
from moekit.losses import (
    CountWindow,
    balance_loss,
    device_balance_loss,
    first_choice_loss,
    global_batch_balance_loss,
    load_balancing_loss,
    reset_balance_windows,
    selection_counts,
)
from moekit.optim import UpdateStep, build_optimizer


def _rand(T=97, E=8, K=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g, dtype=torch.float64)
    probs = logits.softmax(-1)
    ids = probs.topk(K, dim=-1).indices
    return probs, ids


# -- numpy references (loops over tokens and experts) ------------------------------------------
def _gshard_ref(probs, ids, mask=None):
    p, first = probs.numpy(), ids[:, 0].numpy()
    T, E = p.shape
    valid = [t for t in range(T) if mask is None or bool(mask[t])]
    S = len(valid)
    c = np.zeros(E)
    m = np.zeros(E)
    for t in valid:
        c[first[t]] += 1
        m += p[t]
    m /= S
    return sum((c[e] / S) * m[e] for e in range(E)) / E


def _device_ref(probs, ids, D):
    p, sel = probs.numpy(), ids.numpy()
    T, E = p.shape
    K = sel.shape[1]
    f = np.zeros(E)
    for t in range(T):
        for k in range(K):
            f[sel[t, k]] += E / (K * T)
    P = p.mean(0)
    per = E // D
    total = 0.0
    for d in range(D):
        group = range(d * per, (d + 1) * per)
        total += np.mean([f[e] for e in group]) * sum(P[e] for e in group)
    return total


@pytest.mark.parametrize("masked", [False, True])
def test_first_choice_loss_matches_loop(masked):
    probs, ids = _rand()
    mask = torch.rand(97, generator=torch.Generator().manual_seed(1)) > 0.3 if masked else None
    got = first_choice_loss(probs, ids, mask=mask)
    assert got.item() == pytest.approx(_gshard_ref(probs, ids, mask), rel=1e-12)


def test_first_choice_loss_minimum_and_first_choice_only():
    E, T = 4, 8
    probs = torch.full((T, E), 1 / E)
    ids = torch.stack([torch.arange(T) % E, (torch.arange(T) + 1) % E], 1)   # first choices balanced
    assert first_choice_loss(probs, ids).item() == pytest.approx(1 / E ** 2)
    # Second choices all on expert 0 change the Switch form's f, not GShard's.
    ids2 = torch.stack([torch.arange(T) % E, torch.zeros(T, dtype=torch.long)], 1)
    assert first_choice_loss(probs, ids2).item() == pytest.approx(1 / E ** 2)
    # All first choices on one expert with probability 1: (1/E) · 1 · 1.
    onehot = torch.zeros(T, E)
    onehot[:, 2] = 1
    assert first_choice_loss(onehot, torch.full((T, 1), 2)).item() == pytest.approx(1 / E)


@pytest.mark.parametrize("D", [1, 2, 4, 8])
def test_device_loss_matches_loop(D):
    probs, ids = _rand()
    got = device_balance_loss(probs, ids, num_devices=D)
    assert got.item() == pytest.approx(_device_ref(probs, ids, D), rel=1e-12)


def test_device_loss_limits():
    probs, ids = _rand()
    E = probs.shape[1]
    switch = load_balancing_loss(probs, selection_counts(ids, E), ids.shape[1])
    assert device_balance_loss(probs, ids, num_devices=E).item() == pytest.approx(switch.item(), rel=1e-12)
    assert device_balance_loss(probs, ids, num_devices=1).item() == pytest.approx(1.0, rel=1e-12)
    # Balanced across devices but not inside them: the device loss is at its minimum 1.
    T = 16
    uniform = torch.full((T, 4), 0.25)
    ids_inside = torch.stack([torch.zeros(T, dtype=torch.long), torch.full((T,), 2)], 1)   # experts 0 and 2
    assert device_balance_loss(uniform, ids_inside, num_devices=2).item() == pytest.approx(1.0)
    assert load_balancing_loss(uniform, selection_counts(ids_inside, 4), 2).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="num_devices must divide num_experts=8"):
        device_balance_loss(probs, ids, num_devices=3)


def test_global_batch_equals_concatenated_batch():
    probs, ids = _rand(T=96, seed=3)
    mask = torch.rand(96, generator=torch.Generator().manual_seed(4)) > 0.2
    whole = load_balancing_loss(probs, selection_counts(ids, 8, mask), 2, mask=mask)
    parts = [slice(0, 40), slice(40, 41), slice(41, 96)]
    got = global_batch_balance_loss([probs[s] for s in parts], [ids[s] for s in parts], masks=[mask[s] for s in parts])
    assert got.item() == pytest.approx(whole.item(), rel=1e-12)
    # Per-micro-batch balance is a different (larger here) quantity: the scope matters.
    skew_p = torch.full((4, 2), 0.5)
    a_ids, b_ids = torch.zeros(4, 1, dtype=torch.long), torch.ones(4, 1, dtype=torch.long)
    glob = global_batch_balance_loss([skew_p, skew_p], [a_ids, b_ids])
    local = [load_balancing_loss(skew_p, selection_counts(i, 2), 1) for i in (a_ids, b_ids)]
    assert glob.item() == pytest.approx(1.0) and all(v.item() == pytest.approx(1.0) for v in local)
    skew_p2 = torch.tensor([[0.9, 0.1]] * 4)
    glob2 = global_batch_balance_loss([skew_p2, skew_p2], [a_ids, b_ids])
    local2 = load_balancing_loss(skew_p2, selection_counts(a_ids, 2), 1)
    assert glob2.item() == pytest.approx(1.0) and local2.item() == pytest.approx(1.8)


def test_global_batch_gradient_equals_concatenated():
    probs, ids = _rand(T=64, seed=5)
    logits = probs.log().clone().requires_grad_(True)
    whole = load_balancing_loss(logits.softmax(-1), selection_counts(ids, 8), 2)
    (g_whole,) = torch.autograd.grad(whole, logits)
    p = logits.softmax(-1)
    got = global_batch_balance_loss([p[:20], p[20:]], [ids[:20], ids[20:]])
    (g_got,) = torch.autograd.grad(got, logits)
    torch.testing.assert_close(g_got, g_whole, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("kind", ["gshard", "device"])
def test_balance_loss_by_name_equals_function(kind):
    moe = moekit.MoE(d_model=16, num_experts=8, top_k=2, balance_loss=kind, aux_loss_coef=0.5,
                     balance_devices=4 if kind == "device" else None, backend="eager").double()
    x = torch.randn(3, 11, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    moe(x)
    r = moe.last_routing
    ref = first_choice_loss(r.probs, r.topk_ids) * 64 if kind == "gshard" else \
        device_balance_loss(r.probs, r.topk_ids, num_devices=4)
    assert moe.aux_loss.item() == pytest.approx(0.5 * ref.item(), rel=1e-10)
    assert balance_loss(kind, r, num_devices=4 if kind == "device" else None).item() == pytest.approx(ref.item())
    assert moe.aux_loss.requires_grad


def test_layer_argument_checks():
    with pytest.raises(ValueError, match="needs balance_devices"):
        moekit.MoE(d_model=8, num_experts=8, balance_loss="device")
    with pytest.raises(ValueError, match="balance_devices applies only"):
        moekit.MoE(d_model=8, num_experts=8, balance_devices=2)
    with pytest.raises(ValueError, match="balance_scope"):
        moekit.MoE(d_model=8, num_experts=8, balance_scope="rank")
    with pytest.raises(ValueError, match="count-based"):
        moekit.MoE(d_model=8, num_experts=8, router="sigmoid", balance_scope="global_batch")
    with pytest.raises(ValueError, match="first choices"):
        moekit.MoE(d_model=8, num_experts=4, router="top_p", balance_loss="gshard")(torch.randn(5, 8))
    cfg = moekit.MoEConfig(num_experts=8, balance_loss="device", balance_devices=2, balance_scope="global_batch")
    assert cfg.build(16).balance_devices == 2 and cfg.build(16).balance_scope == "global_batch"


@pytest.mark.parametrize("kind", ["switch", "gshard", "device"])
def test_layer_global_batch_window(kind):
    """Split one batch into micro-batches: the last micro-batch's loss uses the counts of all of
    them (the concatenated batch's f) with its own P; eval and a reset start afresh."""
    torch.manual_seed(0)
    dev = 2 if kind == "device" else None
    kw = dict(d_model=16, num_experts=4, top_k=2, balance_loss=kind, aux_loss_coef=1.0, balance_devices=dev,
              backend="eager")
    glob = moekit.MoE(**kw, balance_scope="global_batch").double()
    x = torch.randn(30, 16, dtype=torch.float64)
    parts = [x[:7], x[7:19], x[19:]]
    for part in parts:
        glob(part)
    last = glob.last_routing
    glob.train(False)
    r_all = [glob.router(p) for p in parts]
    glob.train(True)
    ids_all = torch.cat([r.topk_ids[:, :1] if kind == "gshard" else r.topk_ids for r in r_all])
    counts = selection_counts(ids_all, 4).double()
    P = last.probs.mean(0)
    f = 4 * counts / counts.sum()
    ref = (f * P).sum() if kind != "device" else (f.view(2, 2).mean(-1) * P.view(2, 2).sum(-1)).sum()
    assert glob.aux_loss.item() == pytest.approx(ref.item(), rel=1e-10)
    assert glob.balance_window.micro_batches == 3
    # A reset (UpdateStep does it after each update) starts a new window: micro-batch scope again.
    assert reset_balance_windows(glob) == 1 and glob.balance_window.counts is None
    local = moekit.MoE(**kw).double()
    local.load_state_dict(glob.state_dict())
    glob(parts[2])
    local(parts[2])
    assert glob.aux_loss.item() == pytest.approx(local.aux_loss.item(), rel=1e-12)
    # Eval leaves the window alone.
    glob.eval()
    glob(parts[0])
    assert glob.balance_window.micro_batches == 1


def test_update_step_resets_window():
    model = moekit.MoE(d_model=8, num_experts=4, top_k=1, router="switch", balance_scope="global_batch")
    opt = build_optimizer(model, lr=1e-2)
    update = UpdateStep(model, opt, lr=1e-2, total_steps=4)
    for _ in range(2):
        model(torch.randn(6, 8)).sum().backward()
    assert model.balance_window.micro_batches == 2
    update(loss_value=0.0)
    assert model.balance_window.micro_batches == 0


def test_count_window_sums():
    w = CountWindow()
    w.add(torch.tensor([1, 2]))
    assert w.add(torch.tensor([3, 0])).tolist() == [4, 2]
    w.reset()
    assert w.counts is None and w.micro_batches == 0


def test_trainer_global_batch_scope_over_grad_accumulation(tmp_path):
    """`--set model.balance_scope=global_batch` in the LM trainer: within one step the second
    micro-batch's loss uses both micro-batches' counts; the update starts a new window."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from test_train import tiny

    from moekit.train.config import apply_overrides
    from moekit.train.data import BatchSampler, build_corpus
    from moekit.train.trainer import Trainer

    run = apply_overrides(tiny(), ["model.balance_scope=global_batch", "model.router=topk", "model.top_k=2",
                                   "train.grad_accum=2", "variants=moe"])
    data = build_corpus(run.data)
    t = Trainer(run, "moe", tmp_path, data=data, progress=False)
    layers = [b.ffn for b in t.model.moe_blocks]
    assert all(m.balance_scope == "global_batch" for m in layers)
    x, y, d = BatchSampler(data[1], seq_len=32, batch_size=8, seed=1).next_batch()
    halves = [lambda: (x[:4], y[:4], d[:4]), lambda: (x[4:], y[4:], d[4:])]
    t.accumulate_gradients(halves)
    m = layers[0]
    assert m.balance_window.micro_batches == 2
    # The window holds the counts of both micro-batches: the concatenated batch's selections.
    t.model.eval()
    t.model(x)
    full_counts = selection_counts(m.last_routing.topk_ids, m.num_experts)
    t.model.train()
    assert m.balance_window.counts.tolist() == full_counts.tolist()
    t.update(loss_value=1.0)
    assert all(layer.balance_window.micro_batches == 0 for layer in layers)
    t.fit(stop_at_step=2)
    assert t.step == 2
