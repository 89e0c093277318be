"""The Core routers' own invariants (METHODS.md G2, G4, G13, §0.2)."""
import pytest
import torch

from moekit import MoE
from moekit.routing import NoisyTopKRouter, SigmoidRouter, SwitchRouter, TopKRouter


def test_topk_gates_nonnegative_k_nonzeros_and_renorm_sums_to_one():
    r = TopKRouter(8, 6, 3).eval()
    out = r(torch.randn(20, 8))
    assert torch.all(out.weights >= 0)
    assert torch.equal(torch.bincount(out.token_ids, minlength=20), torch.full((20,), 3))
    torch.testing.assert_close(torch.zeros(20).index_add(0, out.token_ids, out.weights), torch.ones(20))


def test_norm_modes():
    x = torch.randn(10, 8)
    raw = TopKRouter(8, 5, 2, norm="raw").eval()
    sc = TopKRouter(8, 5, 2, norm="scaled", route_scale=2.5).eval()
    after = TopKRouter(8, 5, 2, softmax="after").eval()
    sc.load_state_dict(raw.state_dict())
    after.load_state_dict(raw.state_dict())
    p = torch.softmax(raw.logits(x), -1)
    top, ids = p.topk(2, -1)
    w_raw = raw(x).weights.view(10, 2)
    torch.testing.assert_close(w_raw, top)
    assert torch.all(w_raw.sum(-1) <= 1 + 1e-6)
    torch.testing.assert_close(sc(x).weights.view(10, 2), 2.5 * top / top.sum(-1, keepdim=True))
    # Softmax after top-k equals renormalised softmax-before.
    torch.testing.assert_close(after(x).weights.view(10, 2), top / top.sum(-1, keepdim=True))
    with pytest.raises(ValueError, match="norm='raw' needs softmax='before'"):
        TopKRouter(8, 5, 2, norm="raw", softmax="after")
    with pytest.raises(ValueError, match="norm must be one of"):
        TopKRouter(8, 5, 2, norm="l2")
    with pytest.raises(ValueError, match="route_scale"):
        TopKRouter(8, 5, 2, route_scale=2.0)


def test_noisy_topk_eval_is_clean_topk_and_train_is_noisy():
    r = NoisyTopKRouter(8, 6, 2)
    torch.nn.init.normal_(r.weight)
    torch.nn.init.normal_(r.noise_weight)
    x = torch.randn(50, 8)
    r.eval()
    a, b = r(x), r(x)
    assert torch.equal(a.expert_ids, b.expert_ids)
    clean = TopKRouter(8, 6, 2).eval()
    clean.weight.data.copy_(r.weight.data)
    assert torch.equal(clean(x).expert_ids, a.expert_ids)
    torch.testing.assert_close(clean(x).weights, a.weights)
    r.train()
    assert not torch.equal(r(x).expert_ids, a.expert_ids)
    assert "load_probs" in r(x).extras


def test_noisy_topk_load_probability_matches_monte_carlo():
    torch.manual_seed(1)
    r = NoisyTopKRouter(4, 5, 2)
    torch.nn.init.normal_(r.weight, std=0.5)
    torch.nn.init.normal_(r.noise_weight, std=0.5)
    x = torch.randn(6, 4)
    clean = r.logits(x).detach()
    std = r.noise_std(x).detach()
    # P(x, i): with the other experts' noise fixed at one draw, resample i's noise alone.
    noisy = clean + torch.randn_like(clean) * std
    analytic = r.load_probs(clean, noisy, std)
    n = 20000
    errs = []
    for i in range(5):
        draws = clean[:, i:i + 1] + torch.randn(6, n) * std[:, i:i + 1]           # (T, n)
        others = noisy.clone()
        others[:, i] = float("-inf")
        kth = others.topk(2, -1).values[:, 1:2]                                   # k-th best of the rest
        mc = (draws > kth).float().mean(1)
        errs.append((mc - analytic[:, i]).abs().mean())
    assert max(errs) < 0.02


def test_noisy_topk_load_loss_trains_noise_weights():
    moe = MoE(d_model=8, num_experts=4, top_k=1, router="noisy_topk", aux_loss_coef=1.0)
    torch.nn.init.normal_(moe.router.weight)
    moe(torch.randn(32, 8))
    moe.aux_loss.backward()
    assert moe.router.noise_weight.grad.abs().sum() > 0


def test_switch_gate_is_raw_prob_and_jitter_only_in_training():
    r = SwitchRouter(8, 4, jitter=0.1)
    x = torch.randn(30, 8)
    r.eval()
    out = r(x)
    p = torch.softmax(r.logits(x), -1)
    torch.testing.assert_close(out.weights, p.max(-1).values)
    torch.testing.assert_close(r.logits(x), r.logits(x))
    r.train()
    assert not torch.equal(r.logits(x), r.logits(x))
    with pytest.raises(ValueError, match="top-1"):
        SwitchRouter(8, 4, top_k=2)


