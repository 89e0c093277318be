"""Sparse upcycling: dense FFNs → MoE layers initialised from the dense weights — METHODS.md T6.

Legend: D model dim, F dense hidden dim, E experts, K experts per token, m granularity.

Komatsuzaki et al. (2023), "Sparse Upcycling": every expert is a copy of the dense FFN f and
a new router is added. With combine weights that sum to 1 (``norm="renorm"``) and no token
dropped, ``Σ_k w_k f(x) = f(x)`` for *any* router: the upcycled model computes exactly what the
dense one did, and training starts from the dense model's loss.

Options:

- ``noise``: add ``noise · std(W) · N(0, 1)`` to each expert's weights so the copies differ
  from the first step (breaks the exact identity by O(noise)).
- ``reinit_fraction`` r (Drop-Upcycling, Nakamura et al. 2025): in each expert re-draw a
  random r-fraction of the hidden units — their rows of the input projection(s) and columns
  of the output projection — from ``N(mean, std)`` of the dense matrix, which diversifies the
  experts while keeping most of the knowledge.
- ``granularity`` m (fine-grained upcycling; DeepSeekMoE's segmentation, He et al. 2024
  "Upcycling LLMs into MoE"): split the hidden dimension into m slices,
  ``f(x) = Σ_j f_j(x)`` with ``f_j(x) = W_out[:, S_j] act(W_in[S_j] x)``. The layer gets
  ``E·m`` experts of hidden size F/m and activates ``K·m``; expert ``c·m + j`` is slice j
  (copy c) with its output projection scaled by m. The router is *virtual-group*
  initialised: the m slices of copy c share one router row, so their probabilities are equal,
  top-(K·m) selects whole copies, each selected slice gets weight ``p_c / (m Σ p)`` and
  ``Σ_c Σ_j p_c/(m Σp) · m f_j(x) = f(x)`` — exact at initialisation for any router rows.

The identity needs ``norm="renorm"`` (the default of ``router="topk"``) and no capacity
drops; a ``"raw"`` router scales the output by ``Σ p_topk < 1``.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import nn

from moekit.experts.glu import GLUExperts
from moekit.experts.mlp import MLPExperts
from moekit.layers.moe import MoE
from moekit.recipes.dense_ffn import DenseWeights, find_dense_ffns
from moekit.routing.base import Router
from moekit.validate import check_int, check_number, check_probability

__all__ = ["upcycle", "upcycle_weights", "select_sites"]


def _check(num_experts, top_k, granularity, noise, reinit_fraction, every):
    check_int("num_experts", num_experts, min=1)
    check_int("top_k", top_k, min=1)
    if top_k > num_experts:
        raise ValueError(f"top_k must be an int in [1, num_experts={num_experts}], got {top_k!r}")
    check_int("granularity", granularity, min=1)
    check_number("noise", noise, min=0)
    check_probability("reinit_fraction", reinit_fraction)
    check_int("every", every, min=1)


def _tile(slices_mXY: torch.Tensor, copies: int) -> torch.Tensor:
    """(m, X, Y) slices → (copies·m, X, Y), expert c·m + j = slice j."""
    return slices_mXY.repeat(copies, 1, 1)


def _reinit_units(bank, frac: float, dense: DenseWeights, gen: torch.Generator) -> None:
    """Drop-Upcycling: re-draw a random `frac` of each expert's hidden units."""
    Fm = bank.d_hidden
    n = int(round(frac * Fm))
    if n == 0:
        return
    F = dense.d_hidden
    if dense.kind == "glu":
        stats_in = [(dense.w_in[:F].mean(), dense.w_in[:F].std()), (dense.w_in[F:].mean(), dense.w_in[F:].std())]
    else:
        stats_in = [(dense.w_in.mean(), dense.w_in.std())]
    down_mean, down_std = bank.down_proj.mean(), bank.down_proj.std()
    with torch.no_grad():
        for e in range(bank.num_experts):
            idx = torch.randperm(Fm, generator=gen)[:n].to(bank.down_proj.device)
            w_in = bank.gate_up_proj[e] if dense.kind == "glu" else bank.up_proj[e]
            for part, (mu, sd) in enumerate(stats_in):       # gate then up (GLU), or up (MLP)
                rows = idx + part * Fm
                draw = torch.randn(n, w_in.shape[1], generator=gen).to(w_in) * sd + mu
                w_in[rows] = draw
            draw = torch.randn(bank.d_model, n, generator=gen).to(bank.down_proj) * down_std + down_mean
            bank.down_proj[e][:, idx] = draw
            if getattr(bank, "up_bias", None) is not None:
                bank.up_bias[e][idx] = 0.0


