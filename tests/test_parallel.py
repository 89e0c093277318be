"""Expert parallelism on real gloo process groups: N ranks compute what one process computes.

Each spawn groups many checks (process start-up dominates on the CPU). Every rank builds the
same model and the same global batch from one seed, computes the single-process reference
itself, then runs its own chunk of the batch expert-parallel and compares outputs, losses,
gradients (replicated parameters whole, expert parameters row-block by row-block), global
statistics and the sigmoid router's bias update.

Reference semantics. Dropless routing: the reference runs the concatenated batch. Capacity
and expert choice are per routing group (each rank routes its own tokens), so the reference
runs each rank's chunk as its own group for the outputs and the task loss, and the
concatenated batch for the global balancing loss (which uses the pre-capacity selection).
"""
from __future__ import annotations

import copy
import datetime
import io
import os
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import moekit
from moekit.parallel import (
    all_to_all_single,
    all_to_all_single_reference,
    apply_expert_parallel,
    clip_grad_norm_,
    expert_shard_of,
    latest_checkpoint,
    load_checkpoint,
    prepare_model,
    save_checkpoint,
    sync_gradients,
)
from moekit.routing import Routing

pytestmark = pytest.mark.distributed

TIMEOUT_S = 150


# ---------------------------------------------------------------------------------------------
# Spawning real gloo groups
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank, world_size, port, queue, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=60))
        result = fn(rank, world_size, *args)
        buf = io.BytesIO()                   # plain bytes: tensors must not outlive this process's memory
        torch.save(result, buf)
        queue.put((rank, None, buf.getvalue()))
    except BaseException:                                                  # report, never hang
        queue.put((rank, traceback.format_exc(), None))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, world_size, *args, timeout=TIMEOUT_S):
    """Run ``fn(rank, world_size, *args)`` on `world_size` gloo ranks; results by rank."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world_size, port, queue, args), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    results, errors = {}, []
    import queue as _q
    import time
    deadline = time.monotonic() + timeout
    try:
        while len(results) + len(errors) < world_size:
            try:
                rank, err, res = queue.get(timeout=1.0)
            except _q.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in results]
                if dead:
                    errors.append(f"ranks {dead} died (exit codes {[procs[r].exitcode for r in dead]})")
                    break
                if time.monotonic() > deadline:
                    errors.append(f"timeout after {timeout}s; ranks reporting: {sorted(results)}")
                    break
                continue
            if err:
                errors.append(f"rank {rank}:\n{err}")
                break                                   # one failure: the others may wait forever
            results[rank] = torch.load(io.BytesIO(res), weights_only=False)
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    assert not errors, "\n".join(errors)
    return results


# ---------------------------------------------------------------------------------------------
# A small two-MoE-layer model
class TwoLayer(nn.Module):
    def __init__(self, d=8, **moe_kw):
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.moe1 = moekit.MoE(d_model=d, **moe_kw)
        self.norm = nn.LayerNorm(d)
        self.moe2 = moekit.MoE(d_model=d, **moe_kw)
        self.out = nn.Linear(d, d)

    def forward(self, x):
        h = self.inp(x)
        h = h + self.moe1(h)
        h = h + self.moe2(self.norm(h))
        return self.out(h)


def _task(y, target):
    return (y - target).square().mean()


def _close(a, b, what, atol=2e-5, rtol=2e-4):
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    if a.shape != b.shape or not torch.allclose(a, b, atol=atol, rtol=rtol):
        diff = (a - b).abs().max().item() if a.shape == b.shape else "shape"
        raise AssertionError(f"{what}: max diff {diff}, max abs {b.abs().max().item():.3g} "
                             f"(shapes {tuple(a.shape)} vs {tuple(b.shape)})")


def _mean_over_ranks(v: torch.Tensor) -> torch.Tensor:
    v = v.detach().clone().double()
    dist.all_reduce(v)
    return v / dist.get_world_size()


def _compare_grads(model_ep, ref, world_rank_in_ep, what):
    ref_params = dict(ref.named_parameters())
    for name, p in model_ep.named_parameters():
        g_ref = ref_params[name].grad
        s = expert_shard_of(p)
        if s is not None:
            g_ref = g_ref[s.offset:s.offset + s.num_local]
        assert p.grad is not None, f"{what}: no grad for {name}"
        _close(p.grad, g_ref, f"{what}: grad of {name}")


def _cat_routings(rs, sizes):
    offs = [sum(sizes[:i]) for i in range(len(sizes))]
    cat = lambda f: None if getattr(rs[0], f) is None else torch.cat([getattr(r, f) for r in rs])
    return Routing(token_ids=torch.cat([r.token_ids + o for r, o in zip(rs, offs)]),
                   expert_ids=cat("expert_ids"), weights=cat("weights"), logits=cat("logits"),
                   dropped=sum(r.dropped for r in rs), num_experts=rs[0].num_experts, probs=cat("probs"),
                   topk_ids=cat("topk_ids"))


def _union_aux_loss(ref, chunks):
    """Reference global balancing loss with per-group routing: each layer's loss over the union
    of the groups' routings (each group routed alone, as on its rank)."""
    per_layer = {id(m): [] for m in moekit.moe_layers(ref)}
    for xc in chunks:
        ref(xc)
        for m in moekit.moe_layers(ref):
            per_layer[id(m)].append(m.last_routing)
    S = chunks[0].shape[-2]
    total = 0
    for m in moekit.moe_layers(ref):
        rs = per_layer[id(m)]
        total = total + m.compute_aux_loss(_cat_routings(rs, [r.logits.shape[0] for r in rs]), None, S)
    return total


