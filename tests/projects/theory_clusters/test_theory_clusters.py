"""projects/theory_clusters (METHODS.md §15 R1, R7): data generators, the patch-CNN MoE built on
`moekit.MoE`, normalised GD, the routing metrics; the acceptance runs are marked slow."""
import math
import time

import pytest
import torch
import torch.nn.functional as F

from projects.theory_clusters.data import PATCH_KINDS, make_cluster_data, make_latent_cluster_data
from projects.theory_clusters.models import LatentClusterMoE, PatchCNN, PatchMoE, PatchSumRouter, SignHashIds
from projects.theory_clusters.train import (
    NormalizedGD,
    dispatch_entropy,
    expert_param_groups,
    router_purity,
    run_r1,
    run_r7,
    train_patch_moe,
)

FEATURE, CENTER, NOISE, FEATURE_NOISE = (PATCH_KINDS.index(k) for k in ("feature", "center", "noise", "feature_noise"))


def _patches_by_kind(data):
    """(B, 4, d) unscaled patches ordered by kind (feature, centre, noise, feature noise)."""
    B = len(data)
    p_BPd = data.x.double().reshape(B, 4, -1) / 10
    order_BP = torch.argsort(data.kinds, dim=1)                 # position holding each kind
    return p_BPd.gather(1, order_BP[:, :, None].expand_as(p_BPd))


# ------------------------------------------------------------------------------- R1 data
def test_r1_vectors_are_orthonormal():
    train, test = make_cluster_data("S1", n_train=8, n_test=8, seed=3)
    v_8d = torch.cat([train.features, train.centers]).double()
    assert v_8d.shape == (8, 50)
    torch.testing.assert_close(v_8d @ v_8d.T, torch.eye(8, dtype=torch.float64), atol=1e-6, rtol=0)
    assert torch.equal(train.features, test.features) and torch.equal(train.centers, test.centers)


@pytest.mark.parametrize("setting,gamma_max", [("S1", 3.0), ("S3", 2.0)])
def test_r1_each_example_has_the_four_patch_kinds(setting, gamma_max):
    train, _ = make_cluster_data(setting, n_train=2000, n_test=1, seed=1)
    assert train.x.shape == (2000, 200) and train.x.dtype == torch.float32
    assert torch.equal(train.kinds.sort(1).values, torch.arange(4).expand(2000, 4))
    v_Kd, c_Kd = train.features.double(), train.centers.double()
    p = _patches_by_kind(train)
    k, sign = train.cluster, 2 * train.y - 1

    # Feature patch α·y·v_k, α ∈ [0.5, 2]: its coefficient on v_k carries the label's sign.
    a = (p[:, FEATURE] * v_Kd[k]).sum(-1)
    torch.testing.assert_close(p[:, FEATURE], a[:, None] * v_Kd[k], atol=1e-5, rtol=0)
    assert torch.equal(torch.sign(a).long(), sign)
    assert a.abs().min() >= 0.5 - 1e-5 and a.abs().max() <= 2 + 1e-5
    # Cluster centre β·c_k, β ∈ [1, 2].
    b = (p[:, CENTER] * c_Kd[k]).sum(-1)
    torch.testing.assert_close(p[:, CENTER], b[:, None] * c_Kd[k], atol=1e-5, rtol=0)
    assert b.min() >= 1 - 1e-5 and b.max() <= 2 + 1e-5
    # Feature noise ±γ·v_k' of another cluster, γ ∈ [0.5, γ_max], either sign.
    coef_BK = p[:, FEATURE_NOISE] @ v_Kd.T
    k_noise = coef_BK.abs().argmax(-1)
    g = coef_BK.gather(1, k_noise[:, None])[:, 0]
    assert (k_noise != k).all()
    torch.testing.assert_close(p[:, FEATURE_NOISE], g[:, None] * v_Kd[k_noise], atol=1e-5, rtol=0)
    assert g.abs().min() >= 0.5 - 1e-5 and g.abs().max() <= gamma_max + 1e-5
    assert 0.4 < (g > 0).double().mean() < 0.6
    # Gaussian noise N(0, I/d): entries with std 1/√50.
    assert abs(p[:, NOISE].std().item() * math.sqrt(50) - 1) < 0.03
    # Labels and clusters uniform.
    assert 0.45 < train.y.double().mean() < 0.55
    assert (torch.bincount(train.cluster, minlength=4) > 400).all()


def test_r1_seeds_reproduce():
    a, b, c = (make_cluster_data("S2", n_train=64, n_test=32, seed=s) for s in (5, 5, 6))
    for u, v in zip(a, b):
        assert torch.equal(u.x, v.x) and torch.equal(u.y, v.y) and torch.equal(u.kinds, v.kinds)
    assert not torch.equal(a[0].x, c[0].x)


