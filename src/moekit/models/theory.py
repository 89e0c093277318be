"""Theory reproductions on synthetic clusters — METHODS.md TH1/§15 R1 and TH5/§15 R7.

Legend: B examples (one example is one token of the MoE layer), D input dim, P patches,
d patch length (D = P·d), m filters per class, E experts, K clusters, N routed examples.

**R1** (Chen, Deng, Wu, Gu & Li 2022, NeurIPS, "Towards Understanding the Mixture-of-Experts
Layer in Deep Learning"; facts from the official code ``uclaml/MoE``): examples of P = 4
patches in R^50 — a label-signed cluster feature ``α·y·v_k``, a cluster centre ``β·c_k``, a
Gaussian noise patch and a feature-noise patch ``±γ·v_k'`` of another cluster — shuffled and
scaled by 10 (`make_cluster_data`). A single two-layer CNN cannot learn this; a top-1 MoE of
eight small CNNs with cubic activation does, because its router learns the centres and each
expert then faces one cluster's linear problem (`PatchMoE`, `train_patch_moe`). The
"dispatch entropy" (`dispatch_entropy`) measures how well the router recovers the clusters.

The MoE is `moekit.MoE` itself: one example is one token of width D = 200, the router is
`PatchSumRouter` (a linear map of the sum over patches, zero init, U[0, 1) noise on the
logits in training, top-1, gate = the selected noisy logit as in the official code) and the
experts are `PatchCNN` modules in a `ModuleExperts` bank. The layer maps ``(…, D) → (…, D)``,
so each expert writes its two class logits into the first two of D output columns (zeros
elsewhere, `InModelWidth`) and `PatchMoE` reads columns 0 and 1.

Departures from the official code, each for a stated reason: (1) normalised GD divides an
expert's gradient by its L2 norm over all its parameters (the code divides by the *sum* of
per-tensor norms), so every expert's step has norm exactly lr as METHODS states; (2) evaluation
runs the router in eval mode (no noise; the code scores with the exploration noise on);
(3) the optional 1e-4 balance loss is off, as in the code's reported runs.

**R7** (Dikkala et al. 2023, EMNLP, "On the Benefits of Learning to Route in MoE Models";
parameters are ours, METHODS [D]): x from K = 8 well-separated Gaussians in R^32, targets
``y = A_k x + b_k + noise``. E = 8 linear experts routed (a) by a learned Switch router with the
balance loss, (b) by `HashRouter` on the sign pattern of a fixed random projection (routing
that cannot learn), against (c) one dense linear map (`run_r7`). `router_purity` measures how
cleanly the experts split the clusters.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from moekit.experts import ModuleExperts
from moekit.layers import MoE, aux_loss
from moekit.ops.topk import topk_stable
from moekit.routing.base import TokenChoiceRouter, router_float
from moekit.routing.hash import HashRouter

__all__ = ["PATCH_KINDS", "R1Setting", "R1_SETTINGS", "ClusterData", "make_cluster_data", "PatchCNN", "InModelWidth",
           "PatchSumRouter", "PatchMoE", "NormalizedGD", "expert_param_groups", "dispatch_entropy",
           "train_patch_moe", "train_single_cnn", "accuracy", "R1Result", "run_r1", "R1_MODELS",
           "LatentClusterData", "make_latent_cluster_data", "SignHashIds", "LatentClusterMoE", "router_purity",
           "train_regression", "R7Result", "run_r7"]

# ============================================================================ R1: data
PATCH_KINDS = ("feature", "center", "noise", "feature_noise")


@dataclass(frozen=True)
class R1Setting:
    """Noise patch ``N(0, (noise_scale/√d)² I)``; feature-noise scale ``γ ~ U[0.5, gamma_max]``."""

    noise_scale: float
    gamma_max: float


R1_SETTINGS = {"S1": R1Setting(1.0, 3.0), "S2": R1Setting(2.0, 3.0),
               "S3": R1Setting(1.0, 2.0), "S4": R1Setting(2.0, 2.0)}


@dataclass(frozen=True)
class ClusterData:
    """One split of the R1 data.

    x: (B, D) float32 inputs (already ×10). y: (B,) int64 class, 1 for label +1 and 0 for −1.
    cluster: (B,) int64 cluster k. kinds: (B, P) int64, the kind (index into `PATCH_KINDS`) of
    the patch at each position. features, centers: (K, d) the orthonormal v_k and c_k (unscaled).
    """

    x: torch.Tensor
    y: torch.Tensor
    cluster: torch.Tensor
    kinds: torch.Tensor
    features: torch.Tensor
    centers: torch.Tensor

    def __len__(self) -> int:
        return self.x.shape[0]


def make_cluster_data(setting: str = "S1", *, n_train: int = 16000, n_test: int = 16000, seed: int = 0,
                      patch_len: int = 50, num_clusters: int = 4, scale: float = 10.0):
    """``(train, test)`` `ClusterData` of METHODS §15 R1 for setting ``"S1"``…``"S4"``.

    Every random draw is made in the same order whatever the setting, so two settings with one
    seed differ only where their parameters do (noise patch scale, γ range).
    """
    if setting not in R1_SETTINGS:
        raise ValueError(f"setting must be one of {sorted(R1_SETTINGS)}, got {setting!r}")
    if num_clusters < 2 or 2 * num_clusters > patch_len:
        raise ValueError(f"need 2 <= num_clusters and 2·num_clusters <= patch_len, got {num_clusters}, {patch_len}")
    cfg = R1_SETTINGS[setting]
    g = torch.Generator().manual_seed(seed)
    K, d, B = num_clusters, patch_len, n_train + n_test
    q, _ = torch.linalg.qr(torch.randn(d, 2 * K, generator=g, dtype=torch.float64))
    features_Kd, centers_Kd = q.T[:K], q.T[K:]            # 2K orthonormal unit vectors

    y_B = torch.randint(0, 2, (B,), generator=g)
    k_B = torch.randint(0, K, (B,), generator=g)
    k_noise_B = (k_B + torch.randint(1, K, (B,), generator=g)) % K      # uniform over the other K−1
    sign_B = torch.randint(0, 2, (B,), generator=g) * 2 - 1
    alpha_B = 0.5 + 1.5 * torch.rand(B, generator=g, dtype=torch.float64)
    beta_B = 1.0 + torch.rand(B, generator=g, dtype=torch.float64)
    gamma_B = 0.5 + (cfg.gamma_max - 0.5) * torch.rand(B, generator=g, dtype=torch.float64)
    xi_Bd = torch.randn(B, d, generator=g, dtype=torch.float64) * (cfg.noise_scale / math.sqrt(d))
    perm_BP = torch.argsort(torch.rand(B, len(PATCH_KINDS), generator=g), dim=1)

    label_B1 = (2 * y_B - 1).unsqueeze(1).double()
    patches_BPd = torch.stack([alpha_B[:, None] * label_B1 * features_Kd[k_B],
                               beta_B[:, None] * centers_Kd[k_B],
                               xi_Bd,
                               (sign_B * gamma_B)[:, None] * features_Kd[k_noise_B]], dim=1)
    patches_BPd = patches_BPd.gather(1, perm_BP[:, :, None].expand(-1, -1, d))   # shuffle the patches
    x_BD = (scale * patches_BPd).reshape(B, -1).float()

    def split(sl):
        return ClusterData(x=x_BD[sl], y=y_B[sl], cluster=k_B[sl], kinds=perm_BP[sl],
                           features=features_Kd.float(), centers=centers_Kd.float())
    return split(slice(0, n_train)), split(slice(n_train, B))


# ============================================================================ R1: models
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


# ============================================================================ R1: training
class NormalizedGD(torch.optim.Optimizer):
    """``p ← p − lr · g_p / ‖g_group‖₂`` with the norm over all parameters of one param group
    (one group per expert: `expert_param_groups`), so each expert's step has norm lr.

    A group whose gradient is zero (an expert that got no examples) does not move.
    """

    def __init__(self, params, lr: float):
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        super().__init__(params, dict(lr=lr))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            grads = [p.grad for p in group["params"] if p.grad is not None]
            if not grads:
                continue
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
            if norm > 0:
                for p in group["params"]:
                    if p.grad is not None:
                        p.add_(p.grad, alpha=-group["lr"] / float(norm))
        return loss


def expert_param_groups(model: PatchMoE) -> list[dict]:
    """One optimiser param group per expert of `model`."""
    return [{"params": list(model.expert(i).parameters())} for i in range(model.moe.num_experts)]


def dispatch_entropy(expert_ids: torch.Tensor, cluster_ids: torch.Tensor, *, num_experts: int,
                     num_clusters: int) -> float:
    """``Σ_e (n_e / N) · H(cluster | expert e)`` in nats (Chen et al. 2022): 0 when every expert
    sees one cluster, ``log K`` when each sees all K clusters equally. Experts with no examples
    do not count."""
    n_KE = torch.zeros(num_clusters, num_experts, dtype=torch.float64)
    n_KE.index_put_((cluster_ids.long().cpu(), expert_ids.long().cpu()),
                    torch.ones(expert_ids.numel(), dtype=torch.float64), accumulate=True)
    n_E = n_KE.sum(0)
    p_KE = n_KE / n_E.clamp_min(1)
    h_E = -torch.where(p_KE > 0, p_KE * p_KE.clamp_min(1e-300).log(), torch.zeros_like(p_KE)).sum(0)
    return float((n_E / n_E.sum() * h_E).sum())


@torch.no_grad()
def accuracy(model: nn.Module, data: ClusterData) -> float:
    """Test accuracy in percent, model in eval mode."""
    was = model.training
    model.eval()
    acc = (model(data.x).argmax(-1) == data.y).double().mean().item() * 100
    model.train(was)
    return acc


def train_patch_moe(model: PatchMoE, data: ClusterData, *, epochs: int = 600, lr_experts: float = 1e-3,
                    lr_router: float = 0.1, early_stop: bool = True) -> dict:
    """Full-batch training of Chen et al. (2022): experts by `NormalizedGD`, router by SGD.

    Loss: cross-entropy of the *softmax* of the MoE's logits (the official code applies the
    softmax in the model and again inside ``CrossEntropyLoss``; its minimum is log(1 + e⁻¹) ≈
    0.3133, which bounds the cubic experts' gradients). Early stopping as the code: stop when
    the loss rises 0.02 above its minimum, or is ≤ 0.314 without being a new minimum.
    Returns ``{"epochs", "loss", "dispatch_entropy"}``, the entropy of the last training routing.
    """
    opts = [NormalizedGD(expert_param_groups(model), lr=lr_experts),
            torch.optim.SGD(model.moe.router.parameters(), lr=lr_router)]
    model.train()
    best, epoch, loss = float("inf"), 0, torch.zeros(())
    for epoch in range(1, epochs + 1):
        for o in opts:
            o.zero_grad(set_to_none=True)
        loss = F.cross_entropy(torch.softmax(model(data.x), -1), data.y)
        value = loss.item()
        if value <= best:
            best = value
        elif early_stop and (value > best + 0.02 or value <= 0.314):
            break
        loss.backward()
        for o in opts:
            o.step()
    r = model.moe.last_routing
    ent = dispatch_entropy(r.expert_ids, data.cluster[r.token_ids], num_experts=model.moe.num_experts,
                           num_clusters=int(data.features.shape[0]))
    return {"epochs": epoch, "loss": loss.item(), "dispatch_entropy": ent}


def train_single_cnn(model: PatchCNN, data: ClusterData, *, epochs: int = 800, lr: Optional[float] = None,
                     weight_decay: float = 5e-4) -> dict:
    """Full-batch Adam on plain cross-entropy (official: lr 3e-3 linear, 1e-2 cubic, wd 5e-4);
    after epoch 500, stop when the loss rises 0.02 above its minimum."""
    lr = lr if lr is not None else (1e-2 if model.activation == "cubic" else 3e-3)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    best, epoch, loss = float("inf"), 0, torch.zeros(())
    for epoch in range(1, epochs + 1):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(data.x), data.y)
        value = loss.item()
        if value <= best:
            best = value
        elif epoch > 500 and value > best + 0.02:
            break
        loss.backward()
        opt.step()
    return {"epochs": epoch, "loss": loss.item()}


R1_MODELS = ("moe_cubic", "moe_linear", "single_linear", "single_cubic")


@dataclass(frozen=True)
class R1Result:
    model: str
    setting: str
    seed: int
    test_acc: float
    train_acc: float
    dispatch_entropy: Optional[float]      # MoE only
    epochs: int
    seconds: float


def run_r1(model: str, setting: str = "S1", *, seed: int = 0, data=None, width: Optional[int] = None,
           epochs: Optional[int] = None, n_train: int = 16000, n_test: int = 16000) -> R1Result:
    """Train one R1 model (`R1_MODELS`) and score it on the test split.

    data: a ``(train, test)`` pair to reuse (else drawn from `seed`); the model's init uses
    `seed` too. width: m (default 8 per MoE expert, 64 for a single CNN). epochs default to the
    official 600 (cubic MoE), 500 (linear MoE) and 800 (single CNNs).
    """
    if model not in R1_MODELS:
        raise ValueError(f"model must be one of {R1_MODELS}, got {model!r}")
    if data is not None and (n_train, n_test) != (16000, 16000):
        raise ValueError("n_train / n_test only apply when data is None (the given data has its own sizes)")
    train, test = data if data is not None else make_cluster_data(setting, n_train=n_train, n_test=n_test,
                                                                  seed=seed)
    with torch.random.fork_rng(devices=[]):       # the caller's global RNG is left as it was
        torch.manual_seed(seed)
        return _run_r1(model, setting, seed, train, test, width, epochs)


def _run_r1(model, setting, seed, train, test, width, epochs) -> R1Result:
    kind, act = model.split("_")
    act = "linear" if act == "linear" else "cubic"
    t0 = time.perf_counter()
    if kind == "moe":
        net = PatchMoE(activation=act, width=width or 8)
        log = train_patch_moe(net, train, epochs=epochs or (600 if act == "cubic" else 500))
    else:
        net = PatchCNN(width=width or 64, activation=act)
        log = train_single_cnn(net, train, epochs=epochs or 800)
    secs = time.perf_counter() - t0
    return R1Result(model=model, setting=setting, seed=seed, test_acc=accuracy(net, test),
                    train_acc=accuracy(net, train), dispatch_entropy=log.get("dispatch_entropy"),
                    epochs=log["epochs"], seconds=secs)


# ============================================================================ R7
@dataclass(frozen=True)
class LatentClusterData:
    """One split of the R7 data: x (B, D), targets y (B, D), cluster (B,) int64."""

    x: torch.Tensor
    y: torch.Tensor
    cluster: torch.Tensor

    def __len__(self) -> int:
        return self.x.shape[0]


def make_latent_cluster_data(*, n_train: int = 8192, n_test: int = 8192, num_clusters: int = 8, dim: int = 32,
                             center_norm: float = 6.0, noise: float = 0.1, seed: int = 0):
    """``(train, test)`` of METHODS §15 R7 [D parameters]: ``x = μ_k + N(0, I)`` with ``‖μ_k‖ =
    center_norm`` in random directions (neighbouring centres ≈ 4σ from their midplane), and
    ``y = A_k x + b_k + N(0, noise² I)``, ``A_k ~ N(0, 1/D)``, ``b_k ~ N(0, 1)``. The noise
    floor of the test MSE (mean over B and D) is ``noise²``."""
    g = torch.Generator().manual_seed(seed)
    K, D, B = num_clusters, dim, n_train + n_test
    mu_KD = F.normalize(torch.randn(K, D, generator=g), dim=-1) * center_norm
    A_KDD = torch.randn(K, D, D, generator=g) / math.sqrt(D)
    b_KD = torch.randn(K, D, generator=g)
    k_B = torch.randint(0, K, (B,), generator=g)
    x_BD = mu_KD[k_B] + torch.randn(B, D, generator=g)
    y_BD = torch.einsum("bij,bj->bi", A_KDD[k_B], x_BD) + b_KD[k_B] + noise * torch.randn(B, D, generator=g)

    def split(sl):
        return LatentClusterData(x=x_BD[sl], y=y_BD[sl], cluster=k_B[sl])
    return split(slice(0, n_train)), split(slice(n_train, B))


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


def router_purity(expert_ids: torch.Tensor, cluster_ids: torch.Tensor, *, num_experts: int,
                  num_clusters: int) -> float:
    """``Σ_e max_k n_{k,e} / N``: the share of examples whose expert's majority cluster is their
    own (clustering purity with experts as the clusters). 1 when no expert mixes clusters;
    ``1/K``-ish for routing that ignores the clusters."""
    n_KE = torch.zeros(num_clusters, num_experts, dtype=torch.float64)
    n_KE.index_put_((cluster_ids.long().cpu(), expert_ids.long().cpu()),
                    torch.ones(expert_ids.numel(), dtype=torch.float64), accumulate=True)
    return float(n_KE.max(0).values.sum() / n_KE.sum().clamp_min(1))


def train_regression(model: nn.Module, data: LatentClusterData, *, steps: int = 1500, lr: float = 1e-2) -> float:
    """Full-batch Adam on ``MSE + aux_loss(model)``; returns the final training MSE."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    mse = torch.zeros(())
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        mse = F.mse_loss(model(data.x), data.y)
        (mse + aux_loss(model)).backward()
        opt.step()
    return mse.item()