def _equivalence_case(rank, W, case, mesh_shape=None):
    """One configuration: forward, loss, backward (2 micro-batches), stats, bias update."""
    torch.manual_seed(1234)
    E = case.get("E", 2 * W)
    kw = dict(num_experts=E, top_k=2, d_hidden=12)
    kw.update(case.get("moe", {}))
    model = TwoLayer(**kw)
    if case.get("bias"):
        for m in model.modules():
            if hasattr(m, "expert_bias"):
                m.expert_bias.copy_(torch.linspace(-0.05, 0.05, E))
    B, S, D = 2, 5, 8
    micro = case.get("micro", 1)
    xs = [torch.randn(W * B, S, D) for _ in range(micro)]             # global micro-batches
    targets = [torch.randn(W * B, S, D) for _ in range(micro)]
    per_group = case.get("per_group", False)
    scope = case.get("scope", "global")
    ref = copy.deepcopy(model)

    # ---- single-process reference --------------------------------------------------------
    ref_losses, ref_stats = [], []
    for x, t in zip(xs, targets):
        chunks = list(zip(x.chunk(W), t.chunk(W)))
        if per_group or scope == "local":
            ys = [ref(xc) for xc, _ in chunks]
            task = sum(_task(y, tc) for y, (_, tc) in zip(ys, chunks)) / W
            if scope == "local":
                aux = None
                auxes = []
                for xc, _ in chunks:
                    ref(xc)
                    auxes.append(moekit.aux_loss(ref))
                aux = sum(auxes) / W
            else:
                aux = _union_aux_loss(ref, [xc for xc, _ in chunks])
            y_ref = torch.cat(ys)
        else:
            y_ref = ref(x)
            task = _task(y_ref, t)          # equal chunks: mean of chunk means == whole mean
            aux = moekit.aux_loss(ref)
        ref_stats.append(ref.moe1.last_stats)
        loss = task + aux
        (loss / micro).backward()
        ref_losses.append((loss.detach(), aux.detach(), y_ref.detach()))
    if case.get("bias"):
        # The reference's load counts include the extra whole-batch passes; recount them once.
        for m in ref.modules():
            if hasattr(m, "load_accum"):
                m.load_accum.zero_()
        with torch.no_grad():
            for x in xs:
                ref(x)
        ref_loads = {n: b.clone() for n, b in ref.named_buffers() if n.endswith("load_accum")}

    # ---- expert parallel ------------------------------------------------------------------
    mesh = None
    if mesh_shape is not None:
        from torch.distributed.device_mesh import init_device_mesh
        mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=("dp", "ep"))
    model = prepare_model(model, mesh=mesh, grad_sync=case.get("grad_sync", "hooks"), balance_scope=scope)
    L = E // (mesh_shape[1] if mesh_shape else W)
    assert model.moe1.experts.gate_up_proj.shape[0] == L if hasattr(model.moe1.experts, "gate_up_proj") \
        else model.moe1.experts.up_proj.shape[0] == L
    for i, (x, t) in enumerate(zip(xs, targets)):
        xr, tr = x.chunk(W)[rank], t.chunk(W)[rank]
        y = model(xr)
        loss_ref, aux_ref, y_ref = ref_losses[i]
        _close(y, y_ref.chunk(W)[rank], f"{case['name']}: output (micro {i})")
        if case.get("drops"):
            assert _mean_over_ranks(model.moe1.last_stats.dropped.float()) > 0, "capacity case dropped nothing"
        aux = moekit.aux_loss(model)
        task = _task(y, tr)
        if scope == "global":
            _close(aux, aux_ref, f"{case['name']}: global aux loss on rank {rank}")
            _close(_mean_over_ranks(task) + aux.detach(), loss_ref, f"{case['name']}: loss")
            if not per_group:
                for f in ("tokens_per_expert", "dropped", "num_tokens", "router_entropy", "mean_prob_per_expert"):
                    if getattr(ref_stats[i], f) is not None:
                        _close(getattr(model.moe1.last_stats, f), getattr(ref_stats[i], f), f"stats.{f}")
        else:
            _close(_mean_over_ranks(task + aux), loss_ref, f"{case['name']}: local-scope loss")
        ((task + aux) / micro).backward()
    if case.get("grad_sync") == "manual":
        sync_gradients(model)
    _compare_grads(model, ref, rank, case["name"])
    # Clipping: the global norm equals the single-process norm, and clipped grads stay equal.
    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
    _close(clip_grad_norm_(model, 0.05), ref_norm, f"{case['name']}: grad norm")
    assert ref_norm > 0.05, "clipping case did not clip"
    _compare_grads(model, ref, rank, case["name"] + " (clipped)")
    if case.get("bias"):
        # The load counts the bias update uses are the global batch's (not this rank's).
        loads = {n: b.clone() for n, b in model.named_buffers() if n.endswith("load_accum")}
        assert loads, "no load_accum buffers"
        for n, b in ref_loads.items():
            _close(loads[n], b, f"{case['name']}: {n}")
        moekit.update_router_biases(model)
        moekit.update_router_biases(ref)
        for (n, b), (_, b_ref) in zip(model.named_buffers(), ref.named_buffers()):
            if n.endswith("expert_bias"):
                assert not torch.equal(b_ref, torch.linspace(-0.05, 0.05, E)), "bias did not move"
                _close(b, b_ref, f"{case['name']}: {n} after update")
    return case["name"]


