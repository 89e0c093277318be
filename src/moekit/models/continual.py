"""Continual learning with a growing MoE, its dense baselines, and the standard CL metrics.

Legend: B batch, D input dim, F expert hidden, E experts, K experts per token, L classes,
M tasks seen so far.

Method (METHODS.md C2, a task-routed variant of Lifelong-MoE — Chen et al. 2023, "Lifelong
Language Pretraining with Distribution-Specialized Experts", ICML): when task t arrives,
`start_task` adds n experts and their router rows (`moekit.layers.grow.add_experts`), gives
task t a new task embedding, and freezes every older expert and router row
(`freeze_experts`). Routing is Task-MoE's (`moekit.routing.TaskRouter`, Kudugunta et al. 2021):
``g = TopK(softmax(W · emb(task)))``, K constant, so compute per example stays K experts.
`GrowingTaskRouter` adds one rule: task m may only choose experts that existed when it arrived
(the others' logits are −∞). Task t can thus reuse frozen old experts, and no older task ever
sees a new expert. Departures from the paper: routing by task id (the task-incremental setting
gives the id); with the mask and the freeze, an old task's whole path (its experts, router rows,
embedding and head rows) is bit-identical after later tasks, so there is nothing left to protect.

The paper's own form routes by input, so it needs no task id at test time: `token_moe_net`
builds the body with a top-k router on x (`moekit.routing.TopKRouter`); `start_task` grows it
the same way (old experts and old router rows frozen), but new router rows now compete for old
tasks' inputs, so the paper's output-level regulariser applies: while task t trains, a frozen
copy of the model before task t (the teacher) sees the same inputs, and the loss adds
``λ · τ² · KL(softmax(z_old / τ) ‖ softmax(z_new / τ))`` over the classes of tasks < t
(`distillation_kl`; Hinton et al. 2015's temperature scaling). `train_sequentially(kl_coef=λ)`
makes the snapshots.

Metrics (Chaudhry et al. 2018, "Riemannian Walk for Incremental Learning", ECCV) read the
accuracy matrix ``R[i, j]`` = test accuracy on task j after training task i (T × T):
``A = mean_j R[T−1, j]``; forgetting of task j < T−1 is ``max_{j ≤ l ≤ T−2} R[l, j] − R[T−1, j]``,
averaged over j (entries before task j was learned, l < j, are not used); backward transfer
(Lopez-Paz & Ranzato 2017, GEM) is ``mean_{j<T−1} R[T−1, j] − R[j, j]``.
"""
from __future__ import annotations

import copy
import time
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from moekit.experts import DenseFFN
from moekit.layers import MoE
from moekit.layers.grow import add_experts, freeze_experts
from moekit.optim import UpdateStep, build_optimizer
from moekit.routing.task import TaskRouter
from moekit.routing.topk import TopKRouter
from moekit.validate import check_bool, check_int, check_number

__all__ = ["GrowingTaskRouter", "TaskIncrementalNet", "dense_task_net", "task_moe_net", "token_moe_net",
           "start_task", "distillation_kl", "train_task", "task_accuracy", "train_sequentially", "accuracy_matrix",
           "average_accuracy", "average_forgetting", "backward_transfer"]


