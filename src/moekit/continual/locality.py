"""Locality-gated experts with router termination: the theory paper's continual MoE (METHODS.md C5).

Legend: D input dim, d regression dim, s samples of one task, M experts, L classes.

Method (Li, Lin, Duan, Liang & Shroff 2024/ICLR 2025, "Theory on Mixture-of-Experts in Continual
Learning"): tasks arrive one at a time. The router scores a task by ``h_m = θ_mᵀ z_t`` with
``z_t = Σ_i X_{t,i}`` (its inputs summed), plus small random noise for tie-breaking, and sends it
to the top-1 expert ``m_t``; only that expert learns the task — in the linear setting by the
minimum-norm interpolator ``w ← w + X (XᵀX)⁻¹ (y − Xᵀw)`` (`min_norm_update`). The router then
takes one gradient step (lr η) on ``L = L_loc + L_aux``:

- locality ``L_loc = Σ_m π_m(z_t) ‖w_t^{(m)} − w_{t−1}^{(m)}‖₂`` with ``π = softmax(h)``: only the
  expert that moved contributes, so routing a task to an expert it changes a lot costs more;
- balance over the task history ``L_aux = α M Σ_m f_m P_m`` with ``f_m`` the fraction of tasks
  1..t sent to m and ``P_m = π_m(z_t)`` the current task's router probability (the one term θ
  acts on now). Our reading: averaging P over the history too would scale the gradient by 1/t,
  and the balance term — the reason termination is needed — would fade by itself.

The key rule: after ``T1`` rounds the router stops learning (`terminate_after`); the paper
proves that without termination the balance term keeps moving tasks between experts once they
have specialised, and the system does not converge. `LocalityRouter` is the router alone (any
experts); `ContinualLinearMoE` is the paper's linear-regression system; `assigned_task_net` and
`learn_task_locality` apply the same strategy to deep experts (a `moekit.MoE` bank whose task
router follows the locality router's choices, one expert trained per task by `train_task`).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from moekit.layers import MoE
from moekit.layers.grow import freeze_experts
from moekit.models.continual import TaskIncrementalNet, train_task
from moekit.routing.task import TaskRouter
from moekit.validate import check_int, check_number, check_tensor

__all__ = ["LocalityRouter", "ContinualLinearMoE", "min_norm_update", "AssignedTaskRouter", "assigned_task_net",
           "learn_task_locality"]


def min_norm_update(w_d: torch.Tensor, X_ds: torch.Tensor, y_s: torch.Tensor) -> torch.Tensor:
    """``w + X (XᵀX)⁻¹ (y − Xᵀw)``: the interpolator of task (X, y) closest to w (s ≤ d)."""
    if X_ds.dim() != 2 or X_ds.shape[0] != w_d.shape[0] or y_s.shape != (X_ds.shape[1],):
        raise ValueError(f"need w (d,), X (d, s), y (s,); got {tuple(w_d.shape)}, {tuple(X_ds.shape)}, "
                         f"{tuple(y_s.shape)}")
    if X_ds.shape[1] > X_ds.shape[0]:
        raise ValueError(f"the minimum-norm interpolator needs s <= d samples, got X of shape {tuple(X_ds.shape)}")
    r_s = y_s - X_ds.T @ w_d
    return w_d + X_ds @ torch.linalg.solve(X_ds.T @ X_ds, r_s)


class LocalityRouter(nn.Module):
    """Task-level top-1 router ``θ`` (M, D), trained by GD on ``L_loc + L_aux`` until round T1.

    Args:
        lr: η of the router's gradient step.
        alpha: α of ``L_aux = α M Σ_m f_m P_m``.
        terminate_after: T1; the router learns in rounds 0..T1−1 only (None: never stops).
        noise: std of the Gaussian tie-breaking noise added to the scores when routing.
        seed: seed of the noise generator (routing is reproducible).
    """

    def __init__(self, d_in: int, num_experts: int, *, lr: float = 0.1, alpha: float = 0.5,
                 terminate_after: Optional[int] = None, noise: float = 1e-3, seed: int = 0):
        super().__init__()
        self.d_in = check_int("d_in", d_in, min=1)
        self.num_experts = check_int("num_experts", num_experts, min=1)
        self.lr = check_number("lr", lr, min=0, min_open=True)
        self.alpha = check_number("alpha", alpha, min=0)
        self.terminate_after = check_int("terminate_after", terminate_after, min=0, allow_none=True)
        self.noise = check_number("noise", noise, min=0)
        self.weight = nn.Parameter(torch.zeros(num_experts, d_in, dtype=torch.float64), requires_grad=False)
        self.register_buffer("counts", torch.zeros(num_experts, dtype=torch.float64))    # tasks sent to each m
        self.rounds = 0
        self._gen = torch.Generator().manual_seed(check_int("seed", seed))

    @property
    def terminated(self) -> bool:
        return self.terminate_after is not None and self.rounds >= self.terminate_after

    def _z(self, z_D: torch.Tensor) -> torch.Tensor:
        return check_tensor("z", z_D, shape=(self.d_in,), floating=True).to(self.weight)

    def probs(self, z_D: torch.Tensor) -> torch.Tensor:
        """(M,) ``π = softmax(θ z)`` (no noise)."""
        return torch.softmax(self.weight @ self._z(z_D), -1)

    def route(self, z_D: torch.Tensor) -> int:
        """The top-1 expert of ``θ z + noise``."""
        h_M = self.weight @ self._z(z_D)
        if self.noise > 0:
            h_M = h_M + self.noise * torch.randn(self.num_experts, generator=self._gen, dtype=h_M.dtype)
        return int(h_M.argmax())

    def losses(self, z_D: torch.Tensor, expert: int, delta_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``(L_loc, L_aux)`` of this round as functions of θ, counting the current task (sent
        to `expert`, whose weights moved by `delta_norm`) in the history."""
        expert = check_int("expert", expert, min=0, max=self.num_experts - 1)
        delta_norm = check_number("delta_norm", delta_norm, min=0)
        pi_M = torch.softmax(self.weight @ self._z(z_D), -1)
        moved_M = torch.zeros_like(pi_M)
        moved_M[expert] = delta_norm
        counts_M = self.counts.clone()
        counts_M[expert] += 1
        f_M = counts_M / counts_M.sum()
        return (pi_M * moved_M).sum(), self.alpha * self.num_experts * (f_M * pi_M).sum()

    def step(self, z_D: torch.Tensor, expert: int, delta_norm: float) -> dict:
        """Record round t (task sent to `expert`, which moved by `delta_norm`) and, unless
        terminated, take one GD step on ``L_loc + L_aux``. Returns the losses and whether θ moved."""
        with torch.enable_grad():
            self.weight.requires_grad_(True)
            loc, aux = self.losses(z_D, expert, delta_norm)
            updated = not self.terminated
            if updated:
                (grad,) = torch.autograd.grad(loc + aux, self.weight)
            self.weight.requires_grad_(False)
        with torch.no_grad():
            if updated:
                self.weight -= self.lr * grad
            self.counts[expert] += 1
        self.rounds += 1
        return {"loc": float(loc.detach()), "aux": float(aux.detach()), "updated": updated}