def _a2a_checks(rank, W):
    # Uneven splits including zeros, forward against the all-gather reference, backward as adjoint.
    torch.manual_seed(rank)
    send = [(rank + s) % 3 for s in range(W)]                     # rows to rank s
    recv = [(s + rank) % 3 for s in range(W)]                     # rows from rank s
    x = torch.randn(sum(send), 3, requires_grad=True)
    y = all_to_all_single(x, recv, send)
    y_ref = all_to_all_single_reference(x.detach(), recv, send)
    assert torch.equal(y, y_ref)
    # <A x, g> == <x, Aᵀ g> summed over ranks: backward must be the reverse exchange.
    g = torch.randn_like(y)
    (y * g).sum().backward()
    lhs = _mean_over_ranks((y.detach() * g).sum()) * W
    rhs = _mean_over_ranks((x.detach() * x.grad).sum()) * W
    _close(lhs, rhs, "adjoint identity")
    with pytest.raises(ValueError, match="input_splits"):
        all_to_all_single(x, recv, [s + 1 for s in send])


def _errors(rank, W):
    model = TwoLayer(num_experts=3, top_k=1, d_hidden=8)
    before = model.moe1.experts.gate_up_proj.shape
    with pytest.raises(ValueError, match="num_experts=3.*group size 2"):
        apply_expert_parallel(model)
    assert model.moe1.experts.gate_up_proj.shape == before          # untouched on failure
    model = TwoLayer(num_experts=4, top_k=1, d_hidden=8)
    apply_expert_parallel(model)
    with pytest.raises(ValueError, match="already expert-parallel"):
        apply_expert_parallel(model)
    with pytest.raises(ValueError, match="balance_scope"):
        apply_expert_parallel(TwoLayer(num_experts=4, top_k=1, d_hidden=8), balance_scope="nope")



# ---------------------------------------------------------------------------------------------
# Checkpoints
CK_E = 8