class GrowingTaskRouter(TaskRouter):
    """`TaskRouter` whose tasks only see the experts that existed when they were added.

    ``task_num_experts`` (M,): task m chooses among experts ``[0, task_num_experts[m])``; the
    others get logit −∞ (probability exactly 0), so experts added later never change an older
    task's routing or weights.
    """

    def __init__(self, d_model: int, num_experts: int, top_k: int = 2, *, d_task: int = 16):
        super().__init__(d_model, num_experts, top_k, num_tasks=1, d_task=d_task)
        self.register_buffer("task_num_experts", torch.tensor([num_experts]))

    def task_logits(self) -> torch.Tensor:
        logits_ME = super().task_logits()
        hidden_ME = torch.arange(self.num_experts, device=logits_ME.device) >= self.task_num_experts[:, None]
        return logits_ME.masked_fill(hidden_ME, float("-inf"))

    @torch.no_grad()
    def add_task(self, *, prefer: Sequence[int] = (), margin: float = 4.0) -> int:
        """Add a task that may use all current experts; return its id.

        prefer/margin: raise the new task's logits of experts `prefer` by `margin` (its fresh
        experts), so it starts on them rather than on frozen ones; training may move it.
        """
        prefer = [check_int(f"prefer[{i}]", e, min=0, max=self.num_experts - 1) for i, e in enumerate(prefer)]
        margin = check_number("margin", margin)
        old = self.task_embed
        emb_1R = torch.randn(1, self.d_task, device=old.weight.device, dtype=old.weight.dtype)
        self.task_embed = nn.Embedding(self.num_tasks + 1, self.d_task).to(old.weight)
        self.task_embed.weight.copy_(torch.cat([old.weight, emb_1R]))
        self.task_embed.weight.requires_grad_(old.weight.requires_grad)
        # w_e += margin · u / |u|² raises u · w_e by exactly `margin`.
        self.weight[prefer] += margin * emb_1R / emb_1R.square().sum()
        self.task_num_experts = torch.cat([self.task_num_experts, self.task_num_experts.new_tensor([self.num_experts])])
        self.num_tasks += 1
        return self.num_tasks - 1


class TaskIncrementalNet(nn.Module):
    """``x_BD → body → linear head over all L classes`` (one head, class rows per task).

    body: a dense module ``(B, D) → (B, D)``, a `moekit.MoE` routed by task (a `TaskRouter`:
    ``body(x, task_ids=...)``) or a `moekit.MoE` routed by input (no task id). Training on task t
    uses `task_logits`, which keeps only task t's classes (a multi-head classifier sharing one
    matrix: other rows get no gradient).
    """

    def __init__(self, body: nn.Module, *, d_in: int, num_classes: int, task_classes: Sequence[Sequence[int]]):
        super().__init__()
        check_int("d_in", d_in, min=1)
        check_int("num_classes", num_classes, min=1)
        classes = [check_int("task_classes entry", c) for cs in task_classes for c in cs]
        if sorted(classes) != sorted(set(classes)) or any(not 0 <= c < num_classes for c in classes):
            raise ValueError(f"task_classes must be disjoint class ids in [0, {num_classes}), got {task_classes}")
        self.body, self.d_in = body, d_in
        self.head = nn.Linear(d_in, num_classes)
        self.task_classes = [list(cs) for cs in task_classes]
        self.routed = isinstance(body, MoE) and isinstance(body.router, TaskRouter)

    def forward(self, x_BD: torch.Tensor, task_id: int) -> torch.Tensor:
        """(B, D) → (B, L) logits over all classes, the body routed for `task_id` (ignored by a
        body that routes by input)."""
        if x_BD.dim() != 2 or x_BD.shape[1] != self.d_in:
            raise ValueError(f"x must have shape (B, {self.d_in}), got {tuple(x_BD.shape)}")
        if self.routed:
            ids_B = torch.full(x_BD.shape[:1], task_id, dtype=torch.long, device=x_BD.device)
            return self.head(self.body(x_BD, task_ids=ids_B))
        return self.head(self.body(x_BD))

    def task_logits(self, x_BD: torch.Tensor, task_id: int) -> torch.Tensor:
        """(B, L) logits with −∞ outside task `task_id`'s classes."""
        logits_BL = self.forward(x_BD, task_id)
        keep_L = torch.zeros(logits_BL.shape[1], dtype=torch.bool, device=logits_BL.device)
        keep_L[self.task_classes[task_id]] = True
        return logits_BL.masked_fill(~keep_L, float("-inf"))

    @torch.no_grad()
    def predict_class_incremental(self, x_BD: torch.Tensor, num_tasks: int) -> torch.Tensor:
        """(B,) class ids without the task id: argmax over tasks < `num_tasks` of each task's
        own class logits (one body pass per task for a routed body)."""
        scores_BL = torch.full((x_BD.shape[0], self.head.out_features), float("-inf"), device=x_BD.device)
        for t in range(num_tasks):
            cs = self.task_classes[t]
            scores_BL[:, cs] = self.forward(x_BD, t)[:, cs]
        return scores_BL.argmax(-1)