def test_r1_settings_differ_only_as_specified():
    d = {s: make_cluster_data(s, n_train=500, n_test=10, seed=2) for s in ("S1", "S2", "S3", "S4")}
    for s in ("S2", "S3", "S4"):          # same labels, clusters, vectors and patch order
        for field in ("y", "cluster", "kinds", "features", "centers"):
            assert torch.equal(getattr(d[s][0], field), getattr(d["S1"][0], field))
    p = {s: _patches_by_kind(d[s][0]) for s in d}
    same = [FEATURE, CENTER]
    # σ: 1/√d (S1, S3) → 2/√d (S2, S4), the same draw scaled.
    torch.testing.assert_close(p["S2"][:, NOISE], 2 * p["S1"][:, NOISE], atol=1e-5, rtol=0)
    torch.testing.assert_close(p["S2"][:, same + [FEATURE_NOISE]], p["S1"][:, same + [FEATURE_NOISE]])
    # γ: U[0.5, 3] (S1, S2) → U[0.5, 2] (S3, S4), the same uniform draw mapped to the new range.
    torch.testing.assert_close(p["S3"][:, same + [NOISE]], p["S1"][:, same + [NOISE]])
    g1, g3 = (p[s][:, FEATURE_NOISE].norm(dim=-1) for s in ("S1", "S3"))
    torch.testing.assert_close((g3 - 0.5) / 1.5, (g1 - 0.5) / 2.5, atol=1e-5, rtol=0)
    torch.testing.assert_close(p["S4"][:, NOISE], p["S2"][:, NOISE])
    torch.testing.assert_close(p["S4"][:, FEATURE_NOISE], p["S3"][:, FEATURE_NOISE])


def test_r1_unknown_setting_is_refused():
    with pytest.raises(ValueError, match="S1"):
        make_cluster_data("S5")


# ------------------------------------------------------------------------------- R1 model
@pytest.mark.parametrize("activation", ["cubic", "linear"])
def test_patch_cnn_equals_its_conv1d_definition(activation):
    """The matmul path computes Conv1d(kernel = stride = d) → act → Σ patches → class sums."""
    torch.manual_seed(0)
    net = PatchCNN(width=5, activation=activation)
    x = torch.randn(37, 200)

    def reference(x):
        h = net.conv(x.unsqueeze(1))                               # (B, 2m, P)
        h = h ** 3 if activation == "cubic" else h
        h = h.sum(-1)
        return torch.stack([h[:, :5].sum(-1), h[:, 5:].sum(-1)], -1)

    y, y_ref = net(x), reference(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    g = torch.autograd.grad(y.square().sum(), list(net.parameters()))
    g_ref = torch.autograd.grad(y_ref.square().sum(), list(net.parameters()))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3)


def test_router_zero_init_and_exploration_noise():
    net = PatchMoE()
    router = net.moe.router
    assert isinstance(router, PatchSumRouter) and torch.count_nonzero(router.weight) == 0
    x = make_cluster_data("S1", n_train=512, n_test=1, seed=0)[0].x
    router.eval()
    r = router(x)
    assert torch.count_nonzero(r.logits) == 0 and (r.expert_ids == 0).all()     # ties → expert 0
    router.train()
    r = router(x)
    assert (r.weights >= 0).all() and (r.weights < 1).all()                       # gate = 0 + U[0, 1)
    assert torch.bincount(r.expert_ids, minlength=8).min() > 20                   # the noise spreads the load


def test_patch_sum_router_reads_the_sum_over_patches():
    router = PatchSumRouter(200, 8, num_patches=4, noise=0.0)
    with torch.no_grad():
        router.weight.normal_()
    x = torch.randn(9, 200)
    torch.testing.assert_close(router.logits(x), x.reshape(9, 4, 50).sum(1) @ router.weight.T)
    r = router(x)
    torch.testing.assert_close(r.weights, router.logits(x).max(-1).values)       # gate = the top logit


def test_patch_moe_is_the_moe_layer_identity():
    """Eval: logits[t] = gate_t · expert_{e(t)}(x_t), through `moekit.MoE`."""
    torch.manual_seed(1)
    net = PatchMoE(activation="cubic", init_scale=1.0).eval()
    with torch.no_grad():
        net.moe.router.weight.normal_()
    x = torch.randn(41, 200)
    y = net(x)
    logits = net.moe.router.logits(x)
    gate, e = logits.max(-1)
    ref = torch.stack([gate[t] * net.expert(int(e[t]))(x[t:t + 1])[0] for t in range(41)])
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)


