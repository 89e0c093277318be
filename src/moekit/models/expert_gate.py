"""Expert Gate: one under-complete auto-encoder per task sends each test input to its task's expert.

Legend: B batch, N examples of one task, D input dim, H auto-encoder hidden width, M tasks
(auto-encoders) so far, L classes.

Method (METHODS.md C1; Aljundi, Chakravarty & Tuytelaars 2017, "Expert Gate: Lifelong Learning
with a Network of Experts", CVPR): when task m arrives, a small auto-encoder is trained on that
task's inputs only and then frozen. At test time each auto-encoder's reconstruction error
``er_m(x)`` scores how much x looks like task m; ``p = softmax(−er / t)`` with t = 2, and the
input goes to the expert of ``argmax p = argmin er`` — so a task-routed model (here a
`TaskIncrementalNet`) can run without being told the task id. The same errors measure how
related a new task k is to an old task a, ``Rel(a, k) = 1 − (er_a − er_k) / er_k`` (mean errors
over task k's data), which the paper uses to pick the old expert a new one starts from.

Auto-encoder (choices of this module): ``D → H → D``, ReLU after the encoder, linear decoder,
squared error averaged over the D features, Adam. The paper's auto-encoders read AlexNet conv
features squashed to [0, 1] (a sigmoid decoder, Adagrad in the authors' code); with no
pretrained feature extractor here the gate reads whatever the caller gives it (pixels in the
Split Fashion-MNIST example). The gate does no standardisation of its own: the errors of
different auto-encoders are compared with each other, so they must be measured in one space —
standardise the inputs once, with statistics shared by all tasks. (Standardising each task
per feature with its own statistics measures each error in different units; on Split
Fashion-MNIST, 6,000 images per task, it identified the task less often: 79.9 % against 83.0 %.) H = 100 by default,
the paper's width; it must be < D (under-complete, or the identity would reconstruct anything).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from moekit.models.continual import TaskIncrementalNet
from moekit.optim import UpdateStep, build_optimizer
from moekit.validate import check_int, check_number

__all__ = ["TaskAutoencoder", "ExpertGate", "GatedAccuracy", "gated_predict", "gated_accuracy"]


class TaskAutoencoder(nn.Module):
    """``x_BD → ReLU(x W_e + b_e) W_d + b_d``, one task's under-complete auto-encoder."""

    def __init__(self, d_in: int, d_hidden: int):
        super().__init__()
        self.encoder = nn.Linear(d_in, d_hidden)
        self.decoder = nn.Linear(d_hidden, d_in)

    def forward(self, x_BD: torch.Tensor) -> torch.Tensor:
        return self.decoder(F.relu(self.encoder(x_BD)))

    def errors(self, x_BD: torch.Tensor) -> torch.Tensor:
        """(B,) reconstruction error, ``mean_d (x̂_d − x_d)²``."""
        return (self(x_BD) - x_BD).square().mean(-1)


