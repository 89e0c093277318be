"""The one-dimensional MoE regression model of the gating-rate papers, and its estimator.

Legend: T samples, K experts (atoms).

``f(x) = Σ_i G_i(x) · h(x; a_i, b_i)``, ``x ∈ [−1, 1]``, with expert ``h = GELU(a x + b)`` (or
ReLU, or linear ``a x + b``) and gate ``G_i(x)``:

- ``"sigmoid"``: ``σ(β1_i x + β0_i)``, each gate on its own (Nguyen, Ho & Rinaldo 2024);
- ``"softmax"``: ``softmax_i(β1 x + β0)``, with the last atom's gate parameters fixed at 0
  (softmax gates are identifiable only up to a common translation; the papers fix one atom).

These gates are `moekit.routing.SigmoidRouter` (``renorm=False``, ``top_k = K``) and
`moekit.routing.TopKRouter` (``norm="raw"``, ``top_k = K``) on the input ``(x, 1)``; the
estimator computes them in closed form because the routers' top-k machinery costs 5–8× per
evaluation on 10⁵ samples and least squares evaluates the model hundreds of times
(tests/projects/gating_sample_efficiency checks the two agree).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

GATES = ("sigmoid", "softmax")
EXPERTS = ("gelu", "relu", "linear")


@dataclass
class Atoms:
    """K atoms: gate slope β1, gate intercept β0, expert slope a, expert intercept b, each (K,)."""

    beta1: torch.Tensor
    beta0: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor

    @property
    def k(self) -> int:
        return self.beta1.numel()

    def stack(self) -> torch.Tensor:
        """(K, 4) rows ``(β1, β0, a, b)``."""
        return torch.stack([self.beta1, self.beta0, self.a, self.b], 1)

    @staticmethod
    def from_rows(rows_K4: torch.Tensor) -> "Atoms":
        return Atoms(*rows_K4.unbind(1))


def gates(x_T: torch.Tensor, atoms: Atoms, gate: str) -> torch.Tensor:
    """(T, K) gate values."""
    logits_TK = x_T[:, None] * atoms.beta1 + atoms.beta0
    if gate == "sigmoid":
        return torch.sigmoid(logits_TK)
    if gate == "softmax":
        return torch.softmax(logits_TK, dim=-1)
    raise ValueError(f"gate must be one of {GATES}, got {gate!r}")


def expert_outputs(x_T: torch.Tensor, atoms: Atoms, expert: str) -> torch.Tensor:
    """(T, K) ``h(x; a_i, b_i)``."""
    pre_TK = x_T[:, None] * atoms.a + atoms.b
    if expert == "gelu":
        return torch.nn.functional.gelu(pre_TK)
    if expert == "relu":
        return torch.relu(pre_TK)
    if expert == "linear":
        return pre_TK
    raise ValueError(f"expert must be one of {EXPERTS}, got {expert!r}")


def regression(x_T: torch.Tensor, atoms: Atoms, gate: str, expert: str) -> torch.Tensor:
    """(T,) ``f(x) = Σ_i G_i(x) h(x; a_i, b_i)``."""
    return (gates(x_T, atoms, gate) * expert_outputs(x_T, atoms, expert)).sum(-1)


def true_atoms(gate: str, dtype=torch.float64) -> Atoms:
    """k* = 2 true atoms. Same experts for both gates; the softmax's second atom is the reference
    (gate 0); the sigmoid's gates are two opposite slopes."""
    beta1 = [3.0, 0.0] if gate == "softmax" else [3.0, -3.0]
    beta0 = [0.5, 0.0] if gate == "softmax" else [0.5, 0.0]
    return Atoms(*(torch.tensor(v, dtype=dtype) for v in (beta1, beta0, [4.0, -3.0], [1.0, -0.5])))


def sample(n: int, gate: str, expert: str, *, noise: float = 0.1, generator: torch.Generator):
    """``(x_T, y_T)``: x ~ U[−1, 1], ``y = f*(x) + N(0, noise²)``."""
    x = torch.rand(n, dtype=torch.float64, generator=generator) * 2 - 1
    y = regression(x, true_atoms(gate), gate, expert)
    return x, y + noise * torch.randn(n, dtype=torch.float64, generator=generator)


def initial_atoms(k: int, gate: str, *, scale: float, generator: torch.Generator) -> Atoms:
    """k atoms near the truth: each true atom once, then copies of random true atoms, all moved by
    N(0, scale²). For softmax the last atom keeps gate (0, 0) and starts at the true reference's expert."""
    true = true_atoms(gate).stack()
    k_true = true.shape[0]
    if gate == "softmax":
        free = true[:-1]
        extra = true[torch.randint(0, k_true, (k - k_true,), generator=generator)]
        rows = torch.cat([free, extra, true[-1:]])
    else:
        extra = true[torch.randint(0, k_true, (k - k_true,), generator=generator)]
        rows = torch.cat([true, extra])
    rows = rows + scale * torch.randn(rows.shape, dtype=rows.dtype, generator=generator)
    if gate == "softmax":
        rows[-1, :2] = 0.0
    return Atoms.from_rows(rows)


