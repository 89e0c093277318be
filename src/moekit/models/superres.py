"""×s single-image super-resolution: bicubic, an ESPCN-style CNN, and its CondConv MoE twin; PSNR.

Legend: B batch, C image channels, H×W low-res size, sH×sW high-res size, Fc feature channels
(the CNN's width), E experts, s scale.

- `bicubic_upsample`: the classical baseline, ``F.interpolate(mode="bicubic")``.
- `SRNet`: ESPCN (Shi et al. 2016, CVPR, "Real-Time Single Image and Video Super-Resolution
  Using an Efficient Sub-Pixel Convolutional Neural Network"): all convolutions run at low
  resolution and the last one emits ``C · s²`` channels that ``nn.PixelShuffle(s)`` rearranges
  into the ``sH × sW`` image. Departure from ESPCN: 3×3 convolutions with ReLU (ESPCN: 5-3-3
  with tanh) and the network predicts a residual over bicubic upsampling (as in VDSR, Kim et al.
  2016), with its last convolution zero-initialised so an untrained model *is* bicubic.
- ``SRNet(num_experts=E)``: the middle convolutions are `CondConv2d` (Yang et al. 2019,
  NeurIPS, "CondConv: Conditionally Parameterized Convolutions for Efficient Inference"): each
  image gets its own kernel ``Σ_e sigmoid(GAP(x) R + b)_e W_e``, E× the middle parameters at
  about one convolution's FLOPs. This is CondConv placed in ESPCN, not a reproduction of any
  published MoE super-resolution model (those — e.g. SeemoRe, Zamfir et al. 2024, a mixture of
  low-rank experts — differ in architecture and scale).
- `condconv_from_dense`: an MoE `SRNet` whose every expert is a copy of a dense net's middle
  kernel and whose routing is fixed at ``1/E`` per expert — so ``Σ_e r_e W_e = W`` and it
  computes exactly the dense net (the test invariant; also an upcycling initialisation).
- `psnr`: ``10 log10(max² / MSE)`` per image, averaged over images.

The Fashion-MNIST ×2 study that trains these nets (its loop and evaluation) is
`projects/superres_condconv`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moekit.layers.condconv import CondConv2d
from moekit.validate import check_int, check_number

__all__ = ["SRNet", "bicubic_upsample", "condconv_from_dense", "downsample", "psnr", "sr_macs"]


def _check_images(name: str, x: torch.Tensor, channels: int | None = None) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() != 4:
        what = f"{x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a float tensor of shape (B, C, H, W), got {what}")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"{name} must have {channels} channel(s), got shape {tuple(x.shape)}")


def downsample(hr_BCHW: torch.Tensor, scale: int = 2) -> torch.Tensor:
    """(B, C, sH, sW) → (B, C, H, W) by s×s average pooling (the degradation of this task)."""
    _check_images("hr", hr_BCHW)
    if hr_BCHW.shape[-2] % scale or hr_BCHW.shape[-1] % scale:
        raise ValueError(f"high-res size {tuple(hr_BCHW.shape[-2:])} must be divisible by scale={scale}")
    return F.avg_pool2d(hr_BCHW, scale)


def bicubic_upsample(lr_BCHW: torch.Tensor, scale: int = 2) -> torch.Tensor:
    """(B, C, H, W) → (B, C, sH, sW), bicubic (a = -0.75, PyTorch's), unclamped."""
    _check_images("lr", lr_BCHW)
    return F.interpolate(lr_BCHW, scale_factor=scale, mode="bicubic", align_corners=False)


def psnr(pred: torch.Tensor, target: torch.Tensor, *, max_val: float = 1.0) -> torch.Tensor:
    """Mean over images of ``10 log10(max_val² / MSE_i)``, MSE_i over all of image i's values.

    ``pred`` and ``target``: (B, ...) of the same shape, the first axis indexing images. An image
    reconstructed exactly gives ``inf``. No clamping: clamp ``pred`` to the valid range first.
    """
    if not isinstance(pred, torch.Tensor) or not isinstance(target, torch.Tensor) or pred.shape != target.shape:
        raise ValueError(f"pred and target must be tensors of the same shape, got "
                         f"{getattr(pred, 'shape', type(pred))} and {getattr(target, 'shape', type(target))}")
    if pred.dim() < 2 or pred.shape[0] == 0:
        raise ValueError(f"pred must be (B, ...) with B ≥ 1 and at least one value per image, got {tuple(pred.shape)}")
    max_val = check_number("max_val", max_val, min=0, min_open=True)
    mse_B = (pred.double() - target.double()).pow(2).flatten(1).mean(dim=1)
    return (10 * torch.log10(max_val ** 2 / mse_B)).mean()


class SRNet(nn.Module):
    """``(B, C, H, W) → (B, C, sH, sW)``: ESPCN-style residual CNN over bicubic upsampling.

    Args:
        channels: C image channels.
        scale: s, the upscaling factor.
        width: Fc feature channels of the hidden convolutions.
        num_mid: how many Fc → Fc 3×3 convolutions sit between the first and the last.
        num_experts: 0 for dense ``nn.Conv2d`` middles; E ≥ 1 for `CondConv2d` middles of E experts.
    """

    def __init__(self, *, channels: int = 1, scale: int = 2, width: int = 32, num_mid: int = 2,
                 num_experts: int = 0):
        super().__init__()
        for name, v, low in (("channels", channels, 1), ("scale", scale, 1), ("width", width, 1),
                             ("num_mid", num_mid, 0), ("num_experts", num_experts, 0)):
            check_int(name, v, min=low)
        self.channels, self.scale, self.width, self.num_experts = channels, scale, width, num_experts
        self.head = nn.Conv2d(channels, width, 3, padding=1)
        self.mid = nn.ModuleList(
            CondConv2d(width, width, 3, num_experts=num_experts, padding=1) if num_experts else nn.Conv2d(width, width,
                                                                                                          3, padding=1)
            for _ in range(num_mid))
        self.tail = nn.Conv2d(width, channels * scale ** 2, 3, padding=1)
        self.shuffle = nn.PixelShuffle(scale)
        # Zero residual at init: training starts from the bicubic baseline, never below it.
        nn.init.zeros_(self.tail.weight)
        nn.init.zeros_(self.tail.bias)

    def forward(self, lr_BCHW: torch.Tensor) -> torch.Tensor:
        _check_images("lr", lr_BCHW, self.channels)
        h = F.relu(self.head(lr_BCHW))                                    # (B, Fc, H, W)
        for conv in self.mid:
            h = F.relu(conv(h))                                           # (B, Fc, H, W)
        residual = self.shuffle(self.tail(h))                             # (B, C·s², H, W) → (B, C, sH, sW)
        return bicubic_upsample(lr_BCHW, self.scale) + residual


@torch.no_grad()
def condconv_from_dense(dense: SRNet, num_experts: int) -> SRNet:
    """An `SRNet` with `num_experts` ≥ 2 CondConv experts per middle layer that equals `dense`.

    Every expert copies the dense middle kernel and bias; the routing weight is zeroed and its
    bias set to ``logit(1/E) = -log(E - 1)``, so each image's mixing weights are exactly ``1/E``
    (CondConv's sigmoid routing is not normalised, so E = 1 could only reach weight 1 in the limit).
    """
    if dense.num_experts:
        raise ValueError(f"dense must be a dense SRNet (num_experts=0), got num_experts={dense.num_experts}")
    check_int("num_experts", num_experts, min=2)
    moe = SRNet(channels=dense.channels, scale=dense.scale, width=dense.width, num_mid=len(dense.mid),
                num_experts=num_experts).to(dense.head.weight.dtype)
    moe.head.load_state_dict(dense.head.state_dict())
    moe.tail.load_state_dict(dense.tail.state_dict())
    for cond, conv in zip(moe.mid, dense.mid):
        cond.weight.copy_(conv.weight.expand_as(cond.weight))
        cond.bias.copy_(conv.bias.expand_as(cond.bias))
        cond.routing.weight.zero_()
        cond.routing.bias.fill_(-math.log(num_experts - 1))
    return moe


def sr_macs(model: SRNet, height: int, width: int) -> int:
    """Multiply-accumulates per image of low-res size H×W: the convolutions, plus for CondConv the
    per-image kernel mix ``E · |W|`` and routing ``Fc · E`` (bicubic, ReLU and pooling not counted)."""
    total = 0
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            total += m.weight.numel() * height * width
        elif isinstance(m, CondConv2d):
            kernel = m.weight[0].numel()
            total += kernel * height * width + m.num_experts * kernel + m.routing.weight.numel()
    return total