def dense_task_net(*, d_in: int, d_hidden: int, num_classes: int, task_classes,
                   activation: str = "gelu") -> TaskIncrementalNet:
    """Dense baseline: one MLP ``D → F → D`` (a `DenseFFN`) and the shared head."""
    return TaskIncrementalNet(DenseFFN(d_in, d_hidden, expert="mlp", activation=activation), d_in=d_in,
                              num_classes=num_classes, task_classes=task_classes)


def task_moe_net(*, d_in: int, d_expert: int, num_experts: int, top_k: int, num_classes: int, task_classes,
                 growing: bool = True, d_task: int = 16, activation: str = "gelu") -> TaskIncrementalNet:
    """MoE of MLP experts ``D → F → D`` routed by task id, and the shared head.

    growing: a `GrowingTaskRouter` that starts with one task (grow with `start_task`); else a
    plain `TaskRouter` for all tasks of `task_classes` from the start (Task-MoE).
    """
    check_int("d_expert", d_expert, min=1)
    router = (GrowingTaskRouter(d_in, num_experts, top_k, d_task=d_task) if check_bool("growing", growing) else
              TaskRouter(d_in, num_experts, top_k, num_tasks=len(task_classes), d_task=d_task))
    # One routing decision per task: a balancing loss would only push tasks apart at random.
    moe = MoE(d_model=d_in, num_experts=num_experts, router=router, expert="mlp", d_hidden=d_expert,
              activation=activation, aux_loss_coef=0.0)
    return TaskIncrementalNet(moe, d_in=d_in, num_classes=num_classes, task_classes=task_classes)


def token_moe_net(*, d_in: int, d_expert: int, num_experts: int, top_k: int, num_classes: int, task_classes,
                  activation: str = "gelu") -> TaskIncrementalNet:
    """Lifelong-MoE as in the paper: MLP experts ``D → F → D`` behind a softmax top-k router on the
    input (no task id at test time), and the shared head. Grow it with `start_task`."""
    check_int("d_expert", d_expert, min=1)
    router = TopKRouter(d_in, num_experts, top_k)
    moe = MoE(d_model=d_in, num_experts=num_experts, router=router, expert="mlp", d_hidden=d_expert,
              activation=activation, aux_loss_coef=0.0)
    return TaskIncrementalNet(moe, d_in=d_in, num_classes=num_classes, task_classes=task_classes)


def start_task(net: TaskIncrementalNet, task_id: int, *, experts_per_task: int, freeze: bool = True) -> list[int]:
    """Before training task `task_id` ≥ 1 of a growing MoE net: add experts (and the task, for a
    task router), freeze the old experts and their router rows (if `freeze`). Returns the new
    expert ids. Build the optimizer after this.

    An input-routed net (`token_moe_net`) gets new router rows of zeros (logit 0): they compete
    with the old rows from the start, which is what the output-level KL regulariser is for.
    """
    check_int("experts_per_task", experts_per_task, min=1)
    check_bool("freeze", freeze)
    router = getattr(net.body, "router", None)
    if isinstance(router, GrowingTaskRouter):
        if task_id != router.num_tasks:
            raise ValueError(f"tasks must start in order: the router has {router.num_tasks} tasks, "
                             f"got task_id={task_id}")
    elif not isinstance(router, TopKRouter) or isinstance(router, TaskRouter):
        raise ValueError(f"start_task needs a net from task_moe_net(growing=True) or token_moe_net, "
                         f"got router {type(router).__name__}")
    old = list(range(net.body.num_experts))
    new = add_experts(net.body, experts_per_task)
    if isinstance(router, GrowingTaskRouter):
        router.add_task(prefer=new)
    if freeze:
        freeze_experts(net.body, old)
    return new


