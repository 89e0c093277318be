"""SEED: an ensemble of selectively trained experts with per-class Gaussians (METHODS.md C4).

Legend: B batch, N examples of one task, D input dim, S shared width, F expert hidden, Z expert
latent dim, K experts, L classes, C classes of one task.

Method (Rypeść, Cygert, Khan, Trzciński, Zieliński & Twardowski 2024, "Divide and not forget:
Ensemble of selectively trained experts in Continual Learning", ICLR; facts checked against the
official code, github.com/grypesc/SEED, ``src/approach/seed.py``): K experts (MLPs here, the
paper's are ResNet tails) share early layers. Each expert models every class it has seen as a
multivariate Gaussian ``N(μ_c, Σ_c)`` of its latent features. While there are fewer than K
experts, task t trains a new expert t (a temporary linear head, cross-entropy); the shared
layers learn with expert 0 on task 0 and are frozen afterwards. From task K on, the new
classes' Gaussians are fitted in every expert and the expert where they overlap least is chosen:
the largest mean of the C × C matrix ``KL(N_n ‖ N_o)`` over pairs of new classes (the diagonal
zeros included, as in the official code). Only that expert is fine-tuned, with
``(1 − α) · CE + α · MSE(z, z_old)`` (feature distillation to its copy before the task, α = 0.99);
the others stay frozen. After each task every existing expert fits the task's class Gaussians
(old classes keep their Gaussians). Prediction (class-incremental, no task id): each expert's
Bayes posterior over the classes it knows, ``softmax_c(log N(z_k; μ_kc, Σ_kc) / τ)`` (τ = 3),
summed over experts and divided by the number of experts that know each class; argmax.
"""
from __future__ import annotations

import copy
import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from moekit.optim import UpdateStep, build_optimizer
from moekit.validate import check_choice, check_int, check_number, check_tensor

__all__ = ["SEED", "fit_gaussian", "gaussian_kl", "gaussian_log_prob", "class_overlap"]