class ExpertGate(nn.Module):
    """The gate of Expert Gate: one frozen `TaskAutoencoder` per task, added by `add_task`.

    d_in: D, the width of the inputs the gate reads. d_hidden: H < D. epochs, lr, batch_size:
    how `add_task` trains each auto-encoder (Adam at a constant lr, shuffled epochs,
    `moekit.optim.UpdateStep`). seed: auto-encoder m is
    initialised and shuffled from ``seed + m`` (the global RNG is left as it was).
    """

    def __init__(self, d_in: int, *, d_hidden: int = 100, epochs: int = 5, lr: float = 1e-3,
                 batch_size: int = 128, seed: int = 0):
        super().__init__()
        for name, value in (("d_in", d_in), ("d_hidden", d_hidden), ("epochs", epochs), ("batch_size", batch_size)):
            check_int(name, value, min=1)
        if d_hidden >= d_in:
            raise ValueError(f"the auto-encoder must be under-complete: need d_hidden < d_in = {d_in}, got {d_hidden}")
        lr = check_number("lr", lr, min=0, min_open=True)
        check_int("seed", seed)
        self.d_in, self.d_hidden, self.epochs, self.lr, self.batch_size, self.seed = (
            d_in, d_hidden, epochs, lr, batch_size, seed)
        self.autoencoders = nn.ModuleList()

    @property
    def num_tasks(self) -> int:
        return len(self.autoencoders)

    def _check_x(self, x_BD: torch.Tensor, what: str = "x") -> None:
        if not isinstance(x_BD, torch.Tensor) or x_BD.dim() != 2 or x_BD.shape[1] != self.d_in:
            got = tuple(x_BD.shape) if isinstance(x_BD, torch.Tensor) else type(x_BD).__name__
            raise ValueError(f"{what} must be a tensor of shape (B, {self.d_in}), got {got}")
        if x_BD.shape[0] == 0:
            raise ValueError(f"{what} must hold at least one example, got shape {tuple(x_BD.shape)}")
        if not x_BD.is_floating_point():
            raise ValueError(f"{what} must be floating point, got {x_BD.dtype}")

    def _check_tasks(self) -> None:
        if self.num_tasks == 0:
            raise ValueError("the gate has no tasks yet: call add_task(x_train) first")

    def add_task(self, x_ND: torch.Tensor) -> int:
        """Train a new auto-encoder on task inputs ``x_ND`` (that task's data only), freeze it,
        and return its task index m. Earlier auto-encoders are not touched (bit-identical)."""
        self._check_x(x_ND, "x_train")
        if not torch.isfinite(x_ND).all():
            raise ValueError("x_train must be finite")
        m = self.num_tasks
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed + m)
            ae = TaskAutoencoder(self.d_in, self.d_hidden)
        if self.autoencoders:       # one dtype and device for every auto-encoder: their errors are compared
            ae = ae.to(next(self.autoencoders[0].parameters()))
            x_ND = x_ND.to(next(ae.parameters()))
        else:
            ae = ae.to(device=x_ND.device, dtype=x_ND.dtype)
        opt = build_optimizer(ae, name="adam", lr=self.lr)
        update = UpdateStep(ae, opt, lr=self.lr, total_steps=self.epochs * -(-len(x_ND) // self.batch_size),
                            schedule="constant")
        gen = torch.Generator().manual_seed(self.seed + m)
        with torch.enable_grad():
            for _ in range(self.epochs):
                for idx in torch.randperm(len(x_ND), generator=gen).split(self.batch_size):
                    update(ae.errors(x_ND[idx.to(x_ND.device)]).mean())
        self.autoencoders.append(ae.requires_grad_(False).eval())
        return m

    @torch.no_grad()
    def reconstruction_errors(self, x_BD: torch.Tensor) -> torch.Tensor:
        """(B, M) ``er[b, m]``: auto-encoder m's mean squared reconstruction error on x_b."""
        self._check_x(x_BD)
        self._check_tasks()
        x_BD = x_BD.to(next(self.autoencoders[0].parameters()))
        return torch.stack([ae.errors(x_BD) for ae in self.autoencoders], -1)

    def probs(self, x_BD: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
        """(B, M) ``softmax(−er / t)`` over tasks; t = 2 in the paper (for its error scale)."""
        check_number("temperature", temperature, min=0, min_open=True)
        return torch.softmax(-self.reconstruction_errors(x_BD) / temperature, dim=-1)

    def predict_task(self, x_BD: torch.Tensor) -> torch.Tensor:
        """(B,) the task whose auto-encoder reconstructs x best (argmax of `probs` for any t)."""
        return self.reconstruction_errors(x_BD).argmin(-1)

    def relatedness(self, x_ND: torch.Tensor, task: int = -1) -> torch.Tensor:
        """(M,) float64 ``Rel(a, k) = 1 − (er_a − er_k) / er_k`` for every task a, where k = `task`
        (default the latest, i.e. call after `add_task` of the new task), x_ND is task k's data
        (the paper uses its validation split) and ``er_a`` is auto-encoder a's mean error on it.
        Entry k is exactly 1; the old task with the largest value is the most related."""
        self._check_tasks()
        check_int("task", task)
        if not -self.num_tasks <= task < self.num_tasks:
            raise ValueError(f"task must be an int in [-{self.num_tasks}, {self.num_tasks}), got {task!r}")
        er_M = self.reconstruction_errors(x_ND).double().mean(0)
        er_k = er_M[task]
        return 1 - (er_M - er_k) / er_k


# -- the gate in front of a task-routed net -----------------------------------------------------

@dataclass(frozen=True)
class GatedAccuracy:
    """task_identification: fraction of inputs the gate sends to their true task. accuracy:
    fraction classified right by the predicted task's classifier (class-incremental: no task id).
    confusion: (M, M) counts, row = true task, column = the gate's task."""
    task_identification: float
    accuracy: float
    confusion: torch.Tensor


@torch.no_grad()
def gated_predict(net: TaskIncrementalNet, gate: ExpertGate, x_BD: torch.Tensor, *,
                  gate_inputs: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(task_B, class_B): the gate's task for each input and the class the net predicts when
    routed for that task (argmax over that task's classes). gate_inputs: what the gate reads,
    if not x (e.g. pre-extracted features, as in the paper), one row per row of x."""
    if not isinstance(net, TaskIncrementalNet):
        raise ValueError(f"net must be a TaskIncrementalNet, got {type(net).__name__}")
    g_BD = x_BD if gate_inputs is None else gate_inputs
    if g_BD.shape[0] != x_BD.shape[0]:
        raise ValueError(f"gate_inputs must have one row per input: expected {x_BD.shape[0]}, got {g_BD.shape[0]}")
    if gate.num_tasks > len(net.task_classes):
        raise ValueError(f"the gate has {gate.num_tasks} tasks but the net only {len(net.task_classes)}")
    task_B = gate.predict_task(g_BD)
    class_B = torch.empty_like(task_B)
    was_training = net.training
    net.eval()
    for t in task_B.unique().tolist():
        rows = (task_B == t).nonzero().squeeze(1)
        class_B[rows] = net.task_logits(x_BD[rows], t).argmax(-1)
    net.train(was_training)
    return task_B, class_B


@torch.no_grad()
def gated_accuracy(net: TaskIncrementalNet, gate: ExpertGate, x_BD: torch.Tensor, y_B: torch.Tensor, *,
                   gate_inputs: Optional[torch.Tensor] = None, batch_size: int = 2048) -> GatedAccuracy:
    """Evaluate ``net`` without task ids: each input goes to the gate's task (`gated_predict`).
    The true task of an input is the task owning its label in ``net.task_classes``; labels of
    tasks the gate has not seen are an error."""
    check_int("batch_size", batch_size, min=1)
    if y_B.dim() != 1 or y_B.shape[0] != x_BD.shape[0]:
        raise ValueError(f"y must have shape ({x_BD.shape[0]},), got {tuple(y_B.shape)}")
    L = net.head.out_features
    if y_B.is_floating_point() or (len(y_B) and (y_B.min() < 0 or y_B.max() >= L)):
        raise ValueError(f"y must hold integer class labels in [0, {L}), got {y_B.dtype} "
                         f"{y_B.min().item() if len(y_B) else ''}..{y_B.max().item() if len(y_B) else ''}")
    M = gate.num_tasks
    task_of_L = torch.full((net.head.out_features,), -1, dtype=torch.long, device=y_B.device)
    for t, cs in enumerate(net.task_classes[:M]):
        task_of_L[list(cs)] = t
    true_B = task_of_L[y_B]
    if (true_B < 0).any():
        raise ValueError(f"labels {sorted(set(y_B[true_B < 0].tolist()))} belong to no task the gate has seen "
                         f"(its {M} tasks own classes {net.task_classes[:M]})")
    g_BD = x_BD if gate_inputs is None else gate_inputs
    if g_BD.shape[0] != x_BD.shape[0]:
        raise ValueError(f"gate_inputs must have one row per input: expected {x_BD.shape[0]}, got {g_BD.shape[0]}")
    task_B, class_B = zip(*(gated_predict(net, gate, x, gate_inputs=g)
                            for x, g in zip(x_BD.split(batch_size), g_BD.split(batch_size))))
    task_B, class_B = torch.cat(task_B), torch.cat(class_B)
    confusion = torch.zeros(M, M, dtype=torch.long)
    confusion.index_put_((true_B.cpu(), task_B.cpu()), torch.ones_like(true_B.cpu()), accumulate=True)
    return GatedAccuracy(task_identification=int((task_B == true_B).sum()) / len(y_B),
                         accuracy=int((class_B == y_B).sum()) / len(y_B), confusion=confusion)