def _build(seed, distributed=False, mesh=None):
    """Model (expert-parallel when `distributed`) and an AdamW built after sharding."""
    torch.manual_seed(seed)
    model = TwoLayer(num_experts=CK_E, top_k=2, d_hidden=12, router="sigmoid", num_shared_experts=1)
    if distributed:
        prepare_model(model, mesh=mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def _step(model, opt, seed):
    torch.manual_seed(seed)
    ws = dist.get_world_size() if dist.is_initialized() else 1
    r = dist.get_rank() if dist.is_initialized() else 0
    x = torch.randn(4, 3, 8).chunk(ws)[r]
    loss = model(x).square().mean() + moekit.aux_loss(model)
    loss.backward()
    opt.step()
    opt.zero_grad()
    moekit.update_router_biases(model)


def _full_state(model, opt):
    """Every tensor of model and optimizer as the whole (E, ...) tensor, on every rank."""
    out = {}

    def whole(t, shard):
        if shard is None:
            return t.detach().clone()
        parts = [torch.empty_like(t) for _ in range(shard.world_size)]
        dist.all_gather(parts, t.detach().contiguous(), group=shard.group)
        return torch.cat(parts)
    for n, p in model.named_parameters():
        out[n] = whole(p, expert_shard_of(p))
        for k, v in opt.state[p].items():
            out[f"{n}.{k}"] = whole(v, expert_shard_of(p) if v.shape == p.shape else None)
    for n, b in model.named_buffers():
        if n in model.state_dict():
            out[n] = b.detach().clone()
    return out


def _check_same(a, b, what):
    assert a.keys() == b.keys(), f"{what}: keys differ {set(a) ^ set(b)}"
    for k in a:
        assert a[k].shape == b[k].shape and torch.equal(a[k], b[k]), f"{what}: {k} differs"


def _ckpt_at_4(rank, W, ck1, ck4, s1):
    model, opt = _build(seed=99, distributed=True)     # different init: everything must come from disk
    assert model.moe1.experts.gate_up_proj.shape[0] == CK_E // W
    extra = {"model": model, "optimizer": opt, "step": 0, "rng": torch.zeros(3)}
    load_checkpoint(extra, ck1)
    assert extra["step"] == 7 and torch.equal(extra["rng"], torch.arange(3.0))
    _check_same(_full_state(model, opt), s1, "1 -> 4")
    _step(model, opt, seed=3)
    s4 = _full_state(model, opt)
    save_checkpoint({"model": model, "optimizer": opt, "step": 8, "rng": torch.arange(3.0) + 1 + 10 * rank}, ck4)
    # Same world size (a torchrun restart): every rank gets its own plain values back.
    again = {"step": 0, "rng": None}
    load_checkpoint(again, ck4)
    assert again["step"] == 8 and torch.equal(again["rng"], torch.arange(3.0) + 1 + 10 * rank)
    return s4


def _ckpt_mesh(rank, W, ck):
    """A (dp=2, ep=2) mesh checkpoint (expert shards replicated over dp) loads at ep=4."""
    from torch.distributed.device_mesh import init_device_mesh
    model, opt = _build(seed=11, distributed=True, mesh=init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "ep")))
    assert model.moe1.experts.gate_up_proj.shape[0] == CK_E // 2
    _step(model, opt, seed=4)
    s = _full_state(model, opt)
    save_checkpoint({"model": model, "optimizer": opt}, ck)
    model, opt = _build(seed=12, distributed=True)
    load_checkpoint({"model": model, "optimizer": opt}, ck)
    _check_same(_full_state(model, opt), s, "2x2 mesh -> 4")


def _ckpt_at_2(rank, W, ck4, ck2, s4):
    model, opt = _build(seed=98, distributed=True)
    state = {"model": model, "optimizer": opt, "step": 0, "rng": torch.zeros(3)}
    load_checkpoint(state, ck4)
    # Another world size: rank 0's plain values.
    assert state["step"] == 8 and torch.equal(state["rng"], torch.arange(3.0) + 1)
    _check_same(_full_state(model, opt), s4, "4 -> 2")
    save_checkpoint(state, ck2)
    # A plain model.state_dict() is resharded too (expert tensors recognised by storage).
    save_checkpoint({"weights": model.state_dict()}, ck2 + "_plain")
    return True


