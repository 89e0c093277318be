"""STAR: one star-topology network for many domains — the multi-domain baseline of METHODS.md MT3.

Sheng et al. (2021), CIKM, "One Model to Serve All: Star Topology Adaptive Recommender for
Multi-Domain CTR Prediction".

Legend: B examples, I input dim, H layer width, D domains, K tasks, F tower hidden width.

Every fully connected layer has a shared weight and one per domain, combined element-wise for
a row of domain d: ``h' = ReLU(PN_d((W_shared ⊙ W_d) h + b_shared + b_d))``. Partitioned
normalisation ``PN_d(u) = (γ ⊙ γ_d) · norm(u) + (β + β_d)`` keeps the shared and the domain's
own affine terms; ``norm`` here is a LayerNorm over features (STAR normalises over the batch
with per-domain statistics; a per-row norm needs no running statistics and treats every
domain's rows alike). An auxiliary network on the domain indicator adds a per-(domain, task)
bias to the logits (STAR's auxiliary network, which sees the domain only). For K tasks, a
tower per task (shared across domains) reads the star network's output, as the M3oE paper's
multi-task STAR baseline.

Init: W_shared and every W_d Xavier-uniform, W_d then shifted to 1 + its draw / 10 so
``W_shared ⊙ W_d`` starts near the shared weight (STAR initialises domain weights at ones);
biases zero; γ = γ_d = 1, β = β_d = 0.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from moekit.layers.multigate import TaskTower
from moekit.validate import check_instance, check_int

__all__ = ["STAR", "StarLinear"]


class StarLinear(nn.Module):
    """``(B, I), domain_ids (B,) → (B, H)``: ``ReLU(PN_d((W_shared ⊙ W_d) x + b_shared + b_d))``."""

    def __init__(self, d_in: int, d_out: int, num_domains: int):
        super().__init__()
        for name, v in (("d_in", d_in), ("d_out", d_out), ("num_domains", num_domains)):
            check_int(name, v, min=1)
        self.shared_weight = nn.Parameter(nn.init.xavier_uniform_(torch.empty(d_out, d_in)))
        self.domain_weight = nn.Parameter(1 + 0.1 * torch.stack(
            [nn.init.xavier_uniform_(torch.empty(d_out, d_in)) for _ in range(num_domains)]))   # (D, H, I)
        self.shared_bias = nn.Parameter(torch.zeros(d_out))
        self.domain_bias = nn.Parameter(torch.zeros(num_domains, d_out))
        self.gamma = nn.Parameter(torch.ones(d_out))
        self.beta = nn.Parameter(torch.zeros(d_out))
        self.domain_gamma = nn.Parameter(torch.ones(num_domains, d_out))
        self.domain_beta = nn.Parameter(torch.zeros(num_domains, d_out))
        self.num_domains = num_domains

    def domain_forward(self, d: int, x_BI: torch.Tensor) -> torch.Tensor:
        """Rows all of domain d (the per-domain reference the batched forward is built from)."""
        u = F.linear(x_BI, self.shared_weight * self.domain_weight[d], self.shared_bias + self.domain_bias[d])
        u = F.layer_norm(u, u.shape[-1:])
        return torch.relu(u * (self.gamma * self.domain_gamma[d]) + (self.beta + self.domain_beta[d]))

    def forward(self, x_BI: torch.Tensor, domain_ids_B: torch.Tensor) -> torch.Tensor:
        out = x_BI.new_zeros(x_BI.shape[0], self.shared_bias.shape[0])
        for d in range(self.num_domains):
            rows = (domain_ids_B == d).nonzero(as_tuple=True)[0]
            if rows.numel():
                out = out.index_copy(0, rows, self.domain_forward(d, x_BI[rows]))
        return out


class STAR(nn.Module):
    """STAR for K tasks: ``forward(x_BI, domain_ids_B) → logits_BK``.

    Args:
        d_model: I.
        num_domains: D.
        num_tasks: K.
        dims: the star layers' widths (≥ 1 layer).
        tower_hidden: F, each task tower's hidden width.
        aux_hidden: width of the auxiliary network on the domain indicator.
    """

    takes_domain_ids = True

    def __init__(self, *, d_model: int, num_domains: int, num_tasks: int, dims: Sequence[int] = (64,),
                 tower_hidden: int = 8, aux_hidden: int = 8):
        super().__init__()
        for name, v in (("d_model", d_model), ("num_domains", num_domains), ("num_tasks", num_tasks),
                        ("tower_hidden", tower_hidden), ("aux_hidden", aux_hidden)):
            check_int(name, v, min=1)
        check_instance("dims", dims, (list, tuple), what="a sequence of positive ints")
        dims = tuple(check_int(f"dims[{i}]", v, min=1) for i, v in enumerate(dims))
        if not dims:
            raise ValueError("dims must hold at least one width, got ()")
        self.d_in = self.d_model = d_model
        self.num_domains, self.num_tasks = num_domains, num_tasks
        widths = (d_model,) + dims
        self.layers = nn.ModuleList(StarLinear(a, b, num_domains) for a, b in zip(widths[:-1], widths[1:]))
        self.towers = nn.ModuleList(TaskTower(dims[-1], 1, tower_hidden) for _ in range(num_tasks))
        self.aux = nn.Sequential(nn.Embedding(num_domains, aux_hidden), nn.ReLU(), nn.Linear(aux_hidden, num_tasks))

    def forward(self, x_BI: torch.Tensor, domain_ids_B: torch.Tensor) -> torch.Tensor:
        if x_BI.dim() != 2 or x_BI.shape[1] != self.d_in:
            raise ValueError(f"x must have shape (B, d_model={self.d_in}), got {tuple(x_BI.shape)}")
        if domain_ids_B.shape != x_BI.shape[:1] or domain_ids_B.is_floating_point():
            raise ValueError(f"domain_ids must be integers of shape ({x_BI.shape[0]},), "
                             f"got {domain_ids_B.dtype} {tuple(domain_ids_B.shape)}")
        domain_ids_B = domain_ids_B.long()
        if domain_ids_B.numel() and (int(domain_ids_B.min()) < 0 or int(domain_ids_B.max()) >= self.num_domains):
            raise ValueError(f"domain_ids must lie in [0, num_domains={self.num_domains})")
        h = x_BI
        for layer in self.layers:
            h = layer(h, domain_ids_B)
        main_BK = torch.cat([tower(h) for tower in self.towers], 1)
        return main_BK + self.aux(domain_ids_B)