def test_normalized_gd_moves_each_expert_by_lr():
    torch.manual_seed(0)
    train, _ = make_cluster_data("S1", n_train=400, n_test=1, seed=0)
    net = PatchMoE()
    opt = NormalizedGD(expert_param_groups(net), lr=1e-3)
    # Router row 0 = Σ_k c_k gives expert 0 the logit 10·β > 0 on every example, the others 0:
    # experts 1…7 get no example (no gradient) and must not move.
    with torch.no_grad():
        net.moe.router.weight[0] = train.centers.sum(0)
    net.moe.router.noise = 0.0
    before = [torch.cat([p.detach().flatten().clone() for p in net.expert(i).parameters()]) for i in range(8)]
    F.cross_entropy(torch.softmax(net(train.x), -1), train.y).backward()
    opt.step()
    for i in range(8):
        after = torch.cat([p.detach().flatten() for p in net.expert(i).parameters()])
        step = (after - before[i]).double().norm().item()
        if i == 0:                                       # every example went to expert 0 (ties)
            assert step == pytest.approx(1e-3, rel=1e-3)
        else:
            assert step == 0
    # Every expert with gradient moves by exactly lr, whatever its gradient's size.
    net.moe.router.noise = 1.0
    with torch.no_grad():
        net.moe.router.weight.zero_()          # zero logits + noise: every expert gets examples
    for p in net.parameters():
        p.grad = None
    F.cross_entropy(torch.softmax(net(train.x), -1), train.y).backward()
    grads = [torch.cat([p.grad.flatten() for p in net.expert(i).parameters()]) for i in range(8)]
    before = [torch.cat([p.detach().flatten().clone() for p in net.expert(i).parameters()]) for i in range(8)]
    opt.step()
    for i in range(8):
        after = torch.cat([p.detach().flatten() for p in net.expert(i).parameters()])
        assert (after - before[i]).double().norm().item() == pytest.approx(1e-3, rel=1e-3)
        torch.testing.assert_close(after - before[i], -1e-3 * grads[i] / grads[i].norm(), rtol=1e-3, atol=1e-9)


def test_normalized_gd_unnormalized_group_is_plain_sgd():
    """A ``normalize=False`` group (the router's) steps exactly as torch's SGD without momentum."""
    torch.manual_seed(0)
    w, v = torch.randn(5, 3, requires_grad=True), torch.randn(4, requires_grad=True)
    w_ref, v_ref = (t.detach().clone().requires_grad_() for t in (w, v))
    opt = NormalizedGD([{"params": [w]}, {"params": [v], "lr": 0.1, "normalize": False}], lr=1e-3)
    ref = torch.optim.SGD([v_ref], lr=0.1)
    for params in ((w, v), (w_ref, v_ref)):
        (params[0].square().sum() + params[1].pow(3).sum()).backward()
    gw = w.grad.clone()
    opt.step()
    ref.step()
    assert torch.equal(v, v_ref)                                             # bit for bit
    torch.testing.assert_close(w, w_ref - 1e-3 * gw / gw.norm())


def test_normalized_gd_refuses_a_bad_lr():
    with pytest.raises(ValueError, match="lr"):
        NormalizedGD([torch.zeros(1, requires_grad=True)], lr=0.0)


def test_dispatch_entropy_on_hand_made_assignments():
    c = torch.arange(4).repeat_interleave(10)                    # 10 examples per cluster
    pure = c + 2                                                 # expert 2+k takes cluster k only
    assert dispatch_entropy(pure, c, num_experts=8, num_clusters=4) == pytest.approx(0.0, abs=1e-12)
    one = torch.zeros_like(c)                                    # one expert sees all four equally
    assert dispatch_entropy(one, c, num_experts=8, num_clusters=4) == pytest.approx(math.log(4))
    # Expert j gets examples j, j + 8, …, a mix of clusters; the formula evaluated by hand.
    spread = torch.arange(40) % 8
    n = torch.zeros(4, 8)
    for t in range(40):
        n[t // 10, t % 8] += 1
    p = n / n.sum(0)
    h = -(torch.where(p > 0, p * p.log(), torch.zeros(()))).sum(0)
    expected = float((n.sum(0) / 40 * h).sum())
    assert dispatch_entropy(spread, c, num_experts=8, num_clusters=4) == pytest.approx(expected, rel=1e-6)
    # Half of expert 0 is cluster 0, half cluster 1; expert 1 pure: weight ½ · log 2.
    e = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    k = torch.tensor([0, 0, 1, 1, 2, 2, 2, 2])
    assert dispatch_entropy(e, k, num_experts=8, num_clusters=4) == pytest.approx(0.5 * math.log(2))


def test_train_patch_moe_smoke():
    train, test = make_cluster_data("S1", n_train=256, n_test=64, seed=0)
    net = PatchMoE()
    log = train_patch_moe(net, train, epochs=3, early_stop=False)
    assert log["epochs"] == 3 and 0 <= log["dispatch_entropy"] <= math.log(4) + 1e-9
    r = run_r1("single_linear", data=(train, test), epochs=2)
    assert 0 <= r.test_acc <= 100 and r.dispatch_entropy is None


# ------------------------------------------------------------------------------- R7
def test_router_purity_on_hand_made_assignments():
    c = torch.arange(8).repeat_interleave(5)
    assert router_purity((c + 3) % 8, c, num_experts=8, num_clusters=8) == 1.0     # a permutation
    assert router_purity(torch.zeros_like(c), c, num_experts=8, num_clusters=8) == pytest.approx(1 / 8)
    # Experts 0 and 1 each get two whole clusters, the others one: purity (5·2 + 5·4)/40 = 0.75.
    e = torch.tensor([0, 0, 1, 1, 2, 3, 4, 5]).repeat_interleave(5)
    assert router_purity(e, c, num_experts=8, num_clusters=8) == pytest.approx(0.75)
    # Splitting a cluster over two experts keeps purity 1.
    assert router_purity(torch.arange(40) % 16 // 2, torch.arange(40) % 16 // 2, num_experts=8,
                         num_clusters=8) == 1.0


def test_latent_cluster_data_reproducible_and_separated():
    (a, _), (b, _) = make_latent_cluster_data(seed=4, n_train=256), make_latent_cluster_data(seed=4, n_train=256)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y) and a.x.shape == a.y.shape == (256, 32)
    # Nearest-centre assignment recovers the clusters: they are well separated.
    mu = torch.stack([a.x[a.cluster == k].mean(0) for k in range(8)])
    assert (torch.cdist(a.x, mu).argmin(-1) == a.cluster).double().mean() > 0.99


