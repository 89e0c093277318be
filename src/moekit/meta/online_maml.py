"""Online mixture of MAML initialisations with a Chinese-restaurant-process prior over task clusters.

Legend: L components (initialisations), S support points, Q query points.

Jerfel, Grant, Griffiths & Heller (2019), "Reconciling meta-learning and continual learning with
online mixtures of tasks", NeurIPS (METHODS.md M2): keep L meta-learned initialisations θ_l of
one network. For each arriving task:

1. adapt every θ_l on the support set by `inner_steps` gradient steps on the support MSE
   (MAML's inner loop), giving φ_l; also adapt a *candidate* drawn fresh from the base
   initialiser (the CRP's new table);
2. E-step: responsibilities ``γ_l ∝ prior_l · p(y_Q | x_Q, φ_l)`` with a Gaussian likelihood of
   std `noise_std` and the CRP prior ``prior_l = n_l / (N + α)``, ``prior_new = α / (N + α)``
   (n_l the soft task counts, N their sum, α the concentration);
3. the candidate becomes a new component only when its responsibility is the largest, i.e. when
   its CRP-weighted likelihood wins; otherwise it is dropped and γ renormalised over the others;
4. M-step: one optimizer step on each θ_l with the responsibility-weighted meta-loss
   ``Σ_l γ_l · MSE_Q(φ_l)`` (γ held constant, gradients through the inner loop unless
   `first_order`), and ``n_l += γ_l``.

With one component and α = 0 every γ is 1 and the step is exactly MAML's (tested). The first task
always sits at component 0 (a CRP's first customer). Prediction for a new task uses the component
with the largest posterior given its support set alone. Fresh candidates come from re-running
``reset_parameters`` on a copy of the template network [D].
"""
from __future__ import annotations

import copy
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from moekit.optim import UpdateStep, build_optimizer
from moekit.validate import check_bool, check_instance, check_int, check_number, check_tensor

__all__ = ["OnlineMAMLMixture"]


def _reset(module: nn.Module) -> nn.Module:
    for m in module.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return module


