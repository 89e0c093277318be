"""Artifact detection in histopathology with a mixture of independently trained binary experts.

Legend: B tiles in a batch, C channels, H height, W width, K artifact types, N tiles of a slide.

Kanwal et al. (2024, "Equipping computational pathology systems with artifact processing
pipelines: a showcase for computation and performance trade-offs"; METHODS.md CV3): one binary
expert per artifact type (damaged tissue, blur, folded tissue, air bubbles, blood), each trained
alone on "artifact k vs artifact-free" tiles; no learned router — every expert sees every tile
and a fusion step combines their K probabilities; a probabilistic threshold on the fused
artifact-free probability, tuned on validation data, trades specificity for sensitivity; the
slide pipeline tiles a whole-slide image, skips background and returns an artifact map,
per-artifact reports and an artifact-free mask. Backbones: small DCNNs (MobileNet family) or
ViTs; baseline: one multiclass model.

Fusion (the paper's exact rule is not pinned down, METHODS §18.7; this is our reading):
``p_free = min_k (1 - p_k)`` ("min", the default: a tile is artifact-free only when every
expert says so — at threshold 0.5 this is exactly "all K experts predict artifact-free") or
``p_free = Π_k (1 - p_k)`` ("product": independent experts). Decision: artifact-free when
``p_free ≥ t``, else the artifact whose expert is most confident (lowest index on ties). A
multiclass model over ``[free, artifact_1 … artifact_K]`` gives ``p_free`` and ``p_k`` from its
softmax and goes through the same decision, so the two are compared alike.
"""
from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from moekit.models.vision import ViTConfig, ViTMoE
from moekit.optim import UpdateStep, build_optimizer
from moekit.validate import check_choice, check_instance, check_int, check_number, check_tensor

__all__ = ["FUSIONS", "MobileNetTiny", "vit_tile_classifier", "fuse_free_probability", "decide",
           "tune_threshold", "sensitivity_specificity", "BinaryExpertMoE", "MulticlassDetector",
           "fit_tile_classifier", "tiles_to_tensor", "tile_grid", "extract_tiles", "tissue_mask",
           "SlideResult", "detect_slide", "save_overlays", "classifier_macs", "latency_per_tile"]

FUSIONS = ("min", "product")
BACKGROUND = -1          # tile label of background (skipped) tiles in a `SlideResult`


# ---------------------------------------------------------------------------------------------
# Backbones
# ---------------------------------------------------------------------------------------------