def test_sign_hash_ids_and_hash_routing_are_fixed():
    h = SignHashIds(32, 8, seed=1)
    x = torch.randn(100, 32)
    ids = h(x)
    expected = sum(((x @ h.proj[i]) > 0).long() << i for i in range(8))
    assert torch.equal(ids, expected) and ids.min() >= 0 and ids.max() < 256
    net = LatentClusterMoE(routing="hash", seed=1)
    assert list(net.moe.router.parameters()) == []
    before = net.experts_of(x)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p))
    assert torch.equal(net.experts_of(x), before)
    assert torch.equal(before, net.moe.router.table[ids])


def test_run_r7_smoke():
    out = run_r7(seed=0, steps=3, n_train=128, n_test=64)
    assert set(out) == {"learned", "hash", "dense"}
    assert out["dense"].purity is None and 0 < out["learned"].purity <= 1


# ------------------------------------------------------------------------------- acceptance
@pytest.mark.slow
def test_r1_acceptance_s1():
    """METHODS §15 R1 library acceptance on S1: MoE(cubic) ≥ 97 % mean over seeds and ≥ 15
    points above the best single CNN (official recipe, 16k/16k examples)."""
    t0 = time.perf_counter()
    data = make_cluster_data("S1", seed=0)
    moe = [run_r1("moe_cubic", data=data, seed=s) for s in (0, 1)]
    singles = [run_r1(m, data=data, seed=0) for m in ("single_linear", "single_cubic")]
    mean = sum(r.test_acc for r in moe) / len(moe)
    best_single = max(r.test_acc for r in singles)
    print(f"S1 MoE(cubic) {[round(r.test_acc, 2) for r in moe]}, singles {[round(r.test_acc, 2) for r in singles]}, "
          f"{time.perf_counter() - t0:.0f} s")
    assert mean >= 97.0
    assert mean - best_single >= 15.0
    assert all(r.dispatch_entropy < 0.3 for r in moe)


@pytest.mark.slow
def test_r7_learned_beats_hash_beats_dense():
    out = run_r7(seed=0)
    assert out["learned"].test_mse < out["hash"].test_mse < out["dense"].test_mse
    assert out["learned"].purity > 0.9


def test_runs_leave_the_global_rng_alone_and_refuse_ignored_arguments():
    state = torch.random.get_rng_state()
    run_r7(steps=1, n_train=64, n_test=32)
    assert torch.equal(state, torch.random.get_rng_state())
    with pytest.raises(ValueError, match=r"data_kwargs \['num_clusters'\] only apply when data is None"):
        run_r7(steps=1, data=object(), num_clusters=4)


def test_run_script_arguments_and_summary():
    from projects.theory_clusters.run import mean_std, parse_args
    args = parse_args(["--quick", "--seeds", "4", "5"])
    assert (args.settings, args.seeds, args.single_seeds, args.r7_seeds, args.n) == (["S1"], [4], [0], [0], 4000)
    assert parse_args([]).seeds == [0, 1, 2] and parse_args([]).settings == ["S1", "S2", "S3", "S4"]
    assert mean_std([1.0, 3.0]) == "2.00 ± 1.00" and mean_std([0.5], 3) == "0.500"