def _edge_checks(rank, W):
    """Padding masks (a rank with every token masked sends and receives nothing), one token per
    rank, inputs without grad: outputs and the global losses still equal one process."""
    torch.manual_seed(7)
    moe = moekit.MoE(d_model=8, num_experts=2 * W, top_k=2, d_hidden=12, aux_loss_coef=0.1, z_loss_coef=0.01,
                     router="topk")
    ref = copy.deepcopy(moe)
    apply_expert_parallel(moe)
    x = torch.randn(W, 3, 8)
    mask = torch.ones(W, 3, dtype=torch.bool)
    mask[0, 1] = False
    mask[-1] = False                                           # the last rank holds only padding
    for kind in ("switch", "sequence"):
        moe.balance_loss = ref.balance_loss = kind
        y_ref = ref(x, mask=mask)
        y = moe(x[rank:rank + 1], mask=mask[rank:rank + 1])
        _close(y, y_ref[rank:rank + 1], f"masked output ({kind})")
        _close(moe.aux_loss, ref.aux_loss, f"masked global aux loss ({kind})")
        _close(moe.last_stats.tokens_per_expert, ref.last_stats.tokens_per_expert, "masked stats")
    y_ref = ref(x[:, 0])                                       # one token per rank
    _close(moe(x[rank, 0:1]), y_ref[rank:rank + 1], "one token per rank")


CASES_2 = [
    dict(name="topk dropless swiglu + shared + z-loss",
         moe=dict(router="topk", num_shared_experts=1, z_loss_coef=1e-2, aux_loss_coef=0.1)),
    dict(name="topk capacity with drops (per group), mlp experts",
         moe=dict(router="topk", capacity_factor=0.6, expert="mlp", aux_loss_coef=0.1), per_group=True, drops=True),
    dict(name="sigmoid with bias, sequence loss, bias update", bias=True,
         moe=dict(router="sigmoid", aux_loss_coef=0.1)),
    dict(name="expert choice (per group)", moe=dict(router="expert_choice", capacity_factor=1.0, top_k=None,
                                                    z_loss_coef=1e-2), per_group=True),
    dict(name="grad accumulation, manual sync, eager backend", micro=2, grad_sync="manual",
         moe=dict(router="topk", backend="eager", num_shared_experts=1)),
    dict(name="local balance scope", scope="local", moe=dict(router="topk", aux_loss_coef=0.1)),
    dict(name="sync-free static layout, capacity with drops (per group)", per_group=True, drops=True,
         moe=dict(router="topk", capacity_factor=0.6, sync_free=True, aux_loss_coef=0.1)),
]
CASES_4 = [
    dict(name="topk dropless + shared", E=8, moe=dict(router="topk", num_shared_experts=1, z_loss_coef=1e-2)),
    dict(name="topk capacity with drops (per group)", E=4, per_group=True, drops=True,
         moe=dict(router="topk", top_k=1, capacity_factor=0.8)),
    dict(name="sigmoid with bias, 2 micro-batches", E=8, bias=True, micro=2, moe=dict(router="sigmoid")),
    dict(name="2x2 mesh (dp x ep), 2 micro-batches", E=4, micro=2, mesh=(2, 2),
         moe=dict(router="topk", num_shared_experts=1)),
]


def _checks(W):
    """(name, fn(rank, W, ctx)) run in order inside one spawn of W ranks."""
    out = [("all_to_all_single", lambda r, W, ctx: _a2a_checks(r, W))]
    if W == 2:
        out.append(("errors", lambda r, W, ctx: _errors(r, W)))
        out.append(("masks, empty ranks, one token", lambda r, W, ctx: _edge_checks(r, W)))
    for case in CASES_2 if W == 2 else CASES_4:
        out.append((case["name"], lambda r, W, ctx, c=case: _equivalence_case(r, W, c, c.get("mesh"))))
    if W == 4:
        out.append(("checkpoint 1 -> 4, save at 4",
                    lambda r, W, ctx: ctx.update(s4=_ckpt_at_4(r, W, ctx["ck1"], ctx["ck4"], ctx["s1"]))))
        out.append(("checkpoint 2x2 mesh -> 4", lambda r, W, ctx: _ckpt_mesh(r, W, ctx["ckmesh"])))
    else:
        out.append(("checkpoint 4 -> 2, save at 2",
                    lambda r, W, ctx: _ckpt_at_2(r, W, ctx["ck4"], ctx["ck2"], ctx["s4"])))
    return out