class _InvertedResidual(nn.Module):
    """MobileNetV2 block: 1×1 expand → 3×3 depthwise (stride s) → 1×1 linear projection,
    with the identity shortcut when shape is kept (Sandler et al. 2018)."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand: int):
        super().__init__()
        hidden = c_in * expand
        self.body = nn.Sequential(
            nn.Conv2d(c_in, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, c_out, 1, bias=False), nn.BatchNorm2d(c_out))
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        y = self.body(x_BCHW)
        return x_BCHW + y if self.residual else y


class MobileNetTiny(nn.Module):
    """A small MobileNetV2-style DCNN: ``(B, C, H, W) in [0, 1] → logits (B, num_classes)``.

    A 3×3 stride-2 stem to ``widths[0]``, then per further width one stride-2 inverted-residual
    block and one stride-1 block, global average pooling and a linear head.
    """

    def __init__(self, *, num_classes: int, in_channels: int = 3, widths: Sequence[int] = (16, 24, 32, 64),
                 expand: int = 4):
        super().__init__()
        check_int("num_classes", num_classes, min=1)
        check_int("in_channels", in_channels, min=1)
        check_int("expand", expand, min=1)
        widths = list(widths)
        if not widths:
            raise ValueError("widths must name at least one width, got []")
        for i, w in enumerate(widths):
            check_int(f"widths[{i}]", w, min=1)
        layers = [nn.Conv2d(in_channels, widths[0], 3, 2, 1, bias=False), nn.BatchNorm2d(widths[0]),
                  nn.ReLU6(inplace=True)]
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            layers += [_InvertedResidual(c_in, c_out, 2, expand), _InvertedResidual(c_out, c_out, 1, expand)]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(widths[-1], num_classes)
        self.in_channels = in_channels

    def forward(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        check_tensor("images", images_BCHW, shape=(None, self.in_channels, None, None), floating=True)
        return self.head(self.features(images_BCHW).mean((2, 3)))     # (B, L)


class _ViTLogits(nn.Module):
    """`ViTMoE` returning logits only, so every backbone has one signature."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.vit = ViTMoE(config)

    def forward(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        return self.vit(images_BCHW)[0]


def vit_tile_classifier(*, image_size: int, num_classes: int, patch_size: int = 8, d_model: int = 64,
                        n_layers: int = 3, n_heads: int = 4, in_channels: int = 3) -> nn.Module:
    """A small dense ViT (moekit's `ViTMoE` with no MoE block, mean-pooled) as a tile classifier:
    ``(B, C, image_size, image_size) → logits (B, num_classes)``."""
    config = ViTConfig(image_size=image_size, patch_size=patch_size, in_channels=in_channels,
                       num_classes=num_classes, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                       pool="mean", moe_every=0)
    return _ViTLogits(config)


# ---------------------------------------------------------------------------------------------
# Fusion, decision and the sensitivity threshold
# ---------------------------------------------------------------------------------------------

def fuse_free_probability(p_artifact_BK: torch.Tensor, fusion: str = "min") -> torch.Tensor:
    """Artifact-free probability (B,) from the K experts' artifact probabilities (B, K):
    ``min_k (1 - p_k)`` ("min") or ``Π_k (1 - p_k)`` ("product")."""
    check_choice("fusion", fusion, FUSIONS)
    check_tensor("p_artifact", p_artifact_BK, shape=(None, None), floating=True)
    if p_artifact_BK.shape[1] == 0:
        raise ValueError("p_artifact must hold at least one expert's column, got shape "
                         f"{tuple(p_artifact_BK.shape)}")
    free_BK = 1 - p_artifact_BK
    return free_BK.min(1).values if fusion == "min" else free_BK.prod(1)


def decide(p_free_B: torch.Tensor, p_artifact_BK: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Tile labels (B,) long: 0 = artifact-free when ``p_free ≥ threshold``, else ``1 + argmax_k p_k``
    (the most confident expert; the lowest index on ties)."""
    threshold = check_number("threshold", threshold, min=0, max=1)
    check_tensor("p_free", p_free_B, shape=(None,), floating=True)
    check_tensor("p_artifact", p_artifact_BK, shape=(p_free_B.shape[0], None), floating=True)
    artifact_B = 1 + p_artifact_BK.argmax(1)          # torch's argmax returns the first maximum
    return torch.where(p_free_B >= threshold, torch.zeros_like(artifact_B), artifact_B)


def tune_threshold(p_free_N: torch.Tensor, is_artifact_N: torch.Tensor, *, sensitivity: float = 0.95) -> float:
    """The smallest threshold t whose decision ``artifact when p_free < t`` flags at least the
    fraction `sensitivity` of the validation artifacts (the positives).

    Smallest, so that as few artifact-free tiles as possible are lost for that sensitivity: with
    ``m = ceil(sensitivity · n_pos)`` and ``s`` the positives' p_free in ascending order, t is the
    next float above ``s[m-1]`` (any lower t flags fewer than m positives). Capped at 1.
    """
    sensitivity = check_number("sensitivity", sensitivity, min=0, max=1)
    check_tensor("p_free", p_free_N, shape=(None,), floating=True)
    check_tensor("is_artifact", is_artifact_N, shape=(p_free_N.shape[0],))
    positives = p_free_N[is_artifact_N.bool()].sort().values
    if positives.numel() == 0:
        raise ValueError("tune_threshold needs at least one artifact tile in is_artifact, got none")
    m = math.ceil(sensitivity * positives.numel() - 1e-9)
    if m == 0:
        return 0.0
    # The next float of p_free's own dtype, so that `decide` (comparing in that dtype) counts
    # the m-th positive; it is exact as a Python float.
    t = float(torch.nextafter(positives[m - 1], positives.new_tensor(math.inf)))
    return min(t, 1.0)


def sensitivity_specificity(pred_artifact_N: torch.Tensor, is_artifact_N: torch.Tensor) -> dict:
    """Artifact-vs-free metrics with "artifact" positive: sensitivity (recall), specificity,
    precision and F1 (NaN where undefined)."""
    pred, true = pred_artifact_N.bool(), is_artifact_N.bool()
    tp = int((pred & true).sum())
    fp = int((pred & ~true).sum())
    fn = int((~pred & true).sum())
    tn = int((~pred & ~true).sum())
    div = lambda a, b: a / b if b else float("nan")
    sens, prec = div(tp, tp + fn), div(tp, tp + fp)
    f1 = div(2 * tp, 2 * tp + fp + fn)
    return {"sensitivity": sens, "specificity": div(tn, tn + fp), "precision": prec, "f1": f1,
            "tp": tp, "fp": fp, "fn": fn, "tn": tn}


# ---------------------------------------------------------------------------------------------
# Detectors: the binary-expert MoE and the multiclass baseline, one interface
# ---------------------------------------------------------------------------------------------

class BinaryExpertMoE(nn.Module):
    """K independently trained binary experts (logits (B, 2), class 1 = artifact) and their fusion.

    ``probabilities(x) -> (p_free_B, p_artifact_BK)``; ``forward(x)`` = `decide` at ``threshold``.
    Every expert sees every tile (no router): compute is the sum of the experts'.
    """

    def __init__(self, experts: Mapping[str, nn.Module], *, fusion: str = "min", threshold: float = 0.5):
        super().__init__()
        check_instance("experts", experts, Mapping, what="a mapping of artifact name to binary expert")
        if not experts:
            raise ValueError("experts must hold at least one binary expert, got none")
        for name, expert in experts.items():
            check_instance(f"experts[{name!r}]", expert, nn.Module)
        self.names = list(experts)
        self.experts = nn.ModuleList(experts.values())
        self.fusion = check_choice("fusion", fusion, FUSIONS)
        self.threshold = check_number("threshold", threshold, min=0, max=1)

    def probabilities(self, images_BCHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p_BK = torch.stack([expert(images_BCHW).float().softmax(-1)[:, 1] for expert in self.experts], 1)
        return fuse_free_probability(p_BK, self.fusion), p_BK

    def forward(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        return decide(*self.probabilities(images_BCHW), self.threshold)


class MulticlassDetector(nn.Module):
    """One classifier over ``[artifact-free, names…]`` (logits (B, K + 1)), behind the interface of
    `BinaryExpertMoE`: ``p_free`` and ``p_k`` are its softmax."""

    def __init__(self, model: nn.Module, names: Sequence[str], *, threshold: float = 0.5):
        super().__init__()
        check_instance("model", model, nn.Module)
        self.names = list(names)
        if not self.names:
            raise ValueError("names must hold at least one artifact type, got []")
        self.model = model
        self.threshold = check_number("threshold", threshold, min=0, max=1)

    def probabilities(self, images_BCHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs_BL = self.model(images_BCHW).float().softmax(-1)
        if probs_BL.shape[1] != len(self.names) + 1:
            raise ValueError(f"model must output {len(self.names) + 1} logits (free + {len(self.names)} artifacts), "
                             f"got {probs_BL.shape[1]}")
        return probs_BL[:, 0], probs_BL[:, 1:]

    def forward(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        return decide(*self.probabilities(images_BCHW), self.threshold)


Detector = Union[BinaryExpertMoE, MulticlassDetector]


def fit_tile_classifier(model: nn.Module, images_NCHW: torch.Tensor, labels_N: torch.Tensor, *, steps: int,
                        batch_size: int = 64, lr: float = 2e-3, weight_decay: float = 1e-4, seed: int = 0,
                        augment: bool = True) -> list[float]:
    """Train a tile classifier with cross-entropy (AdamW, cosine decay to 0; `moekit.optim`).

    A binary expert is this on ``{0: free, 1: its artifact}`` tiles only — experts never see each
    other's data (independent training); the multiclass baseline on all K + 1 classes.
    ``augment``: a random dihedral transform per batch (flips and 90° turns: tissue has no
    orientation). Returns the loss of each step.
    """
    check_int("steps", steps, min=1)
    check_int("batch_size", batch_size, min=1)
    check_tensor("images", images_NCHW, shape=(None, None, None, None), floating=True)
    check_tensor("labels", labels_N, shape=(images_NCHW.shape[0],))
    if images_NCHW.shape[0] == 0:
        raise ValueError("images must hold at least one tile, got 0")
    gen = torch.Generator().manual_seed(seed)
    optimizer = build_optimizer(model, name="adamw", lr=lr, weight_decay=weight_decay)
    update = UpdateStep(model, optimizer, lr=lr, total_steps=steps, schedule="cosine", min_lr_ratio=0.0)
    model.train()
    losses = []
    n = images_NCHW.shape[0]
    for _ in range(steps):
        idx = torch.randint(n, (min(batch_size, n),), generator=gen)
        x = images_NCHW[idx]
        if augment:
            k, flip = torch.randint(4, (1,), generator=gen).item(), torch.randint(2, (1,), generator=gen).item()
            x = torch.rot90(x, k, (2, 3))
            x = x.flip(3) if flip else x
        loss = F.cross_entropy(model(x).float(), labels_N[idx].long())
        losses.append(update(loss)["loss"])
    model.eval()
    return losses


# ---------------------------------------------------------------------------------------------
# The slide pipeline: tiling, tissue detection, maps, reports, masks
# ---------------------------------------------------------------------------------------------

def tiles_to_tensor(tiles_NHWC: np.ndarray) -> torch.Tensor:
    """uint8 RGB tiles (N, H, W, C) → float (N, C, H, W) in [0, 1]."""
    tiles_NHWC = np.asarray(tiles_NHWC)
    if tiles_NHWC.ndim != 4 or tiles_NHWC.dtype != np.uint8:
        raise ValueError(f"tiles must be a uint8 (N, H, W, C) array, got {tiles_NHWC.dtype} {tiles_NHWC.shape}")
    return torch.from_numpy(np.ascontiguousarray(tiles_NHWC)).permute(0, 3, 1, 2).float().div(255)


def tile_grid(height: int, width: int, tile: int) -> np.ndarray:
    """Boxes ``(y0, x0, y1, x1)`` (N, 4) of non-overlapping ``tile × tile`` tiles in row-major
    order, the last row and column clipped to the image: every pixel lies in exactly one box."""
    check_int("height", height, min=1)
    check_int("width", width, min=1)
    check_int("tile", tile, min=1)
    ys, xs = np.arange(0, height, tile), np.arange(0, width, tile)
    y0, x0 = np.meshgrid(ys, xs, indexing="ij")
    y0, x0 = y0.ravel(), x0.ravel()
    return np.stack([y0, x0, np.minimum(y0 + tile, height), np.minimum(x0 + tile, width)], 1)


def extract_tiles(image_HWC: np.ndarray, boxes_N4: np.ndarray, tile: int, *, fill: int = 255) -> np.ndarray:
    """The tiles (N, tile, tile, C) of `boxes`, clipped edge tiles padded with `fill` (white glass)."""
    image_HWC = _check_image(image_HWC)
    out = np.full((len(boxes_N4), tile, tile, image_HWC.shape[2]), fill, dtype=np.uint8)
    for i, (y0, x0, y1, x1) in enumerate(boxes_N4):
        out[i, :y1 - y0, :x1 - x0] = image_HWC[y0:y1, x0:x1]
    return out


def tissue_mask(image_HWC: np.ndarray, *, saturation: float = 0.07, brightness: float = 0.82) -> np.ndarray:
    """Tissue pixels (H, W) bool of an RGB H&E image: stained (HSV saturation > `saturation`) or
    dark (value < `brightness`); bright unstained glass is background."""
    image_HWC = _check_image(image_HWC)
    saturation = check_number("saturation", saturation, min=0, max=1)
    brightness = check_number("brightness", brightness, min=0, max=1)
    rgb = image_HWC[..., :3].astype(np.float32) / 255
    vmax, vmin = rgb.max(-1), rgb.min(-1)
    sat = (vmax - vmin) / np.maximum(vmax, 1e-6)
    return (sat > saturation) | (vmax < brightness)


def _check_image(image_HWC) -> np.ndarray:
    image_HWC = np.asarray(image_HWC)
    if image_HWC.ndim != 3 or image_HWC.dtype != np.uint8 or image_HWC.shape[2] < 3:
        raise ValueError(f"image must be a uint8 (H, W, C ≥ 3) RGB array, got {image_HWC.dtype} {image_HWC.shape}")
    return image_HWC


@dataclass
class SlideResult:
    """What `detect_slide` returns for one image.

    boxes: (N, 4) tile boxes ``(y0, x0, y1, x1)``; tissue: (N,) tiles that were classified;
    p_free (N,) and p_artifact (N, K): NaN on background tiles; labels: (N,) −1 background,
    0 artifact-free, k ≥ 1 artifact ``names[k-1]``; label_map: (H, W) the tile labels painted
    on the image; artifact_free_mask: (H, W) tissue pixels of artifact-free tiles (what
    downstream diagnosis may use); report: per artifact name (and ``"artifact_free"``) the
    number of tiles and their share of the tissue tiles.
    """

    names: list[str]
    boxes: np.ndarray
    tissue: np.ndarray
    p_free: np.ndarray
    p_artifact: np.ndarray
    labels: np.ndarray
    label_map: np.ndarray
    artifact_free_mask: np.ndarray
    report: dict = field(default_factory=dict)


@torch.no_grad()
def detect_slide(detector: Detector, image_HWC: np.ndarray, *, tile: int, threshold: Optional[float] = None,
                 min_tissue: float = 0.25, batch_size: int = 128) -> SlideResult:
    """Tile `image`, skip tiles with less than `min_tissue` tissue pixels (`tissue_mask`), classify
    the rest with `detector` (a `BinaryExpertMoE` or `MulticlassDetector`; ``threshold`` default:
    the detector's) and paint the results (see `SlideResult`)."""
    check_instance("detector", detector, (BinaryExpertMoE, MulticlassDetector))
    image_HWC = _check_image(image_HWC)
    threshold = detector.threshold if threshold is None else check_number("threshold", threshold, min=0, max=1)
    min_tissue = check_number("min_tissue", min_tissue, min=0, max=1)
    H, W = image_HWC.shape[:2]
    boxes = tile_grid(H, W, tile)
    tissue_px = tissue_mask(image_HWC)
    frac = np.array([tissue_px[y0:y1, x0:x1].mean() for y0, x0, y1, x1 in boxes])
    tissue = frac >= min_tissue if min_tissue > 0 else frac > 0
    K = len(detector.names)
    p_free = np.full(len(boxes), np.nan)
    p_art = np.full((len(boxes), K), np.nan)
    labels = np.full(len(boxes), BACKGROUND, dtype=np.int64)
    idx = np.flatnonzero(tissue)
    detector.eval()
    for start in range(0, len(idx), batch_size):
        chunk = idx[start:start + batch_size]
        x = tiles_to_tensor(extract_tiles(image_HWC, boxes[chunk], tile))
        pf, pa = detector.probabilities(x)
        p_free[chunk], p_art[chunk] = pf.double().numpy(), pa.double().numpy()
        labels[chunk] = decide(pf, pa, threshold).numpy()
    label_map = np.full((H, W), BACKGROUND, dtype=np.int16)
    for (y0, x0, y1, x1), lab in zip(boxes, labels):
        label_map[y0:y1, x0:x1] = lab
    free_mask = (label_map == 0) & tissue_px
    n_tissue = max(1, len(idx))
    report = {"artifact_free": {"tiles": int((labels == 0).sum()), "share": float((labels == 0).sum() / n_tissue)}}
    for k, name in enumerate(detector.names, start=1):
        report[name] = {"tiles": int((labels == k).sum()), "share": float((labels == k).sum() / n_tissue)}
    report["tissue_tiles"], report["background_tiles"] = int(len(idx)), int(len(boxes) - len(idx))
    return SlideResult(detector.names, boxes, tissue, p_free, p_art, labels, label_map, free_mask, report)


# Overlay colours (RGB) of artifact-free and of up to eight artifact types.
_FREE_RGB = (40, 170, 60)
_ARTIFACT_RGB = [(230, 25, 75), (0, 130, 200), (255, 150, 0), (145, 30, 180), (70, 240, 240), (240, 50, 230),
                 (128, 128, 0), (0, 0, 128)]


def save_overlays(image_HWC: np.ndarray, result: SlideResult, out_dir: Union[str, os.PathLike], *,
                  stem: str = "slide", alpha: float = 0.45) -> dict:
    """Write ``{stem}_artifacts.png`` (the artifact map blended over the image, free tiles green,
    each artifact its colour, background untouched) and ``{stem}_free_mask.png`` (the
    artifact-free mask, white = usable) into `out_dir`; return ``{"overlay": path, "mask": path,
    "colours": {name: rgb}}``. Needs Pillow (a dependency of matplotlib, the ``plots`` extra)."""
    from PIL import Image  # optional dependency, imported only here

    image_HWC = _check_image(image_HWC)[..., :3]
    alpha = check_number("alpha", alpha, min=0, max=1)
    if result.label_map.shape != image_HWC.shape[:2]:
        raise ValueError(f"result is of a {result.label_map.shape} image, got image {image_HWC.shape[:2]}")
    colours = {"artifact_free": _FREE_RGB}
    colour_HWC = np.zeros_like(image_HWC)
    colour_HWC[result.label_map == 0] = _FREE_RGB
    for k, name in enumerate(result.names, start=1):
        colours[name] = _ARTIFACT_RGB[(k - 1) % len(_ARTIFACT_RGB)]
        colour_HWC[result.label_map == k] = colours[name]
    a = np.where(result.label_map[..., None] >= 0, alpha, 0.0)
    blend = (image_HWC * (1 - a) + colour_HWC * a).round().astype(np.uint8)
    os.makedirs(out_dir, exist_ok=True)
    overlay = os.path.join(out_dir, f"{stem}_artifacts.png")
    mask = os.path.join(out_dir, f"{stem}_free_mask.png")
    Image.fromarray(blend).save(overlay)
    Image.fromarray(result.artifact_free_mask.astype(np.uint8) * 255).save(mask)
    return {"overlay": overlay, "mask": mask, "colours": colours}


# ---------------------------------------------------------------------------------------------
# Compute: multiply-accumulates and latency per tile
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def classifier_macs(model: nn.Module, image_shape: Sequence[int]) -> int:
    """Multiply-accumulates of one forward pass on one ``(C, H, W)`` image: every `nn.Conv2d`
    (``out elements · C_in/groups · kh · kw``), `nn.Linear` (``rows · in · out``) and
    `nn.MultiheadAttention` (projections ``4 · S · D²`` and attention ``2 · S² · D`` per image);
    norms, activations and pooling not counted. A `BinaryExpertMoE` counts all its experts."""
    total = [0]

    def conv(m, inp, out):
        total[0] += out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    def linear(m, inp, out):
        total[0] += out.numel() * m.in_features

    def attention(m, inp, out):
        q = inp[0]
        S, D = (q.shape[1], q.shape[2]) if m.batch_first else (q.shape[0], q.shape[2])
        B = q.numel() // (S * D)
        total[0] += B * (4 * S * D * D + 2 * S * S * D)

    hooks = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv))
        elif isinstance(m, nn.MultiheadAttention):
            hooks.append(m.register_forward_hook(attention))
        elif isinstance(m, nn.Linear) and not _inside_attention(model, m):
            hooks.append(m.register_forward_hook(linear))
    was_training = model.training
    model.eval()
    try:
        x = torch.rand(1, *image_shape)
        model.probabilities(x) if hasattr(model, "probabilities") else model(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return total[0]


def _inside_attention(model: nn.Module, linear: nn.Linear) -> bool:
    # MultiheadAttention's out_proj is a Linear that attention calls functionally; it is counted there.
    return any(isinstance(m, nn.MultiheadAttention) and m.out_proj is linear for m in model.modules())


@torch.no_grad()
def latency_per_tile(detector: nn.Module, image_shape: Sequence[int], *, batch_size: int = 64,
                     repeats: int = 5) -> float:
    """Median seconds per tile of ``detector.probabilities`` (or ``detector(x)``) on batches of
    `batch_size` random tiles, after one warm-up batch."""
    check_int("repeats", repeats, min=1)
    x = torch.rand(batch_size, *image_shape)
    run = detector.probabilities if hasattr(detector, "probabilities") else detector
    detector.eval()
    run(x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run(x)
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) / batch_size