def distillation_kl(student_BL: torch.Tensor, teacher_BL: torch.Tensor, classes: Sequence[int], *,
                    temperature: float = 2.0) -> torch.Tensor:
    """``τ² · mean_b KL(softmax(t_b / τ) ‖ softmax(s_b / τ))`` over the columns `classes` only
    (Lifelong-MoE's output regulariser, in Hinton et al. 2015's form; the τ² keeps its gradient
    scale independent of τ). Scalar, 0 exactly when the two logit rows agree up to a constant;
    the teacher gets no gradient."""
    temperature = check_number("temperature", temperature, min=0, min_open=True)
    if student_BL.shape != teacher_BL.shape or student_BL.dim() != 2:
        raise ValueError(f"student and teacher logits must have one shape (B, L), got {tuple(student_BL.shape)} "
                         f"and {tuple(teacher_BL.shape)}")
    cols = list(classes)
    if not cols:
        raise ValueError("classes must name at least one column")
    log_p_BC = F.log_softmax(teacher_BL.detach()[:, cols].float() / temperature, dim=-1)
    log_q_BC = F.log_softmax(student_BL[:, cols].float() / temperature, dim=-1)
    kl_B = (log_p_BC.exp() * (log_p_BC - log_q_BC)).sum(-1)
    return temperature ** 2 * kl_B.mean()


def train_task(net: TaskIncrementalNet, x_ND: torch.Tensor, y_N: torch.Tensor, task_id: Optional[int], *,
               epochs: int, batch_size: int, lr: float, seed: int = 0,
               task_ids_N: Optional[torch.Tensor] = None, teacher: Optional[TaskIncrementalNet] = None,
               kl_coef: float = 0.0, kl_temperature: float = 2.0) -> float:
    """Adam at a constant lr (fresh, no weight decay: frozen rows stay bit-identical) on
    shuffled epochs, each step a `moekit.optim.UpdateStep`.

    Sequential training: ``task_id`` set, loss on that task's classes (`task_logits`). Joint
    training: ``task_id=None`` and a dense body, plain 10-way cross-entropy. Returns seconds.
    teacher / kl_coef: add ``kl_coef · distillation_kl`` to the teacher's logits over the classes
    of tasks before `task_id` (Lifelong-MoE; ``kl_coef=0`` is exactly the plain loss).
    """
    epochs = check_int("epochs", epochs, min=1)
    batch_size = check_int("batch_size", batch_size, min=1)
    kl_coef = check_number("kl_coef", kl_coef, min=0)
    old_classes = [c for cs in net.task_classes[:task_id or 0] for c in cs]
    use_kl = kl_coef > 0 and bool(old_classes)
    if use_kl and not isinstance(teacher, TaskIncrementalNet):
        raise ValueError(f"kl_coef={kl_coef} needs a teacher TaskIncrementalNet, got {type(teacher).__name__}")
    if use_kl and teacher.routed:
        raise ValueError("the KL teacher must route by input (token_moe_net) or be dense: a task-routed teacher "
                         f"has no route for the new task {task_id}")
    if use_kl:
        teacher.eval()
    opt = build_optimizer(net, name="adam", lr=lr)
    update = UpdateStep(net, opt, lr=lr, total_steps=epochs * -(-len(y_N) // batch_size), schedule="constant")
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    net.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y_N), generator=gen).split(batch_size):
            if task_id is None:
                update(F.cross_entropy(net(x_ND[idx], 0), y_N[idx]))
                continue
            logits_BL = net(x_ND[idx], task_id)
            keep_L = torch.zeros(logits_BL.shape[1], dtype=torch.bool, device=logits_BL.device)
            keep_L[net.task_classes[task_id]] = True
            loss = F.cross_entropy(logits_BL.masked_fill(~keep_L, float("-inf")), y_N[idx])
            if use_kl:
                with torch.no_grad():
                    teacher_BL = teacher(x_ND[idx], task_id)
                loss = loss + kl_coef * distillation_kl(logits_BL, teacher_BL, old_classes, temperature=kl_temperature)
            update(loss)
    return time.perf_counter() - t0