def fit_least_squares(x_T: torch.Tensor, y_T: torch.Tensor, k: int, gate: str, expert: str, *, restarts: int,
                      init_scale: float, generator: torch.Generator, max_iter: int = 400) -> Atoms:
    """The least-squares estimator over k atoms: L-BFGS (strong Wolfe) from `restarts` starts near
    the truth (`initial_atoms`); the start with the lowest training error is returned.

    L-BFGS needs a closure and full-batch line searches, so this loop does not use
    `moekit.optim.UpdateStep` (a first-order stochastic update); METHODS.md R5 asks for L-BFGS.
    """
    best, best_loss = None, float("inf")
    for _ in range(restarts):
        start = initial_atoms(k, gate, scale=init_scale, generator=generator).stack()
        if gate == "softmax":          # last atom's gate fixed at 0: optimise the rest
            free = torch.cat([start[:-1].reshape(-1), start[-1, 2:]]).clone().requires_grad_(True)

            def rows(p):
                return torch.cat([p[:-2].view(k - 1, 4), torch.cat([p.new_zeros(2), p[-2:]])[None]])
        else:
            free = start.reshape(-1).clone().requires_grad_(True)

            def rows(p):
                return p.view(k, 4)
        opt = torch.optim.LBFGS([free], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
                                tolerance_grad=1e-10, tolerance_change=1e-14)

        def closure():
            opt.zero_grad()
            loss = (regression(x_T, Atoms.from_rows(rows(free)), gate, expert) - y_T).square().mean()
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            loss = float((regression(x_T, Atoms.from_rows(rows(free)), gate, expert) - y_T).square().mean())
            if loss < best_loss and all(torch.isfinite(rows(free)).reshape(-1)):
                best, best_loss = Atoms.from_rows(rows(free).detach().clone()), loss
    return best


def voronoi_loss(fit: Atoms, true: Atoms, gate: str) -> float:
    """Voronoi loss between the fitted and true mixing measures (one exponent per cell).

    Each fitted atom joins the cell ``V_j`` of its nearest true atom; ``r_j = 1`` for a cell
    holding one fitted atom (exact-fitted) and 2 for a cell holding several (over-fitted).

    - softmax (Nguyen et al.'s form; gates live on a simplex, so a cell's gate *mass*
      ``exp(β0)`` is what is identified): atoms ``θ = (β1, a, b)``,
      ``D = Σ_j |Σ_{i∈V_j} exp(β0_i) − exp(β0*_j)| + Σ_j Σ_{i∈V_j} exp(β0_i) ‖θ_i − θ*_j‖^{r_j}``;
    - sigmoid (each gate is its own function, no shared mass): atoms ``θ = (β1, β0, a, b)``,
      ``D = Σ_j Σ_{i∈V_j} ‖θ_i − θ*_j‖^{r_j}``.
    """
    if gate == "softmax":
        theta_f = torch.stack([fit.beta1, fit.a, fit.b], 1)
        theta_t = torch.stack([true.beta1, true.a, true.b], 1)
    else:
        theta_f, theta_t = fit.stack(), true.stack()
    dist_KJ = torch.cdist(theta_f, theta_t)
    cell = dist_KJ.argmin(1)
    total = 0.0
    for j in range(true.k):
        members = (cell == j).nonzero().flatten()
        r = 1 if members.numel() == 1 else 2
        if gate == "softmax":
            w_f, w_t = torch.exp(fit.beta0), torch.exp(true.beta0)
            total += abs(float(w_f[members].sum()) - float(w_t[j]))
            total += float((w_f[members] * dist_KJ[members, j] ** r).sum())
        else:
            total += float((dist_KJ[members, j] ** r).sum())
    return total


def expert_error(fit: Atoms, true: Atoms) -> float:
    """``max_j min_i ‖(a_i, b_i) − (a*_j, b*_j)‖``: how far the worst-recovered true expert is from its best fit."""
    eta_f = torch.stack([fit.a, fit.b], 1)
    eta_t = torch.stack([true.a, true.b], 1)
    return float(torch.cdist(eta_t, eta_f).min(1).values.max())


def function_error(fit: Atoms, true: Atoms, gate: str, expert: str, grid: int = 4001) -> float:
    """L2([−1, 1], uniform) distance ``‖f̂ − f*‖`` on a grid."""
    x = torch.linspace(-1, 1, grid, dtype=torch.float64)
    return float((regression(x, fit, gate, expert) - regression(x, true, gate, expert)).square().mean().sqrt())