def _suite(rank, W, ctx):
    """Every check of this world size; stops at the first failure (later collectives could hang)."""
    report = {}
    for name, fn in _checks(W):
        if any(v is not None for v in report.values()):
            report[name] = "not run: an earlier check failed"
            continue
        try:
            fn(rank, W, ctx)
            report[name] = None
        except Exception:
            report[name] = traceback.format_exc()
    return report, ctx.get("s4")


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    """Run both spawns once: ``{(W, check): error or None}``, plus the checkpoint paths."""
    d = tmp_path_factory.mktemp("ckpt")
    ctx = {f"ck{n}": str(d / f"ck{n}") for n in (1, 2, 4)}
    ctx["ckmesh"] = str(d / "mesh" / "ck")
    model, opt = _build(seed=0)
    _step(model, opt, seed=1)
    ctx["s1"] = _full_state(model, opt)
    save_checkpoint({"model": model, "optimizer": opt, "step": 7, "rng": torch.arange(3.0)}, ctx["ck1"])
    out = {}
    for W in (4, 2):
        results = run_ranks(_suite, W, ctx)
        for r, (report, s4) in results.items():
            for name, err in report.items():
                if err is not None:
                    out.setdefault((W, name), f"rank {r}: {err}")
                else:
                    out.setdefault((W, name), None)
        if W == 4:
            ctx["s4"] = results[0][1]
    out["ctx"] = ctx
    return out


@pytest.mark.parametrize("W,name", [(2, n) for n, _ in _checks(2)] + [(4, n) for n, _ in _checks(4)])
def test_ranks_equal_one_process(spawned, W, name):
    err = spawned[(W, name)]
    assert err is None, err


def test_checkpoint_reshards_to_one_process(spawned):
    """Checkpoints written at 4 and at 2 ranks load into a plain single-process model."""
    ctx = spawned["ctx"]
    if ctx.get("s4") is None:
        pytest.fail("the 4-rank checkpoint stage did not run")
    assert latest_checkpoint(os.path.dirname(ctx["ck4"])) == ctx["ck4"]        # newest by name
    for ck in (ctx["ck2"], os.path.dirname(ctx["ck4"])):
        model, opt = _build(seed=5)
        state = {"model": model, "optimizer": opt, "step": 0, "rng": torch.zeros(3)}
        load_checkpoint(state, ck)
        _check_same(_full_state(model, opt), ctx["s4"], f"{ck} -> 1")
        assert state["step"] == 8 and torch.equal(state["rng"], torch.arange(3.0) + 1)
    assert not torch.equal(ctx["s4"]["moe1.experts.gate_up_proj"], ctx["s1"]["moe1.experts.gate_up_proj"])
    model, _ = _build(seed=6)
    load_checkpoint({"weights": model.state_dict()}, ctx["ck2"] + "_plain")     # loads in place
    for n, p in model.named_parameters():
        assert torch.equal(p, ctx["s4"][n]), n


def test_checkpoint_rejects_missing_dir_and_foreign_optimizer(tmp_path):
    model, opt = _build(0)
    with pytest.raises(FileNotFoundError):
        load_checkpoint({"model": model}, str(tmp_path / "nope"))
    other = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    with pytest.raises(ValueError, match="not a parameter of"):
        save_checkpoint({"model": model, "optimizer": other}, str(tmp_path / "ck"))


def test_single_process_prepare_is_identity_and_errors_without_group():
    model = TwoLayer(num_experts=4, top_k=1, d_hidden=8)
    assert prepare_model(model) is model
    assert type(model.moe1.dispatcher).__name__ == "LocalDispatcher"
    with pytest.raises(RuntimeError, match="not initialised"):
        apply_expert_parallel(model)


