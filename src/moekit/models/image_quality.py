"""Image-quality losses and metrics of super-resolution: SSIM, NCC, PSNR — Swin2-MoSE's losses
(METHODS.md CV2: NCC + SSIM, weights 1 and 1) and its metrics.

Legend: B images, C channels (bands), H×W image size.

- `ssim`: the structural similarity of Wang, Bovik, Sheikh & Simoncelli (2004, IEEE TIP) with
  their constants and window (an 11×11 Gaussian of σ = 1.5, ``K1 = 0.01``, ``K2 = 0.03``,
  ``L = data_range``), local statistics over the *valid* window positions (no padding), the
  SSIM map averaged over positions and channels, per image. The same choices as ``piq.ssim``
  (used by the official Swin2-MoSE code) on images of at most 256 px, and as
  ``skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False)``.
- `ssim_loss`: ``1 − mean_B ssim``.
- `ncc`: the normalised cross-correlation (Pearson coefficient) of each image's channel with
  the target's, averaged over channels, per image. The official code's ``cc_loss`` is
  ``1 − (ncc + 1) / 2``; it flattens the whole batch per channel with ``view(C, -1)``, which for
  B > 1 mixes images — here each image and band counts alone (`ncc_loss`).
- `psnr`: ``10 log10(max² / MSE)`` per image (from `moekit.models.superres`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from moekit.models.superres import psnr
from moekit.validate import check_int, check_number

__all__ = ["gaussian_window", "ssim", "ssim_loss", "ncc", "ncc_loss", "psnr"]


def _check_pair(pred: torch.Tensor, target: torch.Tensor) -> None:
    for name, x in (("pred", pred), ("target", target)):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() != 4:
            what = f"{x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name} must be a float tensor of shape (B, C, H, W), got {what}")
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}")


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """(size,) float64 Gaussian weights summing to 1 (the separable factor of the 2-D window)."""
    check_int("size", size, min=1)
    sigma = check_number("sigma", sigma, min=0, min_open=True)
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    w = torch.exp(-x ** 2 / (2 * sigma ** 2))
    return w / w.sum()


def ssim(pred: torch.Tensor, target: torch.Tensor, *, data_range: float = 1.0, window_size: int = 11,
         sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """(B,) SSIM of each image of `pred` against `target`, both (B, C, H, W) with H, W ≥ `window_size`.

    ``SSIM = (2 μx μy + c1)(2 σxy + c2) / ((μx² + μy² + c1)(σx² + σy² + c2))`` with
    ``c1 = (k1 L)²``, ``c2 = (k2 L)²`` and Gaussian-weighted local moments; computed in the
    inputs' dtype promoted to at least float32, with gradient.
    """
    _check_pair(pred, target)
    data_range = check_number("data_range", data_range, min=0, min_open=True)
    check_int("window_size", window_size, min=1)
    if min(pred.shape[-2:]) < window_size:
        raise ValueError(f"images must be at least window_size={window_size} px on each side, "
                         f"got {tuple(pred.shape[-2:])}")
    dtype = torch.promote_types(pred.dtype, torch.float32)
    x, y = pred.to(dtype), target.to(dtype)
    B, C, H, W = x.shape
    g = gaussian_window(window_size, sigma).to(dtype=dtype, device=x.device)
    kernel = (g[:, None] * g[None, :]).expand(C, 1, window_size, window_size)

    def blur(t: torch.Tensor) -> torch.Tensor:                  # (B, C, H, W) → (B, C, H-ws+1, W-ws+1)
        return F.conv2d(t, kernel, groups=C)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x ** 2
    var_y = blur(y * y) - mu_y ** 2
    cov_xy = blur(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(1)


def ssim_loss(pred: torch.Tensor, target: torch.Tensor, **kwargs) -> torch.Tensor:
    """``1 − mean_B ssim(pred, target)`` (keyword arguments as `ssim`)."""
    return 1 - ssim(pred, target, **kwargs).mean()


def ncc(pred: torch.Tensor, target: torch.Tensor, *, eps: float = 1e-8) -> torch.Tensor:
    """(B,) mean over channels of the Pearson correlation of each (image, channel) with the target's.

    `eps` keeps a constant channel finite (its correlation is then 0).
    """
    _check_pair(pred, target)
    eps = check_number("eps", eps, min=0)
    dtype = torch.promote_types(pred.dtype, torch.float32)
    x = pred.to(dtype).flatten(2)                                 # (B, C, H·W)
    y = target.to(dtype).flatten(2)
    x = x - x.mean(-1, keepdim=True)
    y = y - y.mean(-1, keepdim=True)
    r_BC = (x * y).sum(-1) / torch.sqrt((x * x).sum(-1) * (y * y).sum(-1) + eps)
    return r_BC.mean(1)


def ncc_loss(pred: torch.Tensor, target: torch.Tensor, **kwargs) -> torch.Tensor:
    """``1 − (mean_B ncc + 1) / 2`` in [0, 1], the official ``cc_loss`` (keyword arguments as `ncc`)."""
    return 1 - (ncc(pred, target, **kwargs).mean() + 1) / 2
