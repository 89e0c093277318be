"""METHODS.md CV1 (V-MoE's noisy router), G8 (MultiHash) and G16 (DynMoE top-any gating with
expert growth and pruning): each router's invariants against loop references."""
import pytest
import torch

import moekit
from moekit.layers import MultiHashMoE, dynmoe_adapt
from moekit.routing import DynMoERouter, MultiHashRouter, TopKRouter, VMoERouter, build_router, top_any_selection

D, E = 8, 4


# -- V-MoE (CV1) --------------------------------------------------------------------------------
def test_vmoe_eval_is_raw_topk_and_noise_has_variance_one_over_e_squared():
    torch.manual_seed(0)
    r = build_router("vmoe", d_model=D, num_experts=E)
    ref = TopKRouter(D, E, 2, norm="raw")
    ref.load_state_dict(r.state_dict())
    x = torch.randn(64, D)
    r.eval(), ref.eval()
    a, b = r(x), ref(x)
    assert torch.equal(a.expert_ids, b.expert_ids) and torch.equal(a.weights, b.weights)
    # Training: logits = clean + ε, ε ~ N(0, 1/E²).
    r.train()
    clean = ref.logits(x)
    eps = torch.cat([r.logits(x) - clean for _ in range(200)])
    assert abs(eps.mean().item()) < 0.01 and eps.std().item() == pytest.approx(1 / E, rel=0.03)
    # Gates: the raw softmax probabilities of the noisy logits (softmax before top-k; sum ≤ 1).
    torch.manual_seed(3)
    routing = r(x)
    torch.manual_seed(3)
    p = r.logits(x).softmax(-1)
    top = p.topk(2, dim=-1)
    assert torch.equal(routing.topk_ids, top.indices)
    torch.testing.assert_close(routing.weights.view(64, 2), top.values)
    assert bool((routing.weights.view(64, 2).sum(-1) <= 1 + 1e-6).all())
    assert VMoERouter(D, E, noise_std=0.0).noise_std == 0.0


