"""The models of the two reproductions, built from moekit's public API.

Legend: B examples (one example is one token of the MoE layer), D input dim, P patches, d patch
length (D = P·d), m filters per class, E experts.

R1: the MoE is `moekit.MoE` itself: one example is one token of width D = 200, the router is
`PatchSumRouter` (a linear map of the sum over patches, zero init, U[0, 1) noise on the logits in
training, top-1, gate = the selected noisy logit as in the official code) and the experts are
`PatchCNN` modules in a `moekit.experts.ModuleExperts` bank. The layer maps ``(…, D) → (…, D)``,
so each expert writes its two class logits into the first two of D output columns (zeros
elsewhere, `InModelWidth`) and `PatchMoE` reads columns 0 and 1.

R7: E = 8 linear experts routed by a learned Switch router with the balance loss, or by
`moekit.routing.HashRouter` on the sign pattern of a fixed random projection (`SignHashIds`,
routing that cannot learn) — `LatentClusterMoE`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moekit import MoE
from moekit.experts import ModuleExperts
from moekit.ops import topk_stable
from moekit.routing import HashRouter, TokenChoiceRouter
from moekit.routing.base import router_float

__all__ = ["PatchCNN", "InModelWidth", "PatchSumRouter", "PatchMoE", "SignHashIds", "LatentClusterMoE"]


class PatchCNN(nn.Module):
    """Two-layer patch CNN ``(B, P·d) → (B, 2)``: ``Conv1d(1 → 2m, kernel = stride = d)``, cubic
    or identity, sum over patches; logit of class 0 (label −1) sums the first m filters, class 1 the last m.

    init_scale: multiplies the default init (0.001 for the MoE's experts, 1 for single models).
    """

    def __init__(self, *, width: int, activation: str = "cubic", patch_len: int = 50, num_patches: int = 4,
                 init_scale: float = 1.0):
        super().__init__()
        if activation not in ("cubic", "linear"):
            raise ValueError(f"activation must be 'cubic' or 'linear', got {activation!r}")
        if not isinstance(width, int) or width < 1:
            raise ValueError(f"width must be a positive int, got {width!r}")
        self.width, self.activation, self.patch_len, self.num_patches = width, activation, patch_len, num_patches
        self.conv = nn.Conv1d(1, 2 * width, patch_len, stride=patch_len)
        with torch.no_grad():
            self.conv.weight.mul_(init_scale)
            self.conv.bias.mul_(init_scale)

    def forward(self, x_BD: torch.Tensor) -> torch.Tensor:
        B = x_BD.shape[0]
        # Conv1d with kernel = stride = d is one matmul per patch; F.linear on the (B, P, d) view
        # computes it with the conv's own parameters, several times faster than Conv1d on a CPU.
        w_Fd = self.conv.weight.reshape(2 * self.width, self.patch_len)
        if self.activation == "cubic":
            h_BPF = F.linear(x_BD.reshape(B, self.num_patches, self.patch_len), w_Fd, self.conv.bias)  # (B, P, 2m)
            h_BPF = h_BPF * h_BPF * h_BPF
            h_BF = h_BPF.sum(1)
        else:
            # Linear: Σ_p (W x_p + b) = W Σ_p x_p + P·b, the same function with P× fewer FLOPs.
            s_Bd = x_BD.reshape(B, self.num_patches, self.patch_len).sum(1)
            h_BF = F.linear(s_Bd, w_Fd, self.conv.bias * self.num_patches)
        return h_BF.reshape(B, 2, self.width).sum(-1)                                  # (B, 2)

    def extra_repr(self) -> str:
        return f"width={self.width}, activation={self.activation!r}"


class InModelWidth(nn.Module):
    """A module's ``(n, c)`` output in the first c of ``d_model`` columns, zeros elsewhere —
    so a classifier can be an expert of `moekit.MoE`, whose experts map D → D."""

    def __init__(self, module: nn.Module, d_model: int):
        super().__init__()
        self.module, self.d_model = module, d_model

    def forward(self, x_nD: torch.Tensor) -> torch.Tensor:
        y = self.module(x_nD)
        return F.pad(y, (0, self.d_model - y.shape[-1]))


class PatchSumRouter(TokenChoiceRouter):
    """Chen et al. (2022)'s router: ``h(x) = W Σ_p x_p`` (W: (E, d), zero init), plus U[0, noise)
    on every logit in training, top-1; the combine weight is the selected noisy logit itself
    (official code), so the router learns through the experts' outputs.

    The softmax of the clean logits is reported as ``probs`` (for statistics or a balance loss).
    """

    default_balance_loss = "none"

    def __init__(self, d_model: int, num_experts: int, top_k: int = 1, *, num_patches: int, noise: float = 1.0):
        if top_k != 1:
            raise ValueError(f"PatchSumRouter is top-1, got top_k={top_k}")
        if not isinstance(num_patches, int) or num_patches < 1 or d_model % num_patches:
            raise ValueError(f"num_patches must be a positive divisor of d_model={d_model}, got {num_patches!r}")
        if noise < 0:
            raise ValueError(f"noise must be >= 0, got {noise}")
        super().__init__(d_model, num_experts, 1)
        self.num_patches, self.noise = num_patches, float(noise)
        self.weight = nn.Parameter(torch.zeros(num_experts, d_model // num_patches))

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        T = x_TD.shape[0]
        s_Td = router_float(x_TD).reshape(T, self.num_patches, -1).sum(1)      # sum over patches
        return F.linear(s_Td, router_float(self.weight))

    def select(self, logits_TE: torch.Tensor):
        noisy_TE = logits_TE
        if self.training and self.noise > 0:
            noisy_TE = logits_TE + self.noise * torch.rand_like(logits_TE)
        gate_T1, ids_T1 = topk_stable(noisy_TE, 1)      # ties (zero init, eval) go to the lowest index
        return ids_T1, gate_T1, torch.softmax(logits_TE, dim=-1)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, num_patches={self.num_patches}, noise={self.noise}"


class PatchMoE(nn.Module):
    """``(B, P·d) → (B, 2)`` class logits: `moekit.MoE` with a `PatchSumRouter` and E `PatchCNN`
    experts (width m, init ×0.001), Chen et al. (2022)'s model (E = 8, m = 8)."""

    def __init__(self, *, activation: str = "cubic", num_experts: int = 8, width: int = 8, patch_len: int = 50,
                 num_patches: int = 4, router_noise: float = 1.0, init_scale: float = 1e-3):
        super().__init__()
        D = patch_len * num_patches
        cnns = [PatchCNN(width=width, activation=activation, patch_len=patch_len, num_patches=num_patches,
                         init_scale=init_scale) for _ in range(num_experts)]
        router = PatchSumRouter(D, num_experts, num_patches=num_patches, noise=router_noise)
        self.moe = MoE(d_model=D, num_experts=num_experts, router=router,
                       experts=ModuleExperts([InModelWidth(c, D) for c in cnns], d_model=D),
                       aux_loss_coef=0.0, balance_loss="none")

    def expert(self, i: int) -> PatchCNN:
        return self.moe.experts[i].module

    def forward(self, x_BD: torch.Tensor) -> torch.Tensor:
        return self.moe(x_BD)[:, :2]


# ============================================================================ R7
class SignHashIds(nn.Module):
    """``(B, D) → (B,)`` int64 ids ``Σ_i 2^i [r_i · x > 0]`` for ``bits`` fixed random directions
    r_i (a buffer drawn from `seed`): locality-sensitive hashing of the input, no learning."""

    def __init__(self, d_model: int, bits: int = 8, *, seed: int = 0):
        super().__init__()
        if not isinstance(bits, int) or not 1 <= bits <= 30:
            raise ValueError(f"bits must be an int in [1, 30], got {bits!r}")
        g = torch.Generator().manual_seed(seed)
        self.bits = bits
        self.register_buffer("proj", torch.randn(bits, d_model, generator=g))
        self.register_buffer("powers", 2 ** torch.arange(bits))

    def forward(self, x_BD: torch.Tensor) -> torch.Tensor:
        return (((x_BD @ self.proj.T.to(x_BD.dtype)) > 0).long() * self.powers).sum(-1)   # no integer matmul on CUDA


class LatentClusterMoE(nn.Module):
    """E linear experts ``(B, D) → (B, D)`` in `moekit.MoE`, routed ``"learned"`` (Switch router,
    top-1, Switch balance loss) or ``"hash"`` (`HashRouter` on `SignHashIds` of the input)."""

    def __init__(self, *, routing: str = "learned", d_model: int = 32, num_experts: int = 8, hash_bits: int = 8,
                 aux_loss_coef: float = 1.0, seed: int = 0):
        super().__init__()
        if routing not in ("learned", "hash"):
            raise ValueError(f"routing must be 'learned' or 'hash', got {routing!r}")
        self.routing = routing
        experts = ModuleExperts([nn.Linear(d_model, d_model) for _ in range(num_experts)], d_model=d_model)
        if routing == "learned":
            self.ids = None
            self.moe = MoE(d_model=d_model, num_experts=num_experts, router="switch", experts=experts,
                           aux_loss_coef=aux_loss_coef)
        else:
            self.ids = SignHashIds(d_model, hash_bits, seed=seed)
            router = HashRouter(d_model, num_experts, vocab_size=2 ** hash_bits, seed=seed)
            self.moe = MoE(d_model=d_model, num_experts=num_experts, router=router, experts=experts)

    def forward(self, x_BD: torch.Tensor) -> torch.Tensor:
        if self.ids is None:
            return self.moe(x_BD)
        return self.moe(x_BD, token_ids=self.ids(x_BD))

    @torch.no_grad()
    def experts_of(self, x_BD: torch.Tensor) -> torch.Tensor:
        """(B,) expert of each example (eval-mode routing)."""
        was = self.training
        self.eval()
        self(x_BD)
        self.train(was)
        r = self.moe.last_routing
        out = torch.empty(x_BD.shape[0], dtype=torch.long)
        out[r.token_ids.cpu()] = r.expert_ids.cpu()
        return out