@dataclass(frozen=True)
class R7Result:
    model: str
    seed: int
    test_mse: float
    purity: Optional[float]        # routed models only
    seconds: float


def run_r7(*, seed: int = 0, steps: int = 1500, lr: float = 1e-2, data=None, **data_kwargs) -> dict:
    """Train the learned-routing MoE, the hash-routing MoE and a dense linear map on one draw of
    the R7 data; ``{"learned" | "hash" | "dense": R7Result}`` scored on the test split."""
    if data is not None and data_kwargs:
        raise ValueError(f"data_kwargs {sorted(data_kwargs)} only apply when data is None")
    train, test = data if data is not None else make_latent_cluster_data(seed=seed, **data_kwargs)
    with torch.random.fork_rng(devices=[]):       # the caller's global RNG is left as it was
        return _run_r7(train, test, seed, steps, lr)


def _run_r7(train, test, seed, steps, lr) -> dict:
    K = int(torch.cat([train.cluster, test.cluster]).max()) + 1
    out = {}
    for name in ("learned", "hash", "dense"):
        torch.manual_seed(seed)
        D = train.x.shape[1]
        net = nn.Linear(D, D) if name == "dense" else LatentClusterMoE(routing=name, d_model=D, seed=seed)
        t0 = time.perf_counter()
        train_regression(net, train, steps=steps, lr=lr)
        secs = time.perf_counter() - t0
        net.eval()
        with torch.no_grad():
            mse = F.mse_loss(net(test.x), test.y).item()
        purity = None
        if name != "dense":
            purity = router_purity(net.experts_of(test.x), test.cluster, num_experts=net.moe.num_experts,
                                   num_clusters=K)
        out[name] = R7Result(model=name, seed=seed, test_mse=mse, purity=purity, seconds=secs)
    return out