# ---------------------------------------------------------------------------------------------
# FSDP2 for the non-expert parameters, expert parallelism for the experts
def _fsdp_case(rank, world, mesh_shape=None, ckpt=None):
    torch.manual_seed(0)
    ref = TwoLayer(d=8, num_experts=4, top_k=2, d_hidden=8, aux_loss_coef=0.01)
    model = copy.deepcopy(ref)
    x = torch.randn(world * 6, 8)
    target = torch.randn(world * 6, 8)
    y_ref = ref(x)
    loss_ref = _task(y_ref, target) + moekit.aux_loss(ref)
    loss_ref.backward()

    mesh = None
    if mesh_shape is not None:
        from torch.distributed.device_mesh import init_device_mesh
        mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=("dp", "ep"))
    prepare_model(model, mesh=mesh, fsdp=True)
    from torch.distributed.tensor import DTensor
    assert isinstance(model.inp.weight, DTensor) and not isinstance(model.moe1.router.weight, DTensor)
    chunk = slice(rank * 6, (rank + 1) * 6)
    y = model(x[chunk])
    loss = _task(y, target[chunk]) + moekit.aux_loss(model)
    loss.backward()
    _close(y, y_ref[chunk], "fsdp output")
    task = _task(y, target[chunk]).detach().clone()
    dist.all_reduce(task)
    _close(task / world + moekit.aux_loss(model).detach(), loss_ref.detach(), "fsdp global loss", atol=1e-5)
    ref_params = dict(ref.named_parameters())
    checked = 0
    for name, p in model.named_parameters():
        rp = ref_params[name]
        if isinstance(p, DTensor):                         # FSDP-sharded: compare the full tensors
            _close(p.full_tensor(), rp, f"{name} value")
            _close(p.grad.full_tensor(), rp.grad, f"{name} grad")
            checked += 1
        else:
            shard = expert_shard_of(p)
            if shard is None:
                _close(p.grad, rp.grad, f"{name} grad")
            else:
                _close(p.grad, rp.grad[shard.offset:shard.offset + shard.num_local], f"{name} expert grad")
    assert checked == 6          # inp, norm, out: weight + bias each
    # The global gradient norm covers FSDP shards, expert shards and replicated parameters once.
    ref_norm = torch.nn.utils.get_total_norm([q.grad for q in ref.parameters()])
    _close(clip_grad_norm_(model, 1e9), ref_norm, "global grad norm with FSDP", atol=1e-5)
    clip_grad_norm_(model, 0.5 * float(ref_norm))                    # clipping halves every grad
    torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5 * float(ref_norm))
    _close(model.inp.weight.grad.full_tensor(), ref.inp.weight.grad, "clipped FSDP grad")
    if ckpt is not None:
        save_checkpoint({"model": model}, ckpt)
    return True


def test_fsdp2_non_expert_params_with_expert_parallel_equal_one_process(tmp_path):
    ckpt = str(tmp_path / "fsdp_ck")
    assert all(run_ranks(_fsdp_case, 2, None, ckpt).values())
    # Saved with FSDP shards and expert shards at 2 ranks, loaded into one plain process.
    torch.manual_seed(0)
    ref = TwoLayer(d=8, num_experts=4, top_k=2, d_hidden=8, aux_loss_coef=0.01)
    fresh = TwoLayer(d=8, num_experts=4, top_k=2, d_hidden=8, aux_loss_coef=0.01)
    load_checkpoint({"model": fresh}, ckpt)
    for (n, a), (_, b) in zip(fresh.state_dict().items(), ref.state_dict().items()):
        _close(a, b, f"reloaded {n}")
    # 2-D mesh: experts sharded over "ep", averaged over "dp"; FSDP over all 4 ranks.
    assert all(run_ranks(_fsdp_case, 4, (2, 2)).values())


def _fsdp_train_and_save(rank, world, ckpt):
    torch.manual_seed(0)
    model = TwoLayer(d=8, num_experts=4, top_k=2, d_hidden=8)
    prepare_model(model, fsdp=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.manual_seed(1 + rank)
    for _ in range(2):
        _task(model(torch.randn(6, 8)), torch.randn(6, 8)).backward()
        opt.step()
        opt.zero_grad()
    model.eval()(torch.randn(2, 8))            # a forward without backward leaves the root unsharded
    save_checkpoint({"model": model, "optimizer": opt}, ckpt)
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in model.named_parameters()}


def _fsdp_load(rank, world, ckpt, expected):
    torch.manual_seed(5)                       # different init: everything must come from the file
    model = TwoLayer(d=8, num_experts=4, top_k=2, d_hidden=8)
    prepare_model(model, fsdp=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    load_checkpoint({"model": model, "optimizer": opt}, ckpt)
    for n, p in model.named_parameters():
        if expert_shard_of(p) is None:          # FSDP and replicated parameters (expert shards: other tests)
            _close(p.full_tensor() if hasattr(p, "full_tensor") else p, expected[n], f"reloaded {n}")
    assert all(len(opt.state[p]) > 0 for p in model.parameters())   # Adam moments came back
    return True



def test_fsdp2_checkpoint_with_optimizer_reloads_into_fsdp_model(tmp_path):
    ckpt = str(tmp_path / "fsdp_opt")
    saved = run_ranks(_fsdp_train_and_save, 2, ckpt)
    # replicated and FSDP parameters are identical on both ranks
    assert all(run_ranks(_fsdp_load, 2, ckpt, saved[0]).values())
