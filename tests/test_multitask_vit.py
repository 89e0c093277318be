"""Mod-Squad's task–expert mutual information (METHODS.md MT4), task-conditioned routing, MoE
attention with per-task routers, the multi-task ViT, M³ViT's fixed per-task expert subsets (MT5)
and task sub-model extraction."""
import numpy as np
import pytest
import torch

import moekit
from moekit.analysis.routing import mutual_information
from moekit.layers import MixtureOfAttentionHeads
from moekit.losses import mutual_information_from_joint, mutual_information_loss, task_expert_joint
from moekit.models import (
    MULTITASK_VIT_METHODS,
    MultiTaskViT,
    MultiTaskViTConfig,
    TaskSpec,
    extract_task_submodel,
    multitask_active_params,
    multitask_vit_config,
    task_expert_counts,
)
from moekit.routing import TaskTokenRouter, TopKRouter, m3vit_task_experts

TASKS = (TaskSpec("fine", "classify", 10), TaskSpec("coarse", "classify", 4), TaskSpec("mask", "segment", 2))


def _probs(T, E, gen=None):
    return torch.softmax(torch.randn(T, E, generator=gen) * 2, -1)


# -- the loss ------------------------------------------------------------------------------------
def test_mi_nonnegative_and_bounded():
    gen = torch.Generator().manual_seed(0)
    for M, E, T in ((2, 4, 7), (3, 8, 97), (5, 3, 1)):
        probs, tasks = _probs(T, E, gen), torch.randint(0, M, (T,), generator=gen)
        joint = task_expert_joint(probs, tasks, num_tasks=M)
        assert torch.allclose(joint.sum(), torch.tensor(1.0), atol=1e-6)
        mi = mutual_information_from_joint(joint)
        assert mi >= -1e-7
        assert mi <= np.log(min(M, E)) + 1e-6               # I ≤ min(H(T), H(E))
        assert torch.allclose(mutual_information_loss(probs, tasks, num_tasks=M, weight=0.3), -0.3 * mi)


def test_mi_zero_for_task_independent_routing():
    """Every task's tokens get the same gate distributions ⇒ P(e|t) = P(e) ⇒ I = 0."""
    probs = _probs(11, 6)
    M = 3
    probs_all = probs.repeat(M, 1)                          # each task sees the same 11 tokens
    tasks = torch.arange(M).repeat_interleave(11)
    assert abs(float(mutual_information_loss(probs_all, tasks, num_tasks=M))) < 1e-7


def test_mi_maximal_for_disjoint_one_hot_routing():
    M = E = 4
    probs = torch.eye(E).repeat(5, 1)                      # token i of task i % 4 → expert i % 4
    tasks = torch.arange(E).repeat(5)
    assert torch.allclose(-mutual_information_loss(probs, tasks, num_tasks=M), torch.tensor(np.log(4.0)).float())


def test_mi_equals_analysis_mutual_information_on_the_same_joint():
    gen = torch.Generator().manual_seed(1)
    probs, tasks = _probs(50, 5, gen), torch.randint(0, 3, (50,), generator=gen)
    joint = task_expert_joint(probs.double(), tasks, num_tasks=3)
    ref, _ = mutual_information(joint.numpy() * 1000)      # counts: any scale of the same joint
    assert abs(float(mutual_information_from_joint(joint)) - ref) < 1e-12


def test_mi_mask_leaves_padding_out_and_gradient_is_finite_with_zero_probabilities():
    probs = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.3, 0.3, 0.4]], requires_grad=True)
    tasks = torch.tensor([0, 1, 1])
    mask = torch.tensor([True, True, False])
    loss = mutual_information_loss(probs, tasks, num_tasks=2, mask=mask)
    ref = mutual_information_loss(probs[:2], tasks[:2], num_tasks=2)
    assert torch.allclose(loss, ref)
    loss.backward()
    assert torch.isfinite(probs.grad).all() and probs.grad[2].abs().sum() == 0


def test_mi_bad_inputs_name_the_argument():
    p = _probs(4, 3)
    with pytest.raises(ValueError, match="task_ids_T"):
        task_expert_joint(p, torch.zeros(5, dtype=torch.long), num_tasks=2)
    with pytest.raises(ValueError, match="task_ids_T"):
        task_expert_joint(p, torch.zeros(4), num_tasks=2)
    with pytest.raises(ValueError, match="weight"):
        mutual_information_loss(p, torch.zeros(4, dtype=torch.long), num_tasks=2, weight=-1.0)