class ContinualLinearMoE(nn.Module):
    """M linear experts ``w`` (M, d), float64, behind a `LocalityRouter`; the paper's system.

    `learn_task(X, y)`: route on ``z = Σ_i X_i``, update the chosen expert by `min_norm_update`,
    then one router round. M = 1 is the single-expert baseline (the router is irrelevant).
    """

    def __init__(self, d: int, num_experts: int, **router_kwargs):
        super().__init__()
        self.d = check_int("d", d, min=1)
        self.router = LocalityRouter(d, num_experts, **router_kwargs)
        self.register_buffer("w", torch.zeros(num_experts, d, dtype=torch.float64))

    @torch.no_grad()
    def learn_task(self, X_ds: torch.Tensor, y_s: torch.Tensor) -> int:
        """Learn one task (inputs as columns of X (d, s), targets y (s,)); return its expert."""
        X_ds = check_tensor("X", X_ds, shape=(self.d, None), floating=True).double()
        y_s = check_tensor("y", y_s, shape=(X_ds.shape[1],), floating=True).double()
        z_d = X_ds.sum(1)
        m = self.router.route(z_d)
        new_d = min_norm_update(self.w[m], X_ds, y_s)
        delta = float(torch.linalg.vector_norm(new_d - self.w[m]))
        self.w[m] = new_d
        self.router.step(z_d, m, delta)
        return m