class OnlineMAMLMixture(nn.Module):
    """An online mixture of MAML initialisations (see the module docstring).

    Args:
        net: the network ``x (B, X) → y (B, Y)``; its current parameters are component 0.
        inner_lr, inner_steps: MAML's inner-loop SGD step size and number of steps.
        meta_lr: Adam learning rate of the outer (M-step) update, one optimizer per component.
        concentration: the CRP's α (0: never spawn, the single-initialisation MAML).
        noise_std: std of the Gaussian likelihood used in the E-step.
        first_order: drop second-order terms of the meta-gradient (first-order MAML).
        max_components: no new component beyond this many.
    """

    def __init__(self, net: nn.Module, *, inner_lr: float = 0.01, inner_steps: int = 1, meta_lr: float = 1e-3,
                 concentration: float = 1.0, noise_std: float = 1.0, first_order: bool = False,
                 max_components: int = 10):
        super().__init__()
        check_instance("net", net, nn.Module)
        self.inner_lr = check_number("inner_lr", inner_lr, min=0)
        self.inner_steps = check_int("inner_steps", inner_steps, min=0)
        self.meta_lr = check_number("meta_lr", meta_lr, min=0, min_open=True)
        self.concentration = check_number("concentration", concentration, min=0)
        self.noise_std = check_number("noise_std", noise_std, min=0, min_open=True)
        self.first_order = check_bool("first_order", first_order)
        self.max_components = check_int("max_components", max_components, min=1)
        self.template = copy.deepcopy(net).requires_grad_(False)
        self.components = nn.ModuleList([net])
        self.counts: list[float] = [0.0]
        self._updates = [self._update_for(net)]

    def _update_for(self, net: nn.Module) -> UpdateStep:
        return UpdateStep(net, build_optimizer(net, name="adam", lr=self.meta_lr), bias_update=False)

    def adapt(self, net: nn.Module, x_SX: torch.Tensor, y_SY: torch.Tensor, *, create_graph: bool) -> dict:
        """MAML's inner loop: `inner_steps` SGD steps on the support MSE from `net`'s parameters."""
        params = dict(net.named_parameters())
        for _ in range(self.inner_steps):
            loss = F.mse_loss(functional_call(net, params, (x_SX,)), y_SY)
            grads = torch.autograd.grad(loss, list(params.values()), create_graph=create_graph)
            params = {k: v - self.inner_lr * g for (k, v), g in zip(params.items(), grads)}
        return params

    def _log_lik(self, pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        s = self.noise_std
        return (-0.5 * ((y - pred) / s).pow(2) - math.log(s) - 0.5 * math.log(2 * math.pi)).sum()

    def prior(self, *, with_new: bool) -> torch.Tensor:
        """The CRP prior over the L components (and a new one when `with_new`)."""
        n = torch.tensor(self.counts, dtype=torch.float64)
        if n.sum() == 0:                         # the first task sits at component 0
            p = torch.zeros(len(n) + with_new, dtype=torch.float64)
            p[0] = 1.0
            return p
        if with_new:
            n = torch.cat([n, n.new_tensor([self.concentration])])
        return n / n.sum()

    def observe(self, x_support: torch.Tensor, y_support: torch.Tensor, x_query: torch.Tensor,
                y_query: torch.Tensor) -> dict:
        """E-step, maybe a new component, M-step for one task. Returns ``responsibilities`` (over the
        components after the step), ``candidate_responsibilities`` (over the old components and the
        candidate, before the decision), ``spawned`` and the weighted query ``loss``."""
        check_tensor("x_support", x_support, ndim=2, floating=True)
        check_tensor("y_support", y_support, shape=(len(x_support), None), floating=True)
        check_tensor("x_query", x_query, shape=(None, x_support.shape[1]), floating=True)
        check_tensor("y_query", y_query, shape=(len(x_query), y_support.shape[1]), floating=True)
        can_spawn = self.concentration > 0 and sum(self.counts) > 0 and len(self.components) < self.max_components
        nets = list(self.components)
        if can_spawn:
            nets.append(_reset(copy.deepcopy(self.template)).requires_grad_(True))
        create = not self.first_order
        losses, log_liks = [], []
        for net in nets:
            pred = functional_call(net, self.adapt(net, x_support, y_support, create_graph=create), (x_query,))
            losses.append(F.mse_loss(pred, y_query))
            log_liks.append(self._log_lik(pred.detach(), y_query).double())
        log_post = self.prior(with_new=can_spawn).log() + torch.stack(log_liks)
        gamma_cand = torch.softmax(log_post, 0)
        spawned = can_spawn and int(gamma_cand.argmax()) == len(nets) - 1
        if spawned:
            self.components.append(nets[-1])
            self.counts.append(0.0)
            self._updates.append(self._update_for(nets[-1]))
            gamma = gamma_cand
        else:
            gamma = torch.softmax(log_post[:len(self.components)], 0)
            losses = losses[:len(self.components)]
        loss = sum(float(g) * l for g, l in zip(gamma, losses))
        for update in self._updates:
            update.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        loss_value = float(loss.detach())
        for g, update in zip(gamma, self._updates):
            if float(g) > 0:
                update(loss_value=loss_value)
            else:
                update.optimizer.zero_grad(set_to_none=True)
        for i, g in enumerate(gamma):
            self.counts[i] += float(g)
        return {"responsibilities": gamma.float(), "candidate_responsibilities": gamma_cand.float(),
                "spawned": spawned, "loss": loss_value}

    def select(self, x_support: torch.Tensor, y_support: torch.Tensor) -> int:
        """The component with the largest posterior given the support set (prior × support likelihood
        after adaptation)."""
        log_liks = []
        for net in self.components:
            params = self.adapt(net, x_support, y_support, create_graph=False)
            with torch.no_grad():
                log_liks.append(self._log_lik(functional_call(net, params, (x_support,)), y_support).double())
        return int((self.prior(with_new=False).clamp_min(1e-300).log() + torch.stack(log_liks)).argmax())

    def predict(self, x_support: torch.Tensor, y_support: torch.Tensor, x_query: torch.Tensor,
                component: Optional[int] = None) -> torch.Tensor:
        """Predictions for the queries after adapting the selected (or the given) component."""
        k = self.select(x_support, y_support) if component is None else check_int(
            "component", component, min=0, max=len(self.components) - 1)
        net = self.components[k]
        params = self.adapt(net, x_support, y_support, create_graph=False)
        with torch.no_grad():
            return functional_call(net, params, (x_query,))
