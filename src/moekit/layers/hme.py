"""Hierarchical mixture of experts trained by EM or by gradient (Jordan & Jacobs 1994,
"Hierarchical Mixtures of Experts and the EM Algorithm") — METHODS.md F2, R3.

Legend: N samples, P input dim, O output dim, I top-level branches, J branches per node.

A two-level tree. Top gate ``g_i = softmax_i(v_iᵀx + a_i)``, nested gates
``g_{j|i} = softmax_j(v_ijᵀx + a_ij)``, and Gaussian linear leaves (GLIMs)
``P_ij(y | x) = N(y; U_ij x + c_ij, σ²_ij I)``, so

``P(y | x) = Σ_i g_i Σ_j g_{j|i} P_ij(y | x)``  and the prediction is ``Σ_i g_i Σ_j g_{j|i} μ_ij(x)``.

Training:

- gradient: minimise `nll` (``−mean log P(y|x)``) with any optimiser (the paper's online variant);
- EM (`fit_em`): E-step posteriors ``h_ij = g_i g_{j|i} P_ij / Σ g g P``; M-step — every leaf
  solves a weighted least-squares problem with weights ``h_ij`` (closed form) and its variance
  update; the top gate is a multinomial logistic regression fitted by IRLS (Newton) to soft
  targets ``h_i``; nested gate i fits targets ``h_{j|i}`` with sample weights ``h_i``. IRLS steps
  are accepted only when they raise the M-step objective, so every EM iteration is a
  (generalised) EM step and the log-likelihood never decreases.
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch
from torch import nn

from moekit.layers.protocol import MoELayer, mixture_stats
from moekit.validate import check_int, check_number

__all__ = ["HierarchicalMoE", "irls_multinomial"]


def _augment(x_NP: torch.Tensor) -> torch.Tensor:
    """(N, P + 1): x with a column of ones, so biases are fitted with the weights."""
    return torch.cat([x_NP, torch.ones_like(x_NP[:, :1])], dim=-1)


def _gate_objective(W_KQ, X_NQ, C_NK) -> torch.Tensor:
    return (C_NK * torch.log_softmax(X_NQ @ W_KQ.t(), dim=-1)).sum()


def irls_multinomial(W_KQ: torch.Tensor, X_NQ: torch.Tensor, C_NK: torch.Tensor, *, steps: int = 5,
                     damping: float = 1e-6) -> torch.Tensor:
    """Newton (IRLS) ascent on ``Q(W) = Σ_n Σ_k C_nk log softmax(W x_n)_k``.

    ``C_NK`` are non-negative soft counts (targets times sample weights). Each step solves the
    damped Newton system, then halves the step until Q does not decrease (the damping only
    regularises the solve: Q itself is unpenalised, so the result never lowers Q).
    """
    K, Q = W_KQ.shape
    W = W_KQ.clone()
    c_N = C_NK.sum(-1)
    q_old = _gate_objective(W, X_NQ, C_NK)
    for _ in range(steps):
        p_NK = torch.softmax(X_NQ @ W.t(), dim=-1)
        grad_KQ = (C_NK - c_N.unsqueeze(-1) * p_NK).t() @ X_NQ
        # Negative Hessian: Σ_n c_n (diag p_n − p_n p_nᵀ) ⊗ x_n x_nᵀ, laid out as (K·Q, K·Q).
        A_NKK = torch.diag_embed(p_NK) - p_NK.unsqueeze(-1) * p_NK.unsqueeze(-2)
        H = torch.einsum("n,nkl,na,nb->kalb", c_N, A_NKK, X_NQ, X_NQ).reshape(K * Q, K * Q)
        scale = H.diagonal().abs().max().clamp_min(1e-12)
        H = H + damping * scale * torch.eye(K * Q, dtype=H.dtype, device=H.device)
        step = torch.linalg.solve(H, grad_KQ.reshape(-1)).reshape(K, Q)
        t, improved = 1.0, False
        for _ in range(30):
            q_new = _gate_objective(W + t * step, X_NQ, C_NK)
            if q_new >= q_old:
                improved = True
                break
            t *= 0.5
        if not improved:
            break
        W, gain = W + t * step, q_new - q_old
        q_old = q_new
        if gain <= 1e-12 * max(1.0, abs(float(q_old))):
            break
    return W


class HierarchicalMoE(MoELayer):
    """Depth-2 HME with Gaussian linear leaves.

    Args:
        d_model: P, input features.
        d_out: O, regression targets.
        branching: ``(I, J)``: I top branches, J leaves under each.
        min_var: floor on every leaf variance (keeps the likelihood bounded).
    """

    def __init__(self, *, d_model: int, d_out: int = 1, branching=(2, 2), min_var: float = 1e-6):
        super().__init__()
        d_in = check_int("d_model", d_model, min=1)
        check_int("d_out", d_out, min=1)
        if not isinstance(branching, (tuple, list)) or len(branching) != 2:
            raise TypeError(f"branching must be a pair of positive ints (I, J), got {branching!r}")
        I, J = (check_int(f"branching[{i}]", b, min=1) for i, b in enumerate(branching))
        min_var = check_number("min_var", min_var, min=0, min_open=True)
        self.d_model = d_in
        self.d_in, self.d_out, self.branching, self.min_var = d_in, d_out, (I, J), float(min_var)
        # Gate weights hold the bias in their last column (the IRLS solves for both together).
        self.top_gate = nn.Parameter(torch.empty(I, d_in + 1))
        self.nested_gates = nn.Parameter(torch.empty(I, J, d_in + 1))
        self.experts = nn.Parameter(torch.empty(I, J, d_out, d_in + 1))
        self.log_var = nn.Parameter(torch.zeros(I, J))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: Optional[torch.Generator] = None) -> None:
        # Small random gates (the paper's advice) and random leaves to break the symmetry.
        for p, std in ((self.top_gate, 0.1), (self.nested_gates, 0.1), (self.experts, 1.0 / math.sqrt(self.d_in + 1))):
            p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float64).to(p) * std)
        self.log_var.zero_()

    def _check(self, x_NP: torch.Tensor, y_NO=None) -> None:
        if x_NP.dim() != 2 or x_NP.shape[1] != self.d_in or not x_NP.is_floating_point():
            raise ValueError(f"x must be a float tensor of shape (N, {self.d_in}), "
                             f"got {x_NP.dtype} {tuple(x_NP.shape)}")
        if y_NO is not None and (y_NO.shape != (x_NP.shape[0], self.d_out) or not y_NO.is_floating_point()):
            raise ValueError(f"y must be a float tensor of shape ({x_NP.shape[0]}, {self.d_out}), "
                             f"got {y_NO.dtype} {tuple(y_NO.shape)}")

    # -- the model ----------------------------------------------------------------------------
    def log_gates(self, x_NP: torch.Tensor):
        """``(log g_i (N, I), log g_{j|i} (N, I, J))``."""
        X = _augment(x_NP)
        log_top = torch.log_softmax(X @ self.top_gate.t(), dim=-1)
        log_nested = torch.log_softmax(torch.einsum("nq,ijq->nij", X, self.nested_gates), dim=-1)
        return log_top, log_nested

    def leaf_means(self, x_NP: torch.Tensor) -> torch.Tensor:
        """(N, I, J, O) ``U_ij x + c_ij``."""
        return torch.einsum("nq,ijoq->nijo", _augment(x_NP), self.experts)

    def variances(self) -> torch.Tensor:
        return self.log_var.exp().clamp_min(self.min_var)

    def forward(self, x_NP: torch.Tensor) -> torch.Tensor:
        """(N, O) the mixture mean ``Σ_i g_i Σ_j g_{j|i} μ_ij(x)``."""
        self._check(x_NP)
        log_top, log_nested = self.log_gates(x_NP)
        w_NIJ = (log_top.unsqueeze(-1) + log_nested).exp()
        self.last_stats = mixture_stats(w_NIJ.flatten(1))         # over the I·J leaves
        self.aux_loss = torch.zeros((), device=x_NP.device)
        return torch.einsum("nij,nijo->no", w_NIJ, self.leaf_means(x_NP))

    def log_joint(self, x_NP: torch.Tensor, y_NO: torch.Tensor) -> torch.Tensor:
        """(N, I, J) ``log g_i + log g_{j|i} + log N(y; μ_ij, σ²_ij I)``."""
        log_top, log_nested = self.log_gates(x_NP)
        var_IJ = self.variances()
        sq_NIJ = (y_NO[:, None, None, :] - self.leaf_means(x_NP)).square().sum(-1)
        log_p = -0.5 * (sq_NIJ / var_IJ + self.d_out * torch.log(2 * math.pi * var_IJ))
        return log_top.unsqueeze(-1) + log_nested + log_p

    def log_likelihood(self, x_NP: torch.Tensor, y_NO: torch.Tensor) -> torch.Tensor:
        """Mean ``log P(y | x)`` over samples."""
        self._check(x_NP, y_NO)
        return torch.logsumexp(self.log_joint(x_NP, y_NO).flatten(1), dim=-1).mean()

    def nll(self, x_NP: torch.Tensor, y_NO: torch.Tensor) -> torch.Tensor:
        """``−mean log P(y | x)``: the objective of gradient training."""
        return -self.log_likelihood(x_NP, y_NO)

    def responsibilities(self, x_NP: torch.Tensor, y_NO: torch.Tensor) -> torch.Tensor:
        """(N, I, J) posterior ``h_ij`` of each leaf; sums to 1 per sample."""
        self._check(x_NP, y_NO)
        lj = self.log_joint(x_NP, y_NO)
        return torch.softmax(lj.flatten(1), dim=-1).view_as(lj)

    def leaf_assignment(self, x_NP: torch.Tensor) -> torch.Tensor:
        """(N,) the leaf ``i·J + j`` with the largest gate product (the region x falls in)."""
        log_top, log_nested = self.log_gates(x_NP)
        return (log_top.unsqueeze(-1) + log_nested).flatten(1).argmax(-1)

    # -- EM -------------------------------------------------------------------------------------
    @torch.no_grad()
    def em_step(self, x_NP: torch.Tensor, y_NO: torch.Tensor, *, irls_steps: int = 5) -> None:
        """One EM iteration (computed in float64, written back in the parameters' dtype)."""
        self._check(x_NP, y_NO)
        I, J = self.branching
        x, y = x_NP.double(), y_NO.double()
        dtype = self.top_gate.dtype
        h = self.responsibilities(x.to(dtype), y.to(dtype)).double()                 # (N, I, J)
        X = _augment(x)
        # Leaves: weighted least squares, then the weighted residual variance.
        experts = self.experts.detach().double().clone()
        var = self.variances().detach().double().clone()
        for i in range(I):
            for j in range(J):
                w_N = h[:, i, j]
                if float(w_N.sum()) <= 1e-12:
                    continue                                 # an unused leaf keeps its parameters
                sw = w_N.sqrt().unsqueeze(-1)
                beta_QO = torch.linalg.lstsq(sw * X, sw * y).solution
                experts[i, j] = beta_QO.t()
                resid = (y - X @ beta_QO).square().sum(-1)
                var[i, j] = ((w_N * resid).sum() / (self.d_out * w_N.sum())).clamp_min(self.min_var)
        top = irls_multinomial(self.top_gate.detach().double(), X, h.sum(-1), steps=irls_steps)
        nested = torch.stack([irls_multinomial(self.nested_gates[i].detach().double(), X, h[:, i], steps=irls_steps)
                              for i in range(I)])
        self.experts.copy_(experts.to(dtype))
        self.log_var.copy_(var.log().to(dtype))
        self.top_gate.copy_(top.to(dtype))
        self.nested_gates.copy_(nested.to(dtype))

    @torch.no_grad()
    def fit_em(self, x_NP: torch.Tensor, y_NO: torch.Tensor, *, iters: int = 50, irls_steps: int = 5,
               tol: float = 1e-9, n_init: int = 1, init_iters: int = 10,
               generator: Optional[torch.Generator] = None) -> List[float]:
        """Run EM until the mean log-likelihood gains less than `tol`; returns its history
        (the value before the first step, then after every step).

        EM finds a local maximum. With ``n_init > 1`` the model first tries ``n_init`` random
        initialisations (the current parameters count as the first), runs ``init_iters`` EM
        steps from each and continues from the one with the highest likelihood; the history is
        then that start's whole trajectory (its screening steps first, so it still begins at its
        initial parameters).
        """
        self._check(x_NP, y_NO)
        if x_NP.shape[0] == 0:
            raise ValueError("fit_em needs at least one example, got x of shape "
                             f"{tuple(x_NP.shape)}")
        if not (torch.isfinite(x_NP).all() and torch.isfinite(y_NO).all()):
            raise ValueError("fit_em needs finite x and y (found NaN or inf)")
        iters = check_int("iters", iters, min=0)
        check_int("irls_steps", irls_steps, min=1)
        check_number("tol", tol, min=0)
        n_init = check_int("n_init", n_init, min=1)
        check_int("init_iters", init_iters, min=0)
        history = None
        if n_init > 1:
            best_state = None
            for k in range(n_init):
                if k:
                    self.reset_parameters(generator=generator)
                screen = [float(self.log_likelihood(x_NP, y_NO))]
                for _ in range(init_iters):
                    self.em_step(x_NP, y_NO, irls_steps=irls_steps)
                    screen.append(float(self.log_likelihood(x_NP, y_NO)))
                if history is None or screen[-1] > history[-1]:
                    history, best_state = screen, {n: t.clone() for n, t in self.state_dict().items()}
            self.load_state_dict(best_state)
        else:
            history = [float(self.log_likelihood(x_NP, y_NO))]
        for _ in range(iters):
            self.em_step(x_NP, y_NO, irls_steps=irls_steps)
            history.append(float(self.log_likelihood(x_NP, y_NO)))
            if abs(history[-1] - history[-2]) < tol:
                break
        return history

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, d_out={self.d_out}, branching={self.branching}"