# -- the same strategy on deep experts ------------------------------------------------------------

class AssignedTaskRouter(TaskRouter):
    """`TaskRouter` whose task t goes to the one expert `assign`ed to it (logit 0, the others −∞;
    an unassigned task goes to expert 0). The assignment comes from outside (a `LocalityRouter`)."""

    def __init__(self, d_model: int, num_experts: int, *, num_tasks: int):
        super().__init__(d_model, num_experts, 1, num_tasks=num_tasks, d_task=1)
        self.register_buffer("assignment", torch.full((num_tasks,), -1, dtype=torch.long))

    def assign(self, task_id: int, expert: int) -> None:
        check_int("task_id", task_id, min=0, max=self.num_tasks - 1)
        self.assignment[task_id] = check_int("expert", expert, min=0, max=self.num_experts - 1)

    def task_logits(self) -> torch.Tensor:
        e_M = self.assignment.clamp_min(0)
        hot_ME = torch.nn.functional.one_hot(e_M, self.num_experts).bool()
        logits_ME = torch.zeros(self.num_tasks, self.num_experts, device=self.weight.device)
        return logits_ME.masked_fill(~hot_ME, float("-inf"))


def assigned_task_net(*, d_in: int, d_expert: int, num_experts: int, num_classes: int, task_classes,
                      activation: str = "gelu") -> TaskIncrementalNet:
    """A `TaskIncrementalNet` over an MoE of MLP experts ``D → F → D`` routed by `AssignedTaskRouter`."""
    check_int("d_expert", d_expert, min=1)
    router = AssignedTaskRouter(d_in, num_experts, num_tasks=len(task_classes))
    moe = MoE(d_model=d_in, num_experts=num_experts, router=router, expert="mlp", d_hidden=d_expert,
              activation=activation, aux_loss_coef=0.0)
    return TaskIncrementalNet(moe, d_in=d_in, num_classes=num_classes, task_classes=task_classes)


def _expert_rows(moe: MoE, m: int) -> torch.Tensor:
    return torch.cat([p.detach()[m].flatten() for p in moe.experts.parameters()
                      if p.dim() >= 1 and p.shape[0] == moe.num_experts])


def learn_task_locality(net: TaskIncrementalNet, router: LocalityRouter, x_ND: torch.Tensor, y_N: torch.Tensor,
                        task_id: int, **train_kwargs) -> int:
    """C5 on deep experts: route task `task_id` on its mean input (the scale-free form of
    ``Σ_i x_i``), train only the chosen expert (and the task's head rows) with `train_task`,
    then one router round with that expert's parameter change ‖Δ‖₂. Returns the expert."""
    body = getattr(net, "body", None)
    if not isinstance(body, MoE) or not isinstance(body.router, AssignedTaskRouter):
        raise ValueError(f"net must come from assigned_task_net, got body {type(body).__name__}")
    if router.num_experts != body.num_experts or router.d_in != net.d_in:
        raise ValueError(f"router must have {body.num_experts} experts over {net.d_in} inputs, got "
                         f"{router.num_experts} over {router.d_in}")
    z_D = x_ND.double().mean(0)
    m = router.route(z_D)
    body.router.assign(task_id, m)
    body.frozen_experts = ()
    freeze_experts(body, [e for e in range(body.num_experts) if e != m])
    before = _expert_rows(body, m)
    train_task(net, x_ND, y_N, task_id, **train_kwargs)
    router.step(z_D, m, float(torch.linalg.vector_norm((_expert_rows(body, m) - before).double())))
    return m
