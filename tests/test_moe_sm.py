"""MoE-SM with the Smart-Merger (Swin2-MoSE, METHODS.md CV2): per-example top-k gate, MLP experts,
the K gate-scaled outputs fused by a 3×3 convolution in ascending expert id, CV² balance loss."""
import pytest
import torch
from equivalence import assert_same_outputs_and_grads

import moekit
from moekit.layers import MoESM, MoEStats


def _layer(*, d_model=8, num_experts=4, top_k=2, seed=0, **kw):
    torch.manual_seed(seed)
    m = MoESM(d_model=d_model, num_experts=num_experts, top_k=top_k, **kw)
    torch.nn.init.normal_(m.router.weight)            # the official gate starts at zero: make experts differ
    for p in (m.experts.up_bias, m.experts.down_bias):
        torch.nn.init.normal_(p, std=0.1)
    return m


def _reference(m, x):
    """The layer written plainly, one example at a time (the official code's arithmetic)."""
    W, conv = m.router.weight, m.merger
    out = []
    for b in range(x.shape[0]):
        logits = x[b].mean(0) @ W.T
        top = torch.topk(logits, m.top_k)
        gates = torch.softmax(top.values, 0)
        chosen = sorted(zip(top.indices.tolist(), gates))            # ascending expert id
        stack = torch.stack([g * m.experts[e](x[b]) for e, g in chosen])          # (K, N, D)
        if conv is None:
            out.append(stack.sum(0))
        else:
            out.append(torch.nn.functional.conv2d(stack[None], conv.weight, conv.bias, padding=1)[0, 0])
    return torch.stack(out)


@pytest.mark.parametrize("merger", ["smart", "sum"])
@pytest.mark.parametrize("B,N,D,E,K", [(3, 7, 12, 5, 3), (1, 1, 8, 4, 1), (4, 9, 8, 8, 2), (2, 5, 4, 3, 3)])
def test_matches_a_plain_loop_reference(merger, B, N, D, E, K):
    m = _layer(d_model=D, num_experts=E, top_k=K, merger=merger).eval()
    x = torch.randn(B, N, D)
    y = m(x)
    assert y.shape == (B, N, D)
    torch.testing.assert_close(y, _reference(m, x), rtol=1e-5, atol=1e-5)


def test_channel_order_is_ascending_expert_id_not_gate_rank():
    m = _layer(d_model=8, num_experts=6, top_k=3, seed=1).eval()
    with torch.no_grad():
        m.merger.weight.normal_()                       # channels weighted differently
    x = torch.randn(8, 5, 8)
    y = m(x)
    pref = m.last_example_routing.topk_ids
    assert (pref != pref.sort(1).values).any(1).all(), "every example's preference order must differ from id order"
    torch.testing.assert_close(y, _reference(m, x), rtol=1e-5, atol=1e-5)
    # The same stack in gate-rank order gives another result: the order matters and is checked.
    w = m.last_example_routing.weights.view(8, 3)
    by_rank = torch.stack([torch.stack([w[b, j] * m.experts[int(pref[b, j])](x[b]) for j in range(3)])
                           for b in range(8)])
    y_rank = m.merger(by_rank).squeeze(1)
    assert (y_rank - y).abs().max() > 1e-3


def test_one_expert_and_a_centred_delta_kernel_is_the_gate_scaled_expert():
    m = _layer(d_model=8, num_experts=4, top_k=1, seed=2).eval()
    with torch.no_grad():
        m.merger.weight.zero_()
        m.merger.weight[0, 0, 1, 1] = 1.0
        m.merger.bias.zero_()
    x = torch.randn(5, 6, 8)
    y = m(x)
    r = m.last_example_routing
    assert torch.equal(r.weights, torch.ones(5))                      # softmax over one logit
    for b in range(5):
        e = int((x[b].mean(0) @ m.router.weight.T).argmax())
        assert int(r.topk_ids[b, 0]) == e
        torch.testing.assert_close(y[b], r.weights[b] * m.experts[e](x[b]), rtol=1e-6, atol=1e-6)


def test_every_token_of_an_example_shares_its_experts():
    m = _layer(num_experts=5, top_k=2, seed=3)
    x = torch.randn(4, 6, 8)
    m(x)
    r, rb = m.last_routing, m.last_example_routing
    for t in range(4 * 6):
        b = t // 6
        assert sorted(r.expert_ids[r.token_ids == t].tolist()) == sorted(rb.topk_ids[b].tolist())