def upcycle_weights(dense: DenseWeights, num_experts: int, top_k: int, *, granularity: int = 1,
                    noise: float = 0.0, reinit_fraction: float = 0.0, router: Union[str, Router] = "topk",
                    router_kwargs: Optional[dict] = None, aux_loss_coef: float = 0.01, z_loss_coef: float = 0.0,
                    capacity_factor: Optional[float] = None, backend: str = "auto",
                    generator: Optional[torch.Generator] = None) -> MoE:
    """One `moekit.MoE` upcycled from a dense FFN given as `DenseWeights` (see module docstring)."""
    _check(num_experts, top_k, granularity, noise, reinit_fraction, 1)
    m, F, D = granularity, dense.d_hidden, dense.d_model
    if F % m:
        raise ValueError(f"granularity={m} must divide the FFN hidden size {F}")
    Fm, E, K = F // m, num_experts * m, top_k * m
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    dev, dt = dense.w_out.device, dense.w_out.dtype

    # down slices (m, D, F/m), scaled by m so that Σ over a copy's m slices, each weighted
    # 1/m of its copy's weight, gives back W_out (exactly 1 when m == 1: copies stay bit-exact).
    down_mDF = dense.w_out.view(D, m, Fm).permute(1, 0, 2)
    if m > 1:
        down_mDF = down_mDF * m
    if dense.kind == "glu":
        bank = GLUExperts(E, D, Fm, activation=dense.activation)
        gate_mFD, up_mFD = dense.w_in[:F].view(m, Fm, D), dense.w_in[F:].view(m, Fm, D)
        new = {"gate_up_proj": _tile(torch.cat([gate_mFD, up_mFD], 1), num_experts)}
    elif dense.kind == "mlp":
        has_bias = dense.b_in is not None or dense.b_out is not None
        bank = MLPExperts(E, D, Fm, activation=dense.activation, bias=has_bias)
        new = {"up_proj": _tile(dense.w_in.view(m, Fm, D), num_experts)}
        if has_bias:
            b_in = dense.b_in if dense.b_in is not None else dense.w_in.new_zeros(F)
            b_out = dense.b_out if dense.b_out is not None else dense.w_in.new_zeros(D)
            new["up_bias"] = b_in.view(m, Fm).repeat(num_experts, 1)
            new["down_bias"] = b_out.expand(E, D)
    else:
        raise ValueError(f"dense.kind must be 'glu' or 'mlp', got {dense.kind!r}")
    new["down_proj"] = _tile(down_mDF, num_experts)
    bank = bank.to(device=dev, dtype=dt)
    with torch.no_grad():
        for k, v in new.items():
            getattr(bank, k).copy_(v)
        if noise > 0:
            for k in ("gate_up_proj", "up_proj", "down_proj"):
                if hasattr(bank, k):
                    w = getattr(bank, k)
                    w.add_(torch.randn(w.shape, generator=gen).to(w) * (noise * w.std()))
    if reinit_fraction > 0:
        _reinit_units(bank, float(reinit_fraction), dense, gen)

    moe = MoE(d_model=D, num_experts=E, top_k=K, router=router, experts=bank, capacity_factor=capacity_factor,
              aux_loss_coef=aux_loss_coef, z_loss_coef=z_loss_coef, backend=backend,
              router_kwargs=router_kwargs).to(dev)
    if m > 1:
        w = getattr(moe.router, "weight", None)
        if not isinstance(w, torch.Tensor) or tuple(w.shape) != (E, D):
            raise ValueError(f"granularity > 1 needs a router with a weight of shape ({E}, {D}) for the "
                             f"virtual-group initialisation; {type(moe.router).__name__} has none")
        with torch.no_grad():
            # One row per copy, shared by its m slices (virtual groups).
            w.copy_(w.view(num_experts, m, D)[:, :1].expand(num_experts, m, D).reshape(E, D))
    return moe