@torch.no_grad()
def task_accuracy(net: TaskIncrementalNet, x_ND: torch.Tensor, y_N: torch.Tensor, task_id: int,
                  batch_size: int = 2048) -> float:
    """Task-incremental accuracy: argmax over task `task_id`'s classes, the task id given."""
    net.eval()
    right = sum(int((net.task_logits(x, task_id).argmax(-1) == y).sum())
                for x, y in zip(x_ND.split(batch_size), y_N.split(batch_size)))
    return right / len(y_N)


def train_sequentially(net: TaskIncrementalNet, tasks: Sequence[tuple], *, before_task: Optional[Callable] = None,
                       kl_coef: float = 0.0, **train_kwargs) -> tuple[torch.Tensor, float]:
    """Train on ``tasks = [(x_train, y_train, x_test, y_test), ...]`` in order; after task t
    evaluate tasks 0..t (later ones are NaN). ``before_task(net, t)`` runs before task t ≥ 1
    (e.g. `start_task`). ``kl_coef > 0``: before task t ≥ 1 (and before `before_task`) a frozen
    copy of the net becomes the teacher of `train_task`'s output KL. Returns the (T, T) accuracy
    matrix and the training seconds."""
    kl_coef = check_number("kl_coef", kl_coef, min=0)
    rows, seconds = [], 0.0
    for t, (x, y, _, _) in enumerate(tasks):
        teacher = None
        if kl_coef > 0 and t > 0:
            teacher = copy.deepcopy(net).requires_grad_(False).eval()
        if before_task is not None and t > 0:
            before_task(net, t)
        seconds += train_task(net, x, y, t, seed=t, teacher=teacher, kl_coef=kl_coef if teacher else 0.0,
                              **train_kwargs)
        rows.append([task_accuracy(net, xt, yt, j) if j <= t else float("nan")
                     for j, (_, _, xt, yt) in enumerate(tasks)])
    return accuracy_matrix(rows), seconds


# -- metrics ----------------------------------------------------------------------------------

def accuracy_matrix(rows: Sequence[Sequence[float]]) -> torch.Tensor:
    """(T, T) float64 ``R[i, j]`` = accuracy on task j after training task i, from T rows of T
    accuracies in [0, 1]. Entries above the diagonal (tasks not yet trained) may be NaN."""
    R = torch.as_tensor([list(map(float, r)) for r in rows], dtype=torch.float64)
    if R.dim() != 2 or R.shape[0] == 0 or R.shape[0] != R.shape[1]:
        raise ValueError(f"need T rows of T accuracies (a square matrix), got shape {tuple(R.shape)}")
    lower = torch.tril(torch.ones_like(R, dtype=torch.bool))
    vals = R[lower]
    if vals.isnan().any() or (vals < 0).any() or (vals > 1).any():
        raise ValueError(f"accuracies on and below the diagonal must lie in [0, 1], got {R[lower].tolist()}")
    return R


def _check_matrix(R: torch.Tensor) -> torch.Tensor:
    if not isinstance(R, torch.Tensor):
        raise TypeError(f"expected a tensor from accuracy_matrix, got {type(R).__name__}")
    return accuracy_matrix(R.tolist())


def average_accuracy(R: torch.Tensor) -> float:
    """``A_T = (1/T) Σ_j R[T−1, j]`` (Chaudhry et al. 2018)."""
    R = _check_matrix(R)
    return float(R[-1].mean())


def average_forgetting(R: torch.Tensor) -> float:
    """``F_T = 1/(T−1) Σ_{j<T−1} (max_{j≤l≤T−2} R[l, j] − R[T−1, j])`` (Chaudhry et al. 2018);
    0 for a single task."""
    R = _check_matrix(R)
    T = R.shape[0]
    if T == 1:
        return 0.0
    return sum(float(R[j:T - 1, j].max() - R[T - 1, j]) for j in range(T - 1)) / (T - 1)


def backward_transfer(R: torch.Tensor) -> float:
    """``BWT = 1/(T−1) Σ_{j<T−1} (R[T−1, j] − R[j, j])`` (Lopez-Paz & Ranzato 2017); 0 for one task."""
    R = _check_matrix(R)
    T = R.shape[0]
    return 0.0 if T == 1 else float((R[-1, :-1] - R.diagonal()[:-1]).mean())