def fit_gaussian(z_NZ: torch.Tensor, *, covariance: str = "full",
                 eps: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """``(μ_Z, Σ_ZZ)`` of rows z (float64): the mean and the unbiased covariance plus ``eps · I``
    (``covariance="diag"`` keeps its diagonal only)."""
    check_choice("covariance", covariance, ("full", "diag"))
    eps = check_number("eps", eps, min=0, min_open=True)
    if z_NZ.dim() != 2 or z_NZ.shape[0] < 2:
        raise ValueError(f"z must have shape (N >= 2, Z), got {tuple(z_NZ.shape)}")
    z = z_NZ.double()
    mu_Z = z.mean(0)
    d_NZ = z - mu_Z
    cov_ZZ = d_NZ.T @ d_NZ / (z.shape[0] - 1)
    if covariance == "diag":
        cov_ZZ = torch.diag(cov_ZZ.diagonal())
    return mu_Z, cov_ZZ + eps * torch.eye(z.shape[1], dtype=z.dtype, device=z.device)


def gaussian_kl(mu0: torch.Tensor, cov0: torch.Tensor, mu1: torch.Tensor, cov1: torch.Tensor) -> torch.Tensor:
    """``KL(N(μ0, Σ0) ‖ N(μ1, Σ1)) = ½ [tr(Σ1⁻¹Σ0) + (μ1−μ0)ᵀΣ1⁻¹(μ1−μ0) − Z + ln|Σ1| − ln|Σ0|]``,
    batched over leading dims."""
    Z = mu0.shape[-1]
    L1 = torch.linalg.cholesky(cov1)
    L0 = torch.linalg.cholesky(cov0)
    # tr(Σ1⁻¹Σ0) = ‖L1⁻¹ L0‖_F²
    M = torch.linalg.solve_triangular(L1, L0, upper=False)
    diff = torch.linalg.solve_triangular(L1, (mu1 - mu0).unsqueeze(-1), upper=False).squeeze(-1)
    logdet1 = 2 * L1.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    logdet0 = 2 * L0.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    return 0.5 * (M.square().sum((-2, -1)) + diff.square().sum(-1) - Z + logdet1 - logdet0)


def gaussian_log_prob(z_BZ: torch.Tensor, mu_CZ: torch.Tensor, cov_CZZ: torch.Tensor) -> torch.Tensor:
    """(B, C) ``log N(z_b; μ_c, Σ_c)`` in float64."""
    z = z_BZ.double()
    L_CZZ = torch.linalg.cholesky(cov_CZZ)
    diff_CZB = (z[None] - mu_CZ[:, None]).transpose(1, 2)                 # (C, Z, B)
    sol_CZB = torch.linalg.solve_triangular(L_CZZ, diff_CZB, upper=False)
    logdet_C = 2 * L_CZZ.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    Z = z.shape[1]
    return (-0.5 * (sol_CZB.square().sum(1) + logdet_C[:, None] + Z * math.log(2 * math.pi))).T


def class_overlap(mu_CZ: torch.Tensor, cov_CZZ: torch.Tensor) -> torch.Tensor:
    """SEED's score of one expert for a new task: the mean of the (C, C) matrix
    ``KL(N_n ‖ N_o)`` over the task's class Gaussians (0 on the diagonal). Larger means the
    classes overlap less; SEED fine-tunes the expert with the largest score."""
    C = mu_CZ.shape[0]
    if C < 2:
        raise ValueError(f"a task needs at least 2 classes to measure their overlap, got {C}")
    kl_CC = gaussian_kl(mu_CZ[:, None], cov_CZZ[:, None], mu_CZ[None], cov_CZZ[None])
    return kl_CC.mean()


def _mlp(d_in: int, d_hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.ReLU(), nn.Linear(d_hidden, d_out))


class SEED(nn.Module):
    """K MLP experts ``S → F → Z`` on an optional shared layer ``D → S`` (ReLU), each holding a
    Gaussian per class it has seen (buffers ``means`` (K, L, Z), ``covs`` (K, L, Z, Z) and
    ``known`` (K, L), float64). Train task by task with `learn_task`; predict with `predict`.
    """

    def __init__(self, *, d_in: int, num_experts: int, d_hidden: int, d_latent: int, num_classes: int,
                 d_shared: Optional[int] = None, alpha: float = 0.99, tau: float = 3.0,
                 covariance: str = "full", eps: float = 1e-4):
        super().__init__()
        self.d_in = check_int("d_in", d_in, min=1)
        self.num_experts = check_int("num_experts", num_experts, min=1)
        check_int("d_hidden", d_hidden, min=1)
        self.d_latent = check_int("d_latent", d_latent, min=1)
        self.num_classes = check_int("num_classes", num_classes, min=2)
        self.alpha = check_number("alpha", alpha, min=0, max=1)
        self.tau = check_number("tau", tau, min=0, min_open=True)
        self.covariance = check_choice("covariance", covariance, ("full", "diag"))
        self.eps = check_number("eps", eps, min=0, min_open=True)
        if d_shared is None:
            self.shared, width = nn.Identity(), d_in
        else:
            d_shared = check_int("d_shared", d_shared, min=1)
            self.shared, width = nn.Sequential(nn.Linear(d_in, d_shared), nn.ReLU()), d_shared
        self.experts = nn.ModuleList(_mlp(width, d_hidden, d_latent) for _ in range(num_experts))
        K, L, Z = num_experts, num_classes, d_latent
        self.register_buffer("means", torch.zeros(K, L, Z, dtype=torch.float64))
        self.register_buffer("covs", torch.eye(Z, dtype=torch.float64).expand(K, L, Z, Z).clone())
        self.register_buffer("known", torch.zeros(K, L, dtype=torch.bool))
        self.num_tasks = 0
        self.history: list[dict] = []      # per task: expert trained, and for t ≥ K the selection statistics

    # -- features and Gaussians -------------------------------------------------------------

    def features(self, x_BD: torch.Tensor) -> torch.Tensor:
        """(B, K, Z) every expert's latent features."""
        h = self.shared(x_BD)
        return torch.stack([e(h) for e in self.experts], 1)

    @torch.no_grad()
    def _class_stats(self, expert: int, x_ND: torch.Tensor, y_N: torch.Tensor, classes: Sequence[int],
                     batch_size: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
        """(C, Z) means and (C, Z, Z) covariances of `classes` in expert `expert`'s latent space."""
        was = self.training
        self.eval()
        z = torch.cat([self.experts[expert](self.shared(xb)) for xb in x_ND.split(batch_size)])
        self.train(was)
        stats = [fit_gaussian(z[y_N == c], covariance=self.covariance, eps=self.eps) for c in classes]
        return torch.stack([m for m, _ in stats]), torch.stack([s for _, s in stats])

    @torch.no_grad()
    def log_likelihoods(self, x_BD: torch.Tensor) -> torch.Tensor:
        """(B, K, L) float64 ``log N(z_k(x); μ_kc, Σ_kc)``; −inf where expert k does not know c."""
        self._check_x(x_BD)
        was = self.training
        self.eval()
        z_BKZ = self.features(x_BD)
        self.train(was)
        out = torch.full((x_BD.shape[0], self.num_experts, self.num_classes), float("-inf"), dtype=torch.float64,
                         device=x_BD.device)
        for k in range(self.num_experts):
            cs = self.known[k].nonzero().squeeze(1)
            if len(cs):
                out[:, k, cs] = gaussian_log_prob(z_BKZ[:, k], self.means[k, cs], self.covs[k, cs])
        return out

    @torch.no_grad()
    def predict_proba(self, x_BD: torch.Tensor, classes: Optional[Sequence[int]] = None) -> torch.Tensor:
        """(B, L) the ensemble's class scores: each expert's ``softmax(log N / τ)`` over the known
        classes (or only `classes`, task-aware), summed over experts and divided by how many
        experts know each class; 0 for classes no expert knows."""
        ll_BKL = self.log_likelihoods(x_BD)
        if classes is not None:
            keep_L = torch.zeros(self.num_classes, dtype=torch.bool, device=ll_BKL.device)
            keep_L[list(classes)] = True
            ll_BKL = ll_BKL.masked_fill(~keep_L, float("-inf"))
        has_BK = torch.isfinite(ll_BKL).any(-1, keepdim=True)
        post_BKL = torch.where(has_BK, torch.softmax(ll_BKL / self.tau, -1).nan_to_num(0.0), 0.0)
        count_L = torch.isfinite(ll_BKL[0]).sum(0) if len(ll_BKL) else self.known.sum(0)
        return post_BKL.sum(1) / count_L.clamp_min(1)

    def predict(self, x_BD: torch.Tensor, classes: Optional[Sequence[int]] = None) -> torch.Tensor:
        """(B,) argmax of `predict_proba` over the known classes (or over `classes`)."""
        p_BL = self.predict_proba(x_BD, classes)
        known_L = self.known.any(0) if classes is None else torch.zeros_like(self.known[0]).index_fill(
            0, torch.tensor(list(classes), device=self.known.device), True)
        return p_BL.masked_fill(~known_L, -1.0).argmax(-1)

    # -- training -------------------------------------------------------------------------------

    def select_expert(self, x_ND: torch.Tensor, y_N: torch.Tensor, classes: Sequence[int]) -> tuple[int, dict]:
        """SEED's choice for a new task: ``(argmax_k overlap_k, stats)`` with stats holding
        ``overlap`` (K,) and each expert's new-class ``means`` (K, C, Z) and ``covs`` (K, C, Z, Z)."""
        stats = [self._class_stats(k, x_ND, y_N, classes) for k in range(self.num_experts)]
        means, covs = torch.stack([m for m, _ in stats]), torch.stack([s for _, s in stats])
        overlap = torch.stack([class_overlap(means[k], covs[k]) for k in range(self.num_experts)])
        return int(overlap.argmax()), {"overlap": overlap, "means": means, "covs": covs}

    def learn_task(self, x_ND: torch.Tensor, y_N: torch.Tensor, classes: Sequence[int], *, epochs: int,
                   batch_size: int, lr: float, seed: int = 0) -> int:
        """Learn one task (labels `y_N` among `classes`); return the expert trained on it."""
        self._check_x(x_ND, "x_train")
        check_tensor("y_train", y_N, shape=(x_ND.shape[0],))
        classes = [check_int("classes entry", c, min=0, max=self.num_classes - 1) for c in classes]
        if len(set(classes)) != len(classes) or len(classes) < 2:
            raise ValueError(f"classes must be at least 2 distinct class ids, got {classes}")
        if not torch.isin(y_N, torch.tensor(classes, device=y_N.device)).all():
            raise ValueError(f"y_train must hold only the task's classes {classes}, got {sorted(set(y_N.tolist()))}")
        if self.known[:, classes].any():
            raise ValueError(f"classes {classes} were already learned (SEED is class-incremental)")
        epochs = check_int("epochs", epochs, min=1)
        batch_size = check_int("batch_size", batch_size, min=1)
        t, K = self.num_tasks, self.num_experts
        record: dict = {"task": t}
        if t < K:
            k = t
            trainable = [self.experts[k]] + ([self.shared] if t == 0 else [])
            teacher = None
        else:
            k, stats = self.select_expert(x_ND, y_N, classes)
            record.update(stats)
            trainable = [self.experts[k]]
            teacher = copy.deepcopy(self.experts[k]).requires_grad_(False).eval()
        record["expert"] = k
        self._train_expert(k, trainable, teacher, x_ND, y_N, classes, epochs=epochs, batch_size=batch_size,
                           lr=lr, seed=seed)
        if t == 0:
            self.shared.requires_grad_(False)
        with torch.no_grad():
            for j in range(min(t + 1, K)):
                mu_CZ, cov_CZZ = self._class_stats(j, x_ND, y_N, classes)
                self.means[j, classes], self.covs[j, classes] = mu_CZ, cov_CZZ
                self.known[j, classes] = True
        self.history.append(record)
        self.num_tasks += 1
        return k

    def _train_expert(self, k, trainable, teacher, x_ND, y_N, classes, *, epochs, batch_size, lr, seed):
        gen = torch.Generator().manual_seed(seed)
        head = nn.Linear(self.d_latent, len(classes)).to(x_ND)
        target_of_L = torch.full((self.num_classes,), -1, dtype=torch.long, device=y_N.device)
        target_of_L[classes] = torch.arange(len(classes), device=y_N.device)
        trained = nn.ModuleList(trainable + [head])
        opt = build_optimizer(trained, name="adam", lr=lr)
        update = UpdateStep(trained, opt, lr=lr, total_steps=epochs * -(-len(y_N) // batch_size), schedule="constant")
        expert = self.experts[k]
        self.train()
        for _ in range(epochs):
            for idx in torch.randperm(len(y_N), generator=gen).split(batch_size):
                h = self.shared(x_ND[idx])
                z_BZ = expert(h)
                loss = F.cross_entropy(head(z_BZ), target_of_L[y_N[idx]])
                if teacher is not None:
                    with torch.no_grad():
                        z_old = teacher(h)
                    loss = (1 - self.alpha) * loss + self.alpha * F.mse_loss(z_BZ, z_old)
                update(loss)
        self.eval()

    def trainable_parameters_of_task(self, task: int) -> int:
        """Parameters task `task` trained (its expert; plus the shared layer at task 0)."""
        k = self.history[task]["expert"]
        n = sum(p.numel() for p in self.experts[k].parameters())
        return n + (sum(p.numel() for p in self.shared.parameters()) if task == 0 else 0)

    def _check_x(self, x, name="x"):
        check_tensor(name, x, shape=(None, self.d_in))