# -- MultiHash (G8) -----------------------------------------------------------------------------
def test_multihash_layer_equals_loop_of_hashed_chunks():
    torch.manual_seed(0)
    H = 2
    layer = MultiHashMoE(d_model=D, num_experts=E, num_hashes=H, vocab_size=30, expert="mlp", d_hidden=6)
    assert sum(p.numel() for p in layer.router.parameters()) == 0
    x = torch.randn(3, 5, D)
    ids = torch.randint(0, 30, (3, 5))
    y = layer(x, token_ids=ids)
    ref = torch.zeros_like(x)
    for b in range(3):
        for s in range(5):
            chunks = []
            for i in range(H):
                e = int(layer.router.table[i, ids[b, s]])
                chunks.append(layer.moe.experts[e](x[b, s, i * D // H:(i + 1) * D // H].unsqueeze(0))[0])
            ref[b, s] = torch.cat(chunks)
    torch.testing.assert_close(y, ref, atol=1e-6, rtol=1e-6)


def test_multihash_depends_only_on_token_id_and_hashes_are_independent():
    r = MultiHashRouter(4, 16, num_hashes=3, seed=1, rows_are_chunks=True)
    ids = torch.arange(300).repeat_interleave(3)                # each token's id on its 3 chunk rows
    a = r(torch.randn(900, 4), token_ids=ids).expert_ids.view(300, 3)
    b = r(torch.randn(900, 4), token_ids=ids).expert_ids.view(300, 3)
    assert torch.equal(a, b)                                     # context-independent
    assert (a[:, 0] != a[:, 1]).float().mean() > 0.8            # different hashes per chunk
    assert torch.equal(a[:, 1], torch.stack([r.expert_of(torch.tensor([t]), 1)[0] for t in range(300)]))
    # On whole tokens (not chunk rows) every row takes hash 0.
    whole = MultiHashRouter(4, 16, num_hashes=3, seed=1)
    assert torch.equal(whole(torch.randn(900, 4), token_ids=ids).expert_ids, a[:, 0].repeat_interleave(3))
    with pytest.raises(ValueError, match="num_hashes must divide d_model=8"):
        MultiHashMoE(d_model=8, num_experts=4, num_hashes=3)


# -- DynMoE (G16) -------------------------------------------------------------------------------
def test_top_any_selection_fallback():
    s = torch.tensor([[0.9, 0.2, 0.7], [0.1, 0.2, 0.3], [0.5, 0.5, 0.1]])
    th = torch.tensor([0.6, 0.25, 0.65])
    sel, fired = top_any_selection(s, th)
    # Row 1 fires nothing: margins (-0.5, -0.05, -0.35) fall back to expert 1; row 2: expert 1 fires.
    assert sel.tolist() == [[True, False, True], [False, True, False], [False, True, False]]
    assert fired.tolist() == [True, False, True]


def test_dynmoe_gates_output_and_gradients():
    torch.manual_seed(0)
    moe = moekit.MoE(d_model=D, num_experts=E, router="dynmoe", expert="mlp", d_hidden=6, aux_loss_coef=0.0)
    x = torch.randn(40, D)
    y = moe(x)
    r = moe.last_routing
    n_T = torch.bincount(r.token_ids, minlength=40)
    assert bool((n_T >= 1).all())                               # every token gets ≥ 1 expert
    assert n_T.unique().numel() > 1                              # top-any: the count varies
    torch.testing.assert_close(r.weights, 1.0 / n_T[r.token_ids].float())
    # The reference: the mean of the experts that fire (or the best margin's expert).
    s = moe.router.scores(x)
    sel, _ = top_any_selection(s.detach(), moe.router.thresholds.detach())
    ref = torch.stack([torch.stack([moe.experts[e](x[t:t + 1])[0] for e in sel[t].nonzero()[:, 0].tolist()]).mean(0)
                       for t in range(40)])
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    # Thresholds and router rows learn from the task loss (straight-through).
    y.square().sum().backward()
    assert moe.router.threshold_logit.grad.abs().sum() > 0 and moe.router.weight.grad.abs().sum() > 0


def test_dynmoe_thresholds_set_the_count():
    torch.manual_seed(1)
    moe = moekit.MoE(d_model=D, num_experts=E, router="dynmoe").eval()
    x = torch.randn(200, D)
    counts = []
    for g in (-3.0, 0.0, 3.0):
        moe.router.threshold_logit.data.fill_(g)
        moe(x)
        counts.append(moe.last_stats.experts_per_token.item())
    assert counts[0] > counts[1] > counts[2] == 1.0            # θ = σ(3) > every σ(cos): top-1 fallback


def test_dynmoe_grows_on_unrouted_tokens_and_prunes_unused_experts():
    torch.manual_seed(2)
    moe = moekit.MoE(d_model=D, num_experts=E, router="dynmoe", expert="mlp", d_hidden=6)
    u = torch.zeros(D)
    u[0] = 1.0
    x = u + 0.1 * torch.randn(64, D)                              # tokens all near direction u
    with torch.no_grad():
        moe.router.weight[3] = -u                                 # expert 3 points away: never chosen
        moe.router.threshold_logit.fill_(10.0)                    # nobody fires: all fall back
    moe.train()
    moe(x)
    assert moe.router.unrouted_count.item() == 64
    out = dynmoe_adapt(moe, max_experts=8)
    assert out["removed"] == [3] and out["added"] == [3] and moe.num_experts == 4
    new_row = moe.router.weight[3]
    mean_dir = torch.nn.functional.normalize(x, dim=-1).sum(0)
    assert torch.nn.functional.cosine_similarity(new_row, mean_dir, dim=0) > 0.999
    assert moe.router.threshold_logit[3].item() == 0.0 and moe.router.unrouted_count.item() == 0
    # The new expert now fires for those tokens (cosine > 0 with threshold ½).
    moe(x)
    assert bool((moe.last_routing.expert_ids == 3).any())
    assert moe.experts.num_experts == 4 and moe(x).shape == x.shape
    # Nothing to change: the pool stays.
    moe.router.threshold_logit.data.fill_(-10.0)
    moe(x)
    assert dynmoe_adapt(moe) == {"added": [], "removed": [], "num_experts": 4}


def test_dynmoe_refuses_other_routers():
    with pytest.raises(TypeError, match="router='dynmoe'"):
        dynmoe_adapt(moekit.MoE(d_model=D, num_experts=E))
    assert isinstance(build_router("dynmoe", d_model=D, num_experts=E), DynMoERouter)
