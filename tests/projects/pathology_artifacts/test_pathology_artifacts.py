"""The pathology artifact study (projects/pathology_artifacts): the seeded artifact generators,
tile sets split by source, held-out labelling, and the --quick path on tiny synthetic images."""
import numpy as np
import pytest

from moekit.models.pathology import tissue_mask
from projects.pathology_artifacts import data as D
from projects.pathology_artifacts import run as patho_run


def _he(h, w, seed):
    """A fake H&E field: pink stroma with purple 'nuclei' blobs, uint8 RGB."""
    rng = np.random.default_rng(seed)
    img = np.empty((h, w, 3), np.float32)
    img[:] = (215, 140, 185)
    yy, xx = np.mgrid[0:h, 0:w]
    for _ in range(h * w // 120):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(2, 4)
        img[np.hypot(yy - cy, xx - cx) < r] = (110, 60, 150)
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("name", D.ARTIFACTS)
def test_generators_are_seeded_and_change_the_tile(name):
    tile = _he(D.TILE, D.TILE, 0)
    gen = D.GENERATORS[name]
    a, b = gen(tile, np.random.default_rng(3)), gen(tile, np.random.default_rng(3))
    assert a.dtype == np.uint8 and a.shape == tile.shape and (a == b).all()
    assert np.abs(a.astype(int) - tile).mean() > 2


def test_generators_do_what_they_say():
    tile = _he(D.TILE, D.TILE, 1)
    rng = np.random.default_rng(0)
    hf = lambda t: np.abs(np.diff(t.astype(float), axis=1)).mean()
    assert hf(D.blur(tile, rng)) < 0.6 * hf(tile)                       # fewer sharp edges
    assert D.fold(tile, rng).mean() < tile.mean()                       # two layers absorb more light
    glass = lambda t: (~tissue_mask(t)).mean()
    assert glass(D.damage(tile, rng)) > glass(tile)                     # tears show bare glass
    assert glass(D.bubble(tile, rng)) >= glass(tile)


def test_tile_sets_are_balanced_and_split_by_source():
    images = {n: _he(96, 96, i) for i, n in enumerate(sum(D.SPLITS.values(), ()))}
    sets = D.build_tile_sets(images, {}, seed=0)
    for split in ("train", "val", "test"):
        tiles, labels = getattr(sets, split)
        counts = np.bincount(labels, minlength=5)
        assert (counts == counts[0]).all() and counts[0] > 0
        assert set(sets.sources[split]) == set(D.SPLITS[split])
    assert not set(D.SPLITS["train"]) & (set(D.SPLITS["val"]) | set(D.SPLITS["test"]))
    assert not set(D.SPLITS["val"]) & set(D.SPLITS["test"])


def test_held_out_tiles_follow_the_mask():
    img = _he(64, 96, 2)
    mask = np.zeros((64, 96), bool)
    mask[:, :32] = True                 # first tile column: artifact
    mask[:, 40] = True                  # a sliver (3 % of a tile): ambiguous, left out
    tiles, is_art = D.held_out_tiles(img, mask, tile=32)
    assert len(tiles) == 2 * 2 and is_art.sum() == 2


@pytest.mark.slow     # about 40 s on the loaded 2-core machine (over the 20 s budget for default CI)
def test_quick_path_runs_on_tiny_synthetic_images(tmp_path):
    images = {n: _he(64, 64, i) for i, n in enumerate(sum(D.SPLITS.values(), ()))}
    images["target_image.png"] = _he(96, 96, 9)
    masks = {}
    for i, n in enumerate(D.HELD_OUT):
        images[n] = _he(64, 64, 20 + i)
        masks[n] = np.zeros((64, 64), bool)
        masks[n][:32, :32] = True
    out = patho_run.main(["--quick", "--steps", "2", "--batch-size", "8", "--out", str(tmp_path)],
                         images=images, masks=masks)
    res = out["by_seed"][0]
    assert set(res["detectors"]) == {"CNN-MoE", "CNN multiclass", "VIT-MoE", "VIT multiclass"}
    for name, r in res["detectors"].items():
        assert 0 <= r["threshold"] <= 1
        assert r["tuned"]["sensitivity"] >= r["t0.5"]["sensitivity"] or r["threshold"] < 0.5
    # An MoE runs all four experts: four times the multiclass net's MACs (one extra output of the head aside).
    c = res["compute"]
    assert abs(c["CNN-MoE"]["macs"] / c["CNN multiclass"]["macs"] - 4) < 0.05
    assert (tmp_path / "results.json").exists() and (tmp_path / "pen_green_artifacts.png").exists()