def select_sites(sites: list, layers: Optional[Sequence[int]], every: int) -> list:
    """The sites to convert: explicit indices `layers`, else every `every`-th (the last of each run)."""
    if layers is not None:
        bad = [i for i in layers if not -len(sites) <= i < len(sites)]
        if bad:
            raise ValueError(f"layers {bad} out of range for {len(sites)} dense FFNs")
        return [sites[i] for i in sorted({i % len(sites) for i in layers})]
    return [s for i, s in enumerate(sites) if (i + 1) % every == 0]


def upcycle(model: nn.Module, num_experts: int, top_k: int = 2, *, granularity: int = 1, noise: float = 0.0,
            reinit_fraction: float = 0.0, layers: Optional[Sequence[int]] = None, every: int = 1,
            router: str = "topk", router_kwargs: Optional[dict] = None, aux_loss_coef: float = 0.01,
            z_loss_coef: float = 0.0, capacity_factor: Optional[float] = None, backend: str = "auto",
            seed: int = 0) -> nn.Module:
    """Sparse upcycling (Komatsuzaki et al. 2023) of the dense FFNs of `model`, in place.

    Args:
        model: a transformers model (Llama-style GLU MLPs, BERT layers), a moekit model with
            `DenseFFN` blocks, or a single dense FFN module.
        num_experts, top_k: E copies and K active per token (before granularity).
        granularity: m; the layer has E·m experts of hidden F/m and activates K·m.
        noise: relative Gaussian noise on expert weights (0 keeps exact copies).
        reinit_fraction: Drop-Upcycling fraction of hidden units re-drawn per expert.
        layers: indices (into the list of dense FFNs found, in module order) to upcycle;
            default every `every`-th (``every=2``: every other layer, as in the paper).
        router, router_kwargs, aux_loss_coef, z_loss_coef, capacity_factor, backend: the new
            MoE layers' settings (a router *name*: each layer needs its own router).
        seed: seeds the noise, the re-initialisation and the routers.

    Returns `model` with the selected FFNs replaced by `moekit.MoE` layers, or the new MoE
    layer when `model` itself is a dense FFN.
    """
    _check(num_experts, top_k, granularity, noise, reinit_fraction, every)
    if not isinstance(router, str):
        raise TypeError(f"router must be a registered name (each layer gets its own), got {type(router).__name__}")
    sites = find_dense_ffns(model)
    if not sites:
        raise ValueError(f"found no dense FFN in {type(model).__name__} (recognised: Llama-style GLU MLPs, "
                         "BERT layers, moekit DenseFFN, Sequential(Linear, act, Linear))")
    gen = torch.Generator().manual_seed(seed)
    chosen = select_sites(sites, layers, every)
    torch_state = torch.random.get_rng_state()
    torch.manual_seed(seed)          # router initialisations
    try:
        for site in chosen:
            moe = upcycle_weights(site.read(), num_experts, top_k, granularity=granularity, noise=noise,
                                  reinit_fraction=reinit_fraction, router=router, router_kwargs=router_kwargs,
                                  aux_loss_coef=aux_loss_coef, z_loss_coef=z_loss_coef,
                                  capacity_factor=capacity_factor, backend=backend, generator=gen)
            moe.train(site.module.training)
            if site.name == "":
                return moe
            site.put(model, moe)
    finally:
        torch.random.set_rng_state(torch_state)
    return model
