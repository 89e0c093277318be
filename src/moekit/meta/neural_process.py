"""Neural processes with one latent variable (the reference) and with K expert latents (MoE-NPs).

Legend: B tasks in a batch, C context points, T target points, X input dim, Y output dim,
Z latent dim, K expert latents, H hidden width, S latent samples.

Latent neural process (Garnelo et al. 2018, "Neural Processes", ICML workshop): a set encoder
maps a context set to a Gaussian ``q(z | C)`` over one global latent; a decoder maps ``(x, z)``
to a Gaussian over y. Training maximises the ELBO of the targets with the context posterior as
the conditional prior (``q(z | C ∪ T)`` as the variational posterior)::

    ELBO = E_{q(z|C∪T)} Σ_t log p(y_t | x_t, z) - KL(q(z | C ∪ T) ‖ q(z | C)).

MoE-NPs (Wang & van Hoof 2022, "Learning Expressive Meta-Representations with Mixture of Expert
Neural Processes", NeurIPS; METHODS.md M4): K expert latents ``z_1..z_K``, each a Gaussian
inferred from the context set, and per target point a categorical assignment ``e_t`` that picks
the expert whose latent explains it. The assignment network gives the prior
``p(e_t | x_t, C)``; a posterior network ``q(e_t | x_t, y_t, C)`` reads the label too. With
``q(z, e) = Π_k q(z_k | C ∪ T) Π_t q(e_t | x_t, y_t, C)`` the ELBO is::

    ELBO = E_{q(z)} Σ_t Σ_k q(e_t = k) log p(y_t | x_t, z_k)
           - Σ_t KL(q(e_t) ‖ p(e_t | x_t, C)) - Σ_k KL(q(z_k | C ∪ T) ‖ q(z_k | C)),

and the predictive distribution is the mixture ``Σ_k p(e = k | x, C) N(y; μ(x, z_k), σ(x, z_k)²)``:
multi-modal where one NP's Gaussian is not. Exact encoder/decoder widths, the per-point (not
per-task) assignment and the std floors are this module's choices [R/D]. With K = 1 the
assignment is the constant 1, its KL is 0, and the model is the latent NP (tested).

`log_likelihood` estimates ``log p(y_T | x_T, C)`` by importance sampling with ``q(z | C ∪ T)``
as the proposal and the assignment summed out exactly; for any z samples it is at least the
ELBO computed on the same samples (Jensen twice), which the tests check.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from moekit.optim import UpdateStep, build_optimizer
from moekit.validate import check_int, check_number, check_tensor

__all__ = ["LatentNP", "MoENP", "gaussian_kl", "train_neural_process"]

_LOG_2PI = math.log(2 * math.pi)


def gaussian_kl(loc_q: torch.Tensor, scale_q: torch.Tensor, loc_p: torch.Tensor, scale_p: torch.Tensor) -> torch.Tensor:
    """Elementwise ``KL(N(loc_q, scale_q²) ‖ N(loc_p, scale_p²))`` (closed form; sum the dims yourself)."""
    var_ratio = (scale_q / scale_p).pow(2)
    return 0.5 * (var_ratio + ((loc_q - loc_p) / scale_p).pow(2) - 1 - var_ratio.log())


def _normal_log_prob(y: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return -0.5 * (((y - loc) / scale).pow(2) + _LOG_2PI) - scale.log()


def _mlp(d_in: int, d_hidden: int, d_out: int, layers: int = 2) -> nn.Sequential:
    mods, d = [], d_in
    for _ in range(layers):
        mods += [nn.Linear(d, d_hidden), nn.ReLU()]
        d = d_hidden
    return nn.Sequential(*mods, nn.Linear(d, d_out))


def _check_sets(x_ctx, y_ctx, x_tgt, y_tgt=None, *, x_dim: int, y_dim: int) -> None:
    check_tensor("x_context", x_ctx, shape=(None, None, x_dim), floating=True)
    B, C = x_ctx.shape[:2]
    check_tensor("y_context", y_ctx, shape=(B, C, y_dim), floating=True)
    check_tensor("x_target", x_tgt, shape=(B, None, x_dim), floating=True)
    if y_tgt is not None:
        check_tensor("y_target", y_tgt, shape=(B, x_tgt.shape[1], y_dim), floating=True)
    if C == 0:
        raise ValueError(f"the context set must hold at least one point, got x_context of shape {tuple(x_ctx.shape)}")


class _NPBase(nn.Module):
    """Set encoder ``(x_i, y_i) → h_i``, mean-pooled to r, a head to K Gaussians over z (B, K, Z),
    and a decoder ``(x, z) → N(μ, σ²)`` over y. Subclasses define ``assignment_logits(x_BTX, r_BH,
    y_BTY=None)``: the (prior, posterior) log-probabilities over the K latents per target point,
    (B, T, K) each (posterior None without y); `LatentNP` is K = 1 without assignment networks."""

    def __init__(self, *, x_dim: int, y_dim: int, z_dim: int, d_hidden: int, num_latents: int,
                 min_std: float):
        super().__init__()
        for name, v in (("x_dim", x_dim), ("y_dim", y_dim), ("z_dim", z_dim), ("d_hidden", d_hidden)):
            check_int(name, v, min=1)
        self.min_std = check_number("min_std", min_std, min=0, min_open=True)
        self.x_dim, self.y_dim, self.z_dim, self.num_latents = x_dim, y_dim, z_dim, num_latents
        self.point_encoder = _mlp(x_dim + y_dim, d_hidden, d_hidden)
        self.latent_head = nn.Linear(d_hidden, num_latents * 2 * z_dim)
        self.decoder = _mlp(x_dim + z_dim, d_hidden, 2 * y_dim, layers=3)

    def pool(self, x_BNX: torch.Tensor, y_BNY: torch.Tensor) -> torch.Tensor:
        """The permutation-invariant set representation r (B, H): the mean of per-point features."""
        return self.point_encoder(torch.cat([x_BNX, y_BNY], -1)).mean(1)

    def latents(self, r_BH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gaussian over the K latents: loc, scale (B, K, Z); scale in (0.1, 1) as in Le et al. 2018."""
        out = self.latent_head(r_BH).view(len(r_BH), self.num_latents, 2, self.z_dim)
        return out[:, :, 0], 0.1 + 0.9 * torch.sigmoid(out[:, :, 1])

    def decode(self, x_BTX: torch.Tensor, z_SBKZ: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """y's loc and scale (S, B, K, T, Y) for every sample and expert latent."""
        S, B, K, Z = z_SBKZ.shape
        T = x_BTX.shape[1]
        inp = torch.cat([x_BTX.expand(S, K, B, T, self.x_dim).transpose(1, 2),
                         z_SBKZ.unsqueeze(3).expand(S, B, K, T, Z)], -1)
        out = self.decoder(inp)
        loc, raw = out[..., :self.y_dim], out[..., self.y_dim:]
        return loc, self.min_std + F.softplus(raw)

    def _sample(self, loc_BKZ, scale_BKZ, samples: int, generator: Optional[torch.Generator]) -> torch.Tensor:
        eps = torch.randn((samples,) + tuple(loc_BKZ.shape), generator=generator, device=loc_BKZ.device,
                          dtype=loc_BKZ.dtype)
        return loc_BKZ + scale_BKZ * eps                                   # (S, B, K, Z)

    def _terms(self, x_ctx, y_ctx, x_tgt, y_tgt, samples, generator):
        _check_sets(x_ctx, y_ctx, x_tgt, y_tgt, x_dim=self.x_dim, y_dim=self.y_dim)
        check_int("samples", samples, min=1)
        r_ctx = self.pool(x_ctx, y_ctx)
        p_loc, p_scale = self.latents(r_ctx)                                               # conditional prior
        q_loc, q_scale = self.latents(self.pool(torch.cat([x_ctx, x_tgt], 1), torch.cat([y_ctx, y_tgt], 1)))
        z = self._sample(q_loc, q_scale, samples, generator)
        loc, scale = self.decode(x_tgt, z)
        loglik_SBKT = _normal_log_prob(y_tgt.unsqueeze(1), loc, scale).sum(-1)
        log_prior_BTK, log_post_BTK = self.assignment_logits(x_tgt, r_ctx, y_tgt)
        return dict(z=z, p=(p_loc, p_scale), q=(q_loc, q_scale), loglik_SBKT=loglik_SBKT,
                    log_prior_BTK=log_prior_BTK, log_post_BTK=log_post_BTK)

    def elbo(self, x_context: torch.Tensor, y_context: torch.Tensor, x_target: torch.Tensor, y_target: torch.Tensor,
             *, samples: int = 1, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """The ELBO of each task's targets (B,), summed over target points, z averaged over `samples`.

        Shapes: x_context (B, C, X), y_context (B, C, Y), x_target (B, T, X), y_target (B, T, Y).
        NP practice puts the context points among the targets; the caller decides.
        """
        t = self._terms(x_context, y_context, x_target, y_target, samples, generator)
        post_BTK = t["log_post_BTK"].exp()
        expected_ll = (post_BTK.transpose(1, 2).unsqueeze(0) * t["loglik_SBKT"]).sum((2, 3)).mean(0)   # (B,)
        kl_e = (post_BTK * (t["log_post_BTK"] - t["log_prior_BTK"])).sum((1, 2))
        kl_z = gaussian_kl(*t["q"], *t["p"]).sum((1, 2))
        return expected_ll - kl_e - kl_z

    def log_likelihood(self, x_context: torch.Tensor, y_context: torch.Tensor, x_target: torch.Tensor,
                       y_target: torch.Tensor, *, samples: int = 32,
                       generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Importance-sampled ``log p(y_T | x_T, C)`` per task (B,): proposal ``q(z | C ∪ T)``, prior
        ``q(z | C)``, the assignment summed out exactly (``log Σ_k p(e = k | x_t, C) p(y_t | x_t, z_k)``)."""
        t = self._terms(x_context, y_context, x_target, y_target, samples, generator)
        z = t["z"]
        log_py_SB = torch.logsumexp(t["log_prior_BTK"].transpose(1, 2).unsqueeze(0) + t["loglik_SBKT"], 2).sum(-1)
        log_pz = _normal_log_prob(z, *t["p"]).sum((2, 3))
        log_qz = _normal_log_prob(z, *t["q"]).sum((2, 3))
        return torch.logsumexp(log_py_SB + log_pz - log_qz, 0) - math.log(samples)

    @torch.no_grad()
    def predict(self, x_context: torch.Tensor, y_context: torch.Tensor, x_target: torch.Tensor, *,
                samples: int = 16, generator: Optional[torch.Generator] = None):
        """The predictive mixture for the targets from the context alone: ``weights`` (B, T, K) =
        ``p(e | x, C)``, and ``loc``, ``scale`` (S, B, K, T, Y) with z drawn from ``q(z | C)``;
        ``mean`` (B, T, Y) is the mixture's mean averaged over the S samples."""
        _check_sets(x_context, y_context, x_target, x_dim=self.x_dim, y_dim=self.y_dim)
        r_ctx = self.pool(x_context, y_context)
        z = self._sample(*self.latents(r_ctx), samples, generator)
        loc, scale = self.decode(x_target, z)
        log_prior_BTK, _ = self.assignment_logits(x_target, r_ctx)
        weights = log_prior_BTK.exp()
        mean = (weights.transpose(1, 2).unsqueeze(-1).unsqueeze(0) * loc).sum(2).mean(0)
        return {"weights": weights, "loc": loc, "scale": scale, "mean": mean}


class LatentNP(_NPBase):
    """The latent-variable neural process (Garnelo et al. 2018): one global Gaussian latent z.

    Args:
        x_dim, y_dim: input and output sizes; z_dim: latent size; d_hidden: width H of every MLP;
        min_std: floor of the predictive standard deviation (``σ = min_std + softplus``).
    """

    def __init__(self, *, x_dim: int = 1, y_dim: int = 1, z_dim: int = 16, d_hidden: int = 64, min_std: float = 0.01):
        super().__init__(x_dim=x_dim, y_dim=y_dim, z_dim=z_dim, d_hidden=d_hidden, num_latents=1, min_std=min_std)

    def assignment_logits(self, x_BTX, r_BH, y_BTY=None):
        zeros = x_BTX.new_zeros(x_BTX.shape[0], x_BTX.shape[1], 1)                          # log 1: one latent
        return zeros, (zeros if y_BTY is not None else None)


class MoENP(_NPBase):
    """Mixture-of-Expert neural process (Wang & van Hoof 2022): K expert latents and a per-point
    assignment network (see the module docstring for the ELBO and the predictive mixture).

    Args:
        num_experts: K expert latents (K = 1 is `LatentNP`, with the same parameter names for the
            shared encoder / decoder, so ``state_dict``s transfer).
        others: as `LatentNP`. The assignment prior reads ``(x_t, r_C)`` and the assignment
        posterior ``(x_t, y_t, r_C)``, r_C being the pooled context representation.
    """

    def __init__(self, *, x_dim: int = 1, y_dim: int = 1, z_dim: int = 16, d_hidden: int = 64, num_experts: int = 3,
                 min_std: float = 0.01):
        check_int("num_experts", num_experts, min=1)
        super().__init__(x_dim=x_dim, y_dim=y_dim, z_dim=z_dim, d_hidden=d_hidden, num_latents=num_experts,
                         min_std=min_std)
        self.num_experts = num_experts
        self.assign_prior = _mlp(x_dim + d_hidden, d_hidden, num_experts, layers=1)
        self.assign_post = _mlp(x_dim + y_dim + d_hidden, d_hidden, num_experts, layers=1)

    def assignment_logits(self, x_BTX, r_BH, y_BTY=None):
        r_BTH = r_BH.unsqueeze(1).expand(-1, x_BTX.shape[1], -1)
        prior = F.log_softmax(self.assign_prior(torch.cat([x_BTX, r_BTH], -1)), -1)
        if y_BTY is None:
            return prior, None
        return prior, F.log_softmax(self.assign_post(torch.cat([x_BTX, y_BTY, r_BTH], -1)), -1)


def train_neural_process(model: _NPBase, sample_batch: Callable[[int], tuple], *, steps: int, lr: float = 1e-3,
                         samples: int = 1, grad_clip: float = 1.0) -> list[float]:
    """Maximise the ELBO per target point over `steps` batches; returns the per-step losses (-ELBO / T).

    ``sample_batch(step) -> (x_context, y_context, x_target, y_target)`` gives each step's tasks.
    Adam (`moekit.optim.build_optimizer`) with a cosine decay of `lr` to 0 (`moekit.optim.UpdateStep`).
    """
    if not isinstance(model, _NPBase):
        raise TypeError(f"model must be a LatentNP or MoENP, got {type(model).__name__}")
    check_int("steps", steps, min=1)
    lr = check_number("lr", lr, min=0, min_open=True)
    update = UpdateStep(model, build_optimizer(model, name="adam", lr=lr), lr=lr, total_steps=steps,
                        schedule="cosine", min_lr_ratio=0.0, grad_clip=grad_clip)
    model.train()
    losses = []
    for step in range(steps):
        x_ctx, y_ctx, x_tgt, y_tgt = sample_batch(step)
        loss = -model.elbo(x_ctx, y_ctx, x_tgt, y_tgt, samples=samples).mean() / x_tgt.shape[1]
        losses.append(update(loss)["loss"])
    return losses
