"""M3oE: a multi-domain multi-task mixture of experts for recommendation — METHODS.md MT3.

Zhang et al. (2024), SIGIR, "M3oE: Multi-Domain Multi-Task Mixture-of-Experts Recommendation
Framework". Every example belongs to one of D domains and has K binary tasks.

Legend: B examples, I input dim, S STAR width, H bottom output, O expert output, E shared experts,
D domains, K tasks, N members of a stacked MLP group, F tower hidden width.

For an example ``x`` of domain d:

1. domain-aware bottom (STAR, Sheng et al. 2021): ``s = x·(W_shared ⊙ W_d) + b_d + b_shared``
   (I → S), then ``z = mlp(s) + skip(x)`` (S → H and I → H);
2. three expert modules on z — E shared experts ``S_i``, one expert per domain ``D_d``, one per
   task ``T_t`` (MLPs H → … → O);
3. level-1 fusion inside each aspect:
   ``D̃_d = a_D·D_d + (1 − a_D)/(D − 1)·Σ_{d' ≠ d} D_{d'}`` and
   ``T̃_t = a_T·T_t + (1 − a_T)/(K − 1)·Σ_{t' ≠ t} T_{t'}``;
4. level-2 fusion across aspects, with one softmax gate ``g_{d,t} = softmax(W_{d,t} z + c_{d,t})``
   (E,) per (domain, task) cell: ``h_{d,t} = Σ_i g_{d,t,i} S_i + b_D·D̃_d + b_T·T̃_t``;
5. a tower per cell, ``Linear(O, F) → LayerNorm → ReLU → Linear(F, 1)``, giving cell (d, t)'s logit.

Every "MLP" layer is ``Linear → LayerNorm → ReLU``, as in the released code. A row only ever
uses its own domain's STAR weights, gates and towers, so those get no gradient from other
domains' rows. With one domain (or one task) the sum over the others is empty and
``D̃_d = a_D·D_d`` (``T̃_t = a_T·T_t``), as in the released loop.

**Structure weights.** ``(a_D, a_T, b_D, b_T) = sigmoid(structure_logits)``, four learnable
scalars initialised to 1.0 (the released run script's default, sigmoid ≈ 0.73). The paper fits
them DARTS-style — a separate optimiser on held-out batches, first order — so the module
splits its parameters: `structure_parameters()` (the four logits) and `model_parameters()`
(everything else). The released trainer builds its main optimiser from
``[p for name, p in named_parameters() if ~flag(name)]``; ``~`` on a Python bool is -1 or -2,
always truthy, so its main optimiser also steps the structure logits on training batches.
**We do not replicate that**: the partition is disjoint and `moekit.models.multidomain` steps
the structure logits only with the structure optimiser on validation batches.
`fix_structure` pins any of the four to a constant (tests, ablations); a pinned weight gets no
gradient and is saved in the state dict.

**Gate input.** The released code feeds the gates ``z.detach()``, so the gates do not shape the
bottom; ``detach_gate_input=True`` (default) keeps that, False lets gate gradients reach it.

Initialisation as released: STAR weights Xavier-uniform, STAR biases zero; every other linear
map as ``nn.Linear`` (uniform ±1/√fan_in), LayerNorm scale 1 and shift 0.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from moekit.layers.protocol import MoELayer, mixture_stats
from moekit.validate import check_bool, check_instance, check_int, check_number

__all__ = ["M3oE", "MLPGroup", "STRUCTURE_NAMES"]

STRUCTURE_NAMES = ("a_domain", "a_task", "b_domain", "b_task")


class MLPGroup(nn.Module):
    """N MLPs of the same widths ``dims = (d_0, …, d_L)``, weights stacked per layer.

    Each layer is ``Linear → LayerNorm → ReLU``. ``forward`` takes ``(B, d_0)`` (every member
    reads the same input) or ``(B, N, d_0)`` (member n reads ``x[:, n]``) and returns
    ``(B, N, d_L)``; `member_forward` is the one-member reference of the same maths.
    """

    def __init__(self, num_members: int, dims: Sequence[int]):
        super().__init__()
        check_int("num_members", num_members, min=1)
        dims = [check_int(f"dims[{i}]", d, min=1) for i, d in enumerate(dims)]
        if len(dims) < 2:
            raise ValueError(f"dims must hold an input and at least one output width, got {dims}")
        self.num_members, self.dims = num_members, tuple(dims)
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        self.norm_weights = nn.ParameterList()
        self.norm_biases = nn.ParameterList()
        for d_in, d_out in zip(dims[:-1], dims[1:]):
            bound = 1.0 / math.sqrt(d_in)            # nn.Linear's default range, per member
            self.weights.append(nn.Parameter(torch.empty(num_members, d_out, d_in).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.empty(num_members, d_out).uniform_(-bound, bound)))
            self.norm_weights.append(nn.Parameter(torch.ones(num_members, d_out)))
            self.norm_biases.append(nn.Parameter(torch.zeros(num_members, d_out)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N = self.num_members
        if x.dim() == 2:
            h = torch.einsum("bi,noi->bno", x, self.weights[0])
        elif x.dim() == 3 and x.shape[1] == N:
            h = torch.einsum("bni,noi->bno", x, self.weights[0])
        else:
            raise ValueError(f"x must be (B, {self.dims[0]}) or (B, {N}, {self.dims[0]}), got {tuple(x.shape)}")
        for layer in range(len(self.weights)):
            if layer:
                h = torch.einsum("bni,noi->bno", h, self.weights[layer])
            h = F.layer_norm(h + self.biases[layer], h.shape[-1:])
            h = torch.relu(h * self.norm_weights[layer] + self.norm_biases[layer])
        return h                                                                       # (B, N, d_L)

    def member_forward(self, n: int, x: torch.Tensor) -> torch.Tensor:
        """Member n alone on ``(B, d_0)``, with ``nn.functional`` ops: the reference."""
        h = x
        for w, b, g, beta in zip(self.weights, self.biases, self.norm_weights, self.norm_biases):
            h = torch.relu(F.layer_norm(F.linear(h, w[n], b[n]), (w.shape[1],), g[n], beta[n]))
        return h


class M3oE(MoELayer):
    """M3oE: STAR bottom, shared / domain / task experts, two-level fusion, per-(domain, task) towers.

    ``forward(x_BI, domain_ids_B) → logits_BK``: row b's logits come from its own domain's
    cells. Both ``x`` and the parameters must have the same float dtype.

    Args:
        d_model: I, input features.
        num_domains: D.
        num_tasks: K.
        num_shared_experts: E (the released run script: 4).
        star_dim: S, the STAR layer's width (released: 512).
        bottom_dim: H, the bottom's output (released: 256).
        expert_dims: each expert's widths after H; the last is O (released: (256, 64)).
        tower_hidden: F (None: O, as released).
        structure_init: initial value of the four structure logits.
        detach_gate_input: feed the gates ``z.detach()`` (released behaviour).
    """

    def __init__(self, *, d_model: int, num_domains: int, num_tasks: int, num_shared_experts: int = 4,
                 star_dim: int = 512, bottom_dim: int = 256, expert_dims: Sequence[int] = (256, 64),
                 tower_hidden: Optional[int] = None, structure_init: float = 1.0, detach_gate_input: bool = True):
        super().__init__()
        d_in = d_model
        for name, v in (("d_model", d_in), ("num_domains", num_domains), ("num_tasks", num_tasks),
                        ("num_shared_experts", num_shared_experts), ("star_dim", star_dim),
                        ("bottom_dim", bottom_dim)):
            check_int(name, v, min=1)
        check_instance("expert_dims", expert_dims, (list, tuple), what="a sequence of positive ints")
        expert_dims = tuple(check_int(f"expert_dims[{i}]", v, min=1) for i, v in enumerate(expert_dims))
        if not expert_dims:
            raise ValueError("expert_dims must hold at least one width, got ()")
        d_out = expert_dims[-1]
        tower_hidden = d_out if tower_hidden is None else check_int("tower_hidden", tower_hidden, min=1)
        structure_init = check_number("structure_init", structure_init)
        check_bool("detach_gate_input", detach_gate_input)
        D, K, E = num_domains, num_tasks, num_shared_experts
        self.d_in = self.d_model = d_in
        self.num_domains, self.num_tasks, self.num_experts = D, K, E
        self.detach_gate_input = bool(detach_gate_input)

        # (1) STAR bottom: W_shared ⊙ W_d per domain, then an MLP, plus a skip MLP of x.
        self.star_shared_weight = nn.Parameter(nn.init.xavier_uniform_(torch.empty(d_in, star_dim)))
        self.star_weight = nn.Parameter(torch.stack([nn.init.xavier_uniform_(torch.empty(d_in, star_dim))
                                                     for _ in range(D)]))              # (D, I, S)
        self.star_shared_bias = nn.Parameter(torch.zeros(star_dim))
        self.star_bias = nn.Parameter(torch.zeros(D, star_dim))
        self.star_mlp = MLPGroup(1, (star_dim, bottom_dim))
        self.skip = MLPGroup(1, (d_in, bottom_dim))
        # (2) experts.
        widths = (bottom_dim,) + expert_dims
        self.shared_experts = MLPGroup(E, widths)
        self.domain_experts = MLPGroup(D, widths)
        self.task_experts = MLPGroup(K, widths)
        # (4) one gate per (domain, task) cell, nn.Linear's default init.
        bound = 1.0 / math.sqrt(bottom_dim)
        self.gate_weight = nn.Parameter(torch.empty(D, K, E, bottom_dim).uniform_(-bound, bound))
        self.gate_bias = nn.Parameter(torch.empty(D, K, E).uniform_(-bound, bound))
        # (5) towers: per domain an MLPGroup of K members, then a per-cell linear head.
        self.towers = nn.ModuleList(MLPGroup(K, (d_out, tower_hidden)) for _ in range(D))
        bound = 1.0 / math.sqrt(tower_hidden)
        self.head_weight = nn.Parameter(torch.empty(D, K, tower_hidden).uniform_(-bound, bound))
        self.head_bias = nn.Parameter(torch.empty(D, K).uniform_(-bound, bound))
        # structure weights: logits, and constants that override them where not NaN.
        self.structure_logits = nn.Parameter(torch.full((4,), float(structure_init)))
        self.register_buffer("structure_fixed", torch.full((4,), float("nan")))

    # ---------------------------------------------------------------- structure weights
    def structure_parameters(self) -> List[nn.Parameter]:
        """The structure logits: for the separate (DARTS-style) optimiser only."""
        return [self.structure_logits]

    def model_parameters(self) -> List[nn.Parameter]:
        """Every parameter except the structure logits: for the main optimiser."""
        return [p for p in self.parameters() if p is not self.structure_logits]

    def structure_weights(self) -> torch.Tensor:
        """``(a_D, a_T, b_D, b_T)`` (4,): sigmoid of the logits, or the pinned constant."""
        fixed = self.structure_fixed
        return torch.where(torch.isnan(fixed), torch.sigmoid(self.structure_logits), fixed)

    def structure(self) -> Dict[str, float]:
        """The current structure weights by name (detached floats), for logs."""
        return dict(zip(STRUCTURE_NAMES, self.structure_weights().detach().tolist()))

    def fix_structure(self, **values: Optional[float]) -> None:
        """Pin structure weights by name to constants in [0, 1]; ``None`` makes one learnable again.

        E.g. ``fix_structure(a_domain=1.0, b_task=0.0)``. Names: `STRUCTURE_NAMES`.
        """
        for name, v in values.items():
            if name not in STRUCTURE_NAMES:
                raise ValueError(f"structure weight must be one of {STRUCTURE_NAMES}, got {name!r}")
            check_number(name, v, min=0, max=1, allow_none=True)      # a sigmoid's range
            with torch.no_grad():
                self.structure_fixed[STRUCTURE_NAMES.index(name)] = float("nan") if v is None else float(v)

    # ---------------------------------------------------------------- pieces
    def _check(self, x_BI: torch.Tensor, domain_ids_B: torch.Tensor) -> None:
        if not isinstance(x_BI, torch.Tensor) or not isinstance(domain_ids_B, torch.Tensor):
            raise TypeError(f"x and domain_ids must be torch.Tensors, got {type(x_BI).__name__} and "
                            f"{type(domain_ids_B).__name__}")
        if not x_BI.is_floating_point():
            raise ValueError(f"x must be a float tensor, got dtype {x_BI.dtype}")
        if x_BI.dim() != 2 or x_BI.shape[1] != self.d_in:
            raise ValueError(f"x must have shape (B, d_model={self.d_in}), got {tuple(x_BI.shape)}")
        if x_BI.dtype != self.star_weight.dtype:
            raise ValueError(f"x has dtype {x_BI.dtype} but the parameters {self.star_weight.dtype}")
        if domain_ids_B.is_floating_point() or domain_ids_B.is_complex() or domain_ids_B.dtype == torch.bool:
            raise ValueError(f"domain_ids must be an integer tensor, got dtype {domain_ids_B.dtype}")
        if domain_ids_B.shape != x_BI.shape[:1]:
            raise ValueError(f"domain_ids must have shape (B,) = ({x_BI.shape[0]},), got {tuple(domain_ids_B.shape)}")
        if domain_ids_B.numel():
            lo, hi = int(domain_ids_B.min()), int(domain_ids_B.max())
            if lo < 0 or hi >= self.num_domains:
                raise ValueError(f"domain_ids must lie in [0, num_domains={self.num_domains}), "
                                 f"got values from {lo} to {hi}")

    def _domain_rows(self, domain_ids_B: torch.Tensor):
        """(d, row indices of domain d) for every domain (possibly empty)."""
        return [(d, (domain_ids_B == d).nonzero(as_tuple=True)[0]) for d in range(self.num_domains)]

    def bottom(self, x_BI: torch.Tensor, domain_ids_B: torch.Tensor) -> torch.Tensor:
        """The STAR features ``z = mlp(x·(W_shared ⊙ W_d) + b_d + b_shared) + skip(x)``: (B, H)."""
        s_BS = x_BI.new_zeros(x_BI.shape[0], self.star_bias.shape[1])
        for d, rows in self._domain_rows(domain_ids_B):
            w_IS = self.star_shared_weight * self.star_weight[d]
            s_BS = s_BS.index_copy(0, rows, x_BI[rows] @ w_IS + self.star_bias[d] + self.star_shared_bias)
        return self.star_mlp(s_BS)[:, 0] + self.skip(x_BI)[:, 0]

    def gate_probs(self, z_BH: torch.Tensor, domain_ids_B: torch.Tensor) -> torch.Tensor:
        """Each row's K gates over the E shared experts, from its own domain: (B, K, E)."""
        E = self.num_experts
        g_BKE = z_BH.new_zeros(z_BH.shape[0], self.num_tasks, E)
        for d, rows in self._domain_rows(domain_ids_B):
            logits = torch.einsum("bh,keh->bke", z_BH[rows], self.gate_weight[d]) + self.gate_bias[d]
            # softmax in at least fp32 (half-precision logits would round the weights)
            probs = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), -1)
            g_BKE = g_BKE.index_copy(0, rows, probs.to(z_BH.dtype))
        return g_BKE

    def tower_logits(self, h_BKO: torch.Tensor, domain_ids_B: torch.Tensor) -> torch.Tensor:
        """Row b's K cell inputs through its own domain's K towers: (B, K) logits."""
        out_BK = h_BKO.new_zeros(h_BKO.shape[:2])
        for d, rows in self._domain_rows(domain_ids_B):
            t_BKF = self.towers[d](h_BKO[rows])
            out_BK = out_BK.index_copy(0, rows, torch.einsum("bkf,kf->bk", t_BKF, self.head_weight[d])
                                       + self.head_bias[d])
        return out_BK

    @staticmethod
    def _level1(own: torch.Tensor, total: torch.Tensor, a: torch.Tensor, n: int) -> torch.Tensor:
        """``a·own + (1 − a)/(n − 1)·(total − own)``, total the sum of all n; n = 1: ``a·own``."""
        return a * own if n == 1 else a * own + (1 - a) / (n - 1) * (total - own)

    # ---------------------------------------------------------------- forward
    def forward(self, x_BI: torch.Tensor, domain_ids_B: torch.Tensor) -> torch.Tensor:
        self._check(x_BI, domain_ids_B)
        B = x_BI.shape[0]
        domain_ids_B = domain_ids_B.long()
        z_BH = self.bottom(x_BI, domain_ids_B)
        g_BKE = self.gate_probs(z_BH.detach() if self.detach_gate_input else z_BH, domain_ids_B)
        shared_BEO = self.shared_experts(z_BH)
        dom_BDO = self.domain_experts(z_BH)
        task_BKO = self.task_experts(z_BH)
        a_D, a_T, b_D, b_T = self.structure_weights().to(x_BI.dtype)
        # level 1: D̃ for the row's own domain; T̃ for every task
        own_BO = dom_BDO[torch.arange(B, device=x_BI.device), domain_ids_B]
        dom_BO = self._level1(own_BO, dom_BDO.sum(1), a_D, self.num_domains)
        task_BKO = self._level1(task_BKO, task_BKO.sum(1, keepdim=True), a_T, self.num_tasks)
        # level 2: gated shared experts + weighted domain and task aspects
        h_BKO = torch.einsum("bke,beo->bko", g_BKE, shared_BEO) + b_D * dom_BO[:, None] + b_T * task_BKO
        self.aux_loss = torch.zeros((), device=x_BI.device)
        self.last_stats = mixture_stats(g_BKE)              # shared-expert gates over every (example, task)
        return self.tower_logits(h_BKO, domain_ids_B)                                   # (B, K)