def test_maximising_mi_concentrates_tasks_on_experts():
    """Gradient ascent on I through a task router moves each task onto its own experts."""
    torch.manual_seed(0)
    r = TaskTokenRouter(8, 6, 2, num_tasks=3, mi_loss_coef=1.0)
    x, tasks = torch.randn(120, 8), torch.arange(3).repeat(40)
    opt = torch.optim.Adam(r.parameters(), lr=0.05)
    start = -float(r(x, task_ids=tasks).aux_losses["mutual_information"].detach())
    for _ in range(100):
        loss = r(x, task_ids=tasks).aux_losses["mutual_information"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = -float(r(x, task_ids=tasks).aux_losses["mutual_information"].detach())
    assert start < 0.1 and end > 0.7 and end <= np.log(3) + 1e-6


# -- the task router ---------------------------------------------------------------------------
def test_task_token_router_is_each_tasks_own_topk_router():
    torch.manual_seed(0)
    D, E, M, T = 12, 6, 3, 29
    r = TaskTokenRouter(D, E, 2, num_tasks=M)
    x, tasks = torch.randn(T, D), torch.randint(0, M, (T,))
    routing = r(x, task_ids=tasks)
    for t in range(M):
        ref = TopKRouter(D, E, 2)
        ref.weight.data.copy_(r.weight.data[:, t])
        sel = tasks == t
        rr = ref(x[sel])
        assert torch.equal(routing.topk_ids[sel], rr.topk_ids)
        assert torch.allclose(routing.probs[sel], rr.probs, atol=1e-6)


def test_m3vit_windows_and_fixed_subsets():
    allowed = m3vit_task_experts(3, 8, 4)
    assert allowed.sum(1).tolist() == [4, 4, 4]
    assert allowed[0, :4].all() and allowed[1, 2:6].all() and allowed[2, 4:].all()
    r = TaskTokenRouter(10, 8, 2, num_tasks=3, task_experts=allowed)
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        x, tasks = torch.randn(64, 10, generator=g) * 3, torch.randint(0, 3, (64,), generator=g)
        routing = r(x, task_ids=tasks)
        assert allowed[tasks.unsqueeze(1).expand(-1, 2), routing.topk_ids].all()
        assert (routing.probs[~allowed[tasks]] == 0).all()
    with pytest.raises(ValueError, match="task_experts"):
        TaskTokenRouter(10, 8, 2, num_tasks=2, task_experts=torch.eye(8, dtype=torch.bool)[:2])
    with pytest.raises(ValueError, match="num_tasks"):
        TaskTokenRouter(10, 8, 2)


def test_mi_loss_reaches_the_moe_aux_loss():
    torch.manual_seed(0)
    r = TaskTokenRouter(8, 4, 2, num_tasks=2, mi_loss_coef=0.5)
    moe = moekit.MoE(d_model=8, num_experts=4, router=r, expert="mlp", d_hidden=8, aux_loss_coef=0.0)
    x, tasks = torch.randn(3, 5, 8), torch.randint(0, 2, (3, 5))
    moe(x, task_ids=tasks)
    probs = torch.softmax(r.task_logits(x.reshape(-1, 8), tasks.reshape(-1)), -1)
    assert torch.allclose(moe.aux_loss, mutual_information_loss(probs, tasks.reshape(-1), num_tasks=2, weight=0.5))


def test_router_subset_keeps_the_routing_of_tokens_whose_experts_are_kept():
    torch.manual_seed(0)
    r = TaskTokenRouter(8, 6, 2, num_tasks=3)
    x = torch.randn(40, 8)
    full = r(x, task_ids=torch.full((40,), 2))
    keep = sorted(set(full.topk_ids.flatten().tolist()) | {0})
    sub = r.subset(keep, [2])
    part = sub(x, task_ids=torch.zeros(40, dtype=torch.long))
    assert torch.equal(torch.tensor(keep)[part.topk_ids], full.topk_ids)
    assert torch.allclose(part.weights, full.weights, atol=1e-7)


# -- MoE attention with task routers -----------------------------------------------------------
def test_moa_with_one_task_equals_the_plain_moa():
    torch.manual_seed(0)
    plain = MixtureOfAttentionHeads(d_model=16, num_experts=6, top_k=2)
    tasked = MixtureOfAttentionHeads(d_model=16, num_experts=6, top_k=2, num_tasks=1)
    tasked.load_state_dict({k: v for k, v in plain.state_dict().items() if not k.startswith("router")}, strict=False)
    tasked.router.weight.data.copy_(plain.router.weight.data[:, None])
    x = torch.randn(2, 7, 16)
    assert torch.allclose(tasked(x, task_ids=torch.zeros(2, dtype=torch.long)), plain(x), atol=1e-6)
    with pytest.raises(ValueError, match="task_ids"):
        plain(x, task_ids=torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="task_ids"):
        tasked(x)
    with pytest.raises(ValueError, match="mi_loss_coef"):
        MixtureOfAttentionHeads(d_model=16, num_experts=6, mi_loss_coef=0.1)


def test_moa_subset_reproduces_outputs_when_the_heads_are_kept():
    torch.manual_seed(0)
    moa = MixtureOfAttentionHeads(d_model=16, num_experts=8, top_k=2, num_tasks=3, mi_loss_coef=0.1).double()
    x, tasks = torch.randn(3, 9, 16, dtype=torch.float64), torch.full((3,), 1)
    y = moa(x, task_ids=tasks)
    used = sorted(set(moa.last_stats.topk_ids.flatten().tolist()))
    sub = moa.subset(used, [1])
    assert sub.num_experts == len(used) and sub.num_tasks == 1
    assert torch.allclose(sub(x, task_ids=torch.zeros(3, dtype=torch.long)), y, atol=1e-12)


# -- the multi-task ViT -------------------------------------------------------------------------
def _images(n=6, seed=0):
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("method", MULTITASK_VIT_METHODS)
def test_every_method_runs_trains_and_batches_tasks_like_one_task_at_a_time(method):
    torch.manual_seed(0)
    model = MultiTaskViT(multitask_vit_config(method, TASKS, d_model=32, n_heads=4, num_experts=4))
    x = _images()
    outs = model(x)
    assert [tuple(o.shape) for o in outs] == [(6, 10), (6, 4), (6, 2, 28, 28)]
    model.eval()
    outs = model(x)
    for t in range(3):
        assert torch.allclose(model.forward_task(x, t), outs[t], atol=1e-5)
    model.train()
    targets = [torch.randint(0, 10, (6,)), torch.randint(0, 4, (6,)), torch.randint(0, 2, (6, 28, 28))]
    loss = sum(model.losses(model(x), targets)) + moekit.aux_loss(model)
    loss.backward()
    assert all(p.grad is not None for p in model.heads.parameters())
    assert model.task_routed == (method in ("m3vit", "modsquad"))
    assert model.task_conditioned == (method != "dense" and method != "moe_shared")


def test_task_embedding_conditions_the_backbone_and_runs_it_once_per_task():
    torch.manual_seed(0)
    model = MultiTaskViT(multitask_vit_config("dense_task", TASKS, d_model=32, n_heads=4)).double().eval()
    assert model.task_conditioned and not model.task_routed
    x = _images(4).double()
    with torch.no_grad():
        model.task_embed[1] += 1.0                         # make task 1's embedding clearly differ
        h0 = model.features(x, torch.zeros(4, dtype=torch.long))
        h1 = model.features(x, torch.ones(4, dtype=torch.long))
        assert not torch.allclose(h0, h1)
        # the reference: the plain backbone with the task's vector added to every input token by hand
        ref = model.patch_embed(x).flatten(2).transpose(1, 2)
        ref = torch.cat([model.cls_token.expand(4, -1, -1), ref], 1) + model.pos_embed + model.task_embed[1]
        for block in model.blocks:
            ref = block(ref, None)
        assert torch.allclose(h1, model.norm(ref), atol=1e-12)
        assert torch.allclose(model(x)[1], model.head(1, h1), atol=1e-12)
    with pytest.raises(ValueError, match="task_B"):
        model.features(x)
    dense = multitask_active_params(MultiTaskViT(multitask_vit_config("dense", TASKS, d_model=32, n_heads=4)))
    cond = multitask_active_params(model)
    assert cond["total"] - dense["total"] == 3 * 32 and cond["active"] - dense["active"] == 32


def test_active_parameters_are_matched_across_methods():
    counts = {}
    for m in MULTITASK_VIT_METHODS:
        torch.manual_seed(0)
        counts[m] = multitask_active_params(MultiTaskViT(multitask_vit_config(m, TASKS)))
    dense = counts["dense"]["active"]
    for m in MULTITASK_VIT_METHODS:
        assert abs(counts[m]["active"] - dense) / dense < 0.03, counts
    assert counts["moe_shared"]["total"] > 1.8 * counts["dense"]["total"]


def test_m3vit_each_task_uses_a_fixed_subset_per_layer():
    """METHODS.md MT5: for a fixed task the active experts of each layer are a fixed subset."""
    torch.manual_seed(0)
    model = MultiTaskViT(multitask_vit_config("m3vit", TASKS, num_experts=8))
    allowed = m3vit_task_experts(3, 8, 4)
    used = None
    for seed in range(3):
        counts = task_expert_counts(model, _images(16, seed) * (1 + seed))
        for name, c_ME in counts.items():
            assert (c_ME[~allowed] == 0).all(), name
        now = {k: v > 0 for k, v in counts.items()}
        used = now if used is None else {k: used[k] | now[k] for k in now}
    assert all((u.sum(1) < 8).all() for u in used.values())


def test_shared_router_routing_is_task_independent():
    torch.manual_seed(0)
    model = MultiTaskViT(multitask_vit_config("moe_shared", TASKS))
    counts = task_expert_counts(model, _images(8))
    for c_ME in counts.values():
        assert (c_ME == c_ME[0]).all()
        assert mutual_information(c_ME.numpy())[0] < 1e-12


@pytest.mark.parametrize("method", ["m3vit", "modsquad"])
def test_extracted_submodel_reproduces_the_tasks_outputs(method):
    torch.manual_seed(0)
    model = MultiTaskViT(multitask_vit_config(method, TASKS, num_experts=8)).double().eval()
    x = _images(10).double()
    counts = task_expert_counts(model, x)
    for t in range(3):
        sub = extract_task_submodel(model, t, counts).eval()
        assert len(sub.tasks) == 1 and sub.tasks[0] == TASKS[t]
        assert torch.allclose(sub.forward_task(x, 0), model.forward_task(x, t), atol=1e-10)
        assert torch.allclose(sub(x)[0], model.forward_task(x, t), atol=1e-10)
        for name, ids in sub.kept_experts.items():
            assert ids == torch.nonzero(counts[name][t]).flatten().tolist()
    if method == "m3vit":                      # the window alone, without data
        sub = extract_task_submodel(model, 2)
        assert all(ids == [4, 5, 6, 7] for ids in sub.kept_experts.values())
        assert torch.allclose(sub.forward_task(x, 0), model.forward_task(x, 2), atol=1e-10)
        assert multitask_active_params(sub)["total"] < multitask_active_params(model)["total"]


def test_extraction_keeps_the_tasks_embedding():
    torch.manual_seed(0)
    model = MultiTaskViT(multitask_vit_config("m3vit", TASKS, num_experts=8, task_embedding=True)).double().eval()
    with torch.no_grad():
        model.task_embed.normal_()
    x = _images(6).double()
    sub = extract_task_submodel(model, 2, task_expert_counts(model, x)).eval()
    assert sub.task_embed.shape == (1, model.config.d_model)
    assert torch.allclose(sub.forward_task(x, 0), model.forward_task(x, 2), atol=1e-10)


def test_extracting_the_top_experts_shrinks_the_model():
    torch.manual_seed(0)
    model = MultiTaskViT(multitask_vit_config("modsquad", TASKS, num_experts=8)).eval()
    x = _images(10)
    counts = task_expert_counts(model, x)
    sub = extract_task_submodel(model, 0, counts, top=3)
    assert all(len(ids) == 3 for ids in sub.kept_experts.values())
    for name, ids in sub.kept_experts.items():
        assert set(ids) == set(torch.argsort(-counts[name][0], stable=True)[:3].tolist())
    assert sub.forward_task(x, 0).shape == (10, 10)
    assert multitask_active_params(sub)["total"] < 0.75 * multitask_active_params(model)["total"]


def test_config_and_input_errors_name_the_argument():
    with pytest.raises(ValueError, match="moe_attention"):
        MultiTaskViTConfig(tasks=TASKS, routing="shared", moe_attention=True)
    with pytest.raises(ValueError, match="mi_loss_coef"):
        MultiTaskViTConfig(tasks=TASKS, routing="dense", mi_loss_coef=0.1)
    with pytest.raises(ValueError, match="task_experts_per_layer"):
        MultiTaskViTConfig(tasks=TASKS, task_experts_per_layer=1)
    with pytest.raises(TypeError, match="tasks"):
        MultiTaskViTConfig(tasks=("fine",))
    with pytest.raises(ValueError, match="kind"):
        TaskSpec("x", "detect", 3)
    with pytest.raises(ValueError, match="method"):
        multitask_vit_config("mmoe", TASKS)
    model = MultiTaskViT(multitask_vit_config("dense", TASKS))
    with pytest.raises(ValueError, match="images"):
        model(torch.randn(2, 3, 28, 28))
    with pytest.raises(ValueError, match="routing='task'"):
        extract_task_submodel(model, 0)