def test_sigmoid_bias_changes_selection_not_weights():
    r = SigmoidRouter(8, 4, 2).eval()
    x = torch.randn(40, 8)
    before = r(x)
    r.expert_bias.copy_(torch.tensor([5.0, 5.0, 0.0, 0.0]))
    after = r(x)
    assert set(after.expert_ids.tolist()) == {0, 1}
    s = torch.sigmoid(r.logits(x))
    ids = after.expert_ids.view(40, 2)
    w = s.gather(1, ids) / s[:, :2].sum(-1, keepdim=True)
    torch.testing.assert_close(after.weights.view(40, 2), w)
    assert not torch.equal(before.expert_ids, after.expert_ids)


@pytest.mark.parametrize("groups,limit,K", [(4, 2, 4), (8, 3, 6), (2, 1, 2)])
def test_group_limited_routing_limits_groups_and_all_groups_is_plain_topk(groups, limit, K):
    """METHODS S3 (device / node-limited routing, DeepSeek-V2/V3): every token's experts lie in
    at most `limit` groups, and a limit of every group routes exactly as without groups."""
    torch.manual_seed(groups)
    E = 16
    limited = SigmoidRouter(12, E, K, num_groups=groups, topk_groups=limit).eval()
    x = torch.randn(50, 12)
    limited.expert_bias.uniform_(-0.3, 0.3)         # the balancing bias takes part in group scores
    ids = limited(x).expert_ids.view(50, K)
    per_token_groups = [len(set((row // (E // groups)).tolist())) for row in ids]
    assert max(per_token_groups) <= limit
    everything = SigmoidRouter(12, E, K, num_groups=groups, topk_groups=groups).eval()
    plain = SigmoidRouter(12, E, K).eval()
    everything.load_state_dict(limited.state_dict())
    plain.load_state_dict(limited.state_dict())
    a, b = everything(x), plain(x)
    assert torch.equal(a.expert_ids, b.expert_ids) and torch.equal(a.weights, b.weights)


def test_sigmoid_group_limited_selection():
    r = SigmoidRouter(8, 8, 2, num_groups=4, topk_groups=1).eval()
    x = torch.randn(30, 8)
    ids = r(x).expert_ids.view(30, 2)
    assert torch.all(ids[:, 0] // 2 == ids[:, 1] // 2)             # both from the one allowed group
    with pytest.raises(ValueError, match="num_groups must divide"):
        SigmoidRouter(8, 8, 2, num_groups=3)
    with pytest.raises(ValueError, match="exceeds"):
        SigmoidRouter(8, 8, 3, num_groups=4, topk_groups=1)


def test_bias_balancing_reduces_imbalance():
    torch.manual_seed(0)
    moe = MoE(d_model=8, num_experts=4, top_k=1, router="sigmoid", aux_loss_coef=0.0,
              router_kwargs={"bias_update_rate": 0.05})
    moe.router.weight.data[0] += 2.0                         # expert 0 attracts nearly everything
    x = torch.randn(256, 8) + moe.router.weight.data[0] * 0.5
    moe(x)
    start = moe.last_stats.load_imbalance.item()
    for _ in range(60):
        moe(x)
        import moekit
        moekit.update_router_biases(moe)
    moe(x)
    assert moe.last_stats.load_imbalance.item() < 0.6 * start
    assert moe.router.expert_bias[0] < 0
    assert not moe.router.expert_bias.requires_grad


def test_bias_loads_accumulate_over_micro_batches():
    r = SigmoidRouter(8, 4, 1).train()
    r(torch.randn(10, 8))
    r(torch.randn(6, 8))
    assert r.load_accum.sum().item() == 16
    r.update_bias()
    assert r.load_accum.sum().item() == 0
    r.eval()(torch.randn(5, 8))
    assert r.load_accum.sum().item() == 0                   # eval does not count


def test_router_state_dict_names():
    assert set(TopKRouter(8, 4, 2).state_dict()) == {"weight"}
    assert set(SigmoidRouter(8, 4, 2).state_dict()) == {"weight", "expert_bias"}
    assert set(NoisyTopKRouter(8, 4, 2).state_dict()) == {"weight", "noise_weight"}


# -- the fused gate option ------------------------------------------------------------------
@pytest.mark.parametrize("name", ["topk", "switch", "sigmoid"])
def test_fused_gate_option(name, monkeypatch):
    """``fused_gate``: "auto" never picks the kernel on the CPU; True without a device the
    kernels run on is a clear error; anything else is refused."""
    from moekit.routing import build_router

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="fused_gate must be"):
        build_router(name, d_model=8, num_experts=4, fused_gate="yes")
    auto = build_router(name, d_model=8, num_experts=4)
    assert auto.fused_gate == "auto"
    forced = build_router(name, d_model=8, num_experts=4, fused_gate=True)
    x = torch.randn(5, 8)
    auto(x)                                            # PyTorch gate on the CPU
    with pytest.raises(ValueError, match="fused_gate=True needs float32 logits on a device"):
        forced(x)


def test_fused_gate_true_is_refused_where_the_kernel_does_not_apply():
    from moekit.routing import build_router

    with pytest.raises(ValueError, match="softmax='after'"):
        build_router("topk", d_model=8, num_experts=4, softmax="after", fused_gate=True)
    with pytest.raises(ValueError, match="num_groups=2"):
        build_router("sigmoid", d_model=8, num_experts=4, num_groups=2, fused_gate=True)
