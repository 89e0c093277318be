"""The synthetic data of the two reproductions: R1's patch clusters and R7's latent clusters.

Legend: B examples, D input dim, P patches, d patch length (D = P·d), K clusters.

R1 (Chen, Deng, Wu, Gu & Li 2022, NeurIPS; facts from the official code ``uclaml/MoE``):
examples of P = 4 patches in R^50 — a label-signed cluster feature ``α·y·v_k``, a cluster centre
``β·c_k``, a Gaussian noise patch and a feature-noise patch ``±γ·v_k'`` of another cluster —
shuffled and scaled by 10 (`make_cluster_data`). R7 (Dikkala et al. 2023, EMNLP; parameters are
ours, METHODS [D]): x from K = 8 well-separated Gaussians in R^32, ``y = A_k x + b_k + noise``
(`make_latent_cluster_data`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["PATCH_KINDS", "R1Setting", "R1_SETTINGS", "ClusterData", "make_cluster_data", "LatentClusterData",
           "make_latent_cluster_data"]

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