def test_sum_merger_is_the_moe_layer_routed_per_example():
    """With the plain sum, MoE-SM is `moekit.MoE(route_by="example")` on the same gate and experts."""
    m = _layer(num_experts=5, top_k=2, seed=4, merger="sum").eval()
    moe = moekit.MoE(d_model=8, num_experts=5, top_k=2, router=m.router, experts=m.experts,
                     route_by="example").eval()
    x = torch.randn(3, 7, 8)
    torch.testing.assert_close(m(x), moe(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("merger", ["smart", "sum"])
def test_backends_agree(merger):
    ref = _layer(merger=merger, seed=5, backend="eager")
    fast = _layer(merger=merger, seed=5, backend="grouped_mm")
    fast.load_state_dict(ref.state_dict())
    assert_same_outputs_and_grads(ref, fast, torch.randn(3, 5, 8), rtol_y=1e-5)


def _official_cv2(v):
    v = v.float()
    return v.var() / (v.mean() ** 2 + 1e-10)           # torch.var: Bessel's correction


def test_aux_loss_is_the_official_balance_loss():
    m = _layer(num_experts=4, top_k=2, seed=6, balance_coef=0.5).train()
    x = torch.randn(7, 3, 8)
    m(x)
    ids, w = m.last_example_routing.topk_ids, m.last_example_routing.weights.view(7, 2)
    gates = torch.zeros(7, 4).scatter(1, ids, w)
    want = 0.5 * (_official_cv2(gates.sum(0)) + _official_cv2((gates > 0).sum(0)))
    assert want > 0
    torch.testing.assert_close(m.aux_loss, want)
    assert m.aux_loss.requires_grad
    torch.testing.assert_close(moekit.aux_loss(m), m.aux_loss)


def test_aux_loss_is_zero_at_uniform_importance_and_load():
    # k = E with the official zero-initialised gate: every gate 1/E, every expert takes every example.
    m = MoESM(d_model=8, num_experts=4, top_k=4)
    m(torch.randn(3, 5, 8))
    assert m.aux_loss.item() == 0.0
    # E = 2, k = 1: one example each, gate 1 each.
    m = MoESM(d_model=2, num_experts=2, top_k=1)
    with torch.no_grad():
        m.router.weight.copy_(torch.eye(2))
    x = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    m(x)
    assert m.last_example_routing.topk_ids.view(-1).tolist() == [0, 1]
    assert m.aux_loss.item() == 0.0


def test_noise_is_a_training_option():
    m = _layer(seed=7, with_noise=True)
    x = torch.randn(6, 4, 8)
    m.eval()
    y_eval = m(x)
    m.with_noise = False
    torch.testing.assert_close(m(x), y_eval, rtol=0, atol=0)          # no noise in eval
    m.with_noise = True
    m.train()
    m(x)
    assert "load_probs" in m.last_example_routing.extras            # the smooth load estimate
    m.aux_loss.backward()
    assert m.router.noise_weight.grad is not None and m.router.noise_weight.grad.abs().sum() > 0


def test_gradients_and_statistics():
    m = _layer(num_experts=4, top_k=2, seed=8)
    x = torch.randn(5, 6, 8, requires_grad=True)
    (m(x).square().sum() + m.aux_loss).backward()
    for name, p in m.named_parameters():
        if name != "router.noise_weight":                # noise off: W_noise takes no part
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    s = m.last_stats
    assert isinstance(s, MoEStats) and s.num_tokens == 5
    assert int(s.tokens_per_expert.sum()) == 5 * 2                  # examples × K
    assert m in moekit.moe_layers(torch.nn.Sequential(m))


def test_defaults_are_the_papers():
    m = MoESM(d_model=12)
    assert (m.num_experts, m.top_k, m.d_hidden, m.balance_coef, m.with_noise) == (8, 2, 12, 1e-2, False)
    assert m.merger.in_channels == 2 and m.merger.out_channels == 1 and m.merger.kernel_size == (3, 3)
    assert torch.equal(m.router.weight, torch.zeros_like(m.router.weight))
    assert m.experts.up_bias is not None


def test_bad_input():
    with pytest.raises(ValueError, match="merger must be one of"):
        MoESM(d_model=8, merger="conv")
    with pytest.raises(ValueError, match="top_k must be <= num_experts=4"):
        MoESM(d_model=8, num_experts=4, top_k=5)
    with pytest.raises(TypeError, match="top_k"):
        MoESM(d_model=8, top_k=None)
    with pytest.raises(ValueError, match="balance_coef"):
        MoESM(d_model=8, balance_coef=-1.0)
    m = MoESM(d_model=8)
    with pytest.raises(ValueError, match=r"x must have shape \(B, N, 8\)"):
        m(torch.randn(5, 8))
    with pytest.raises(ValueError, match="last dimension d_model=8"):
        m(torch.randn(2, 5, 6))
