"""The binary-expert artifact detector (METHODS.md CV3): fusion and decision against a reference
table and a plain loop, the sensitivity threshold, exact tiling, background skipping, the slide
pipeline's maps and reports, overlays, MAC counts against torch's counter, and errors."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from moekit.models.pathology import (
    BinaryExpertMoE,
    MobileNetTiny,
    MulticlassDetector,
    classifier_macs,
    decide,
    detect_slide,
    extract_tiles,
    fit_tile_classifier,
    fuse_free_probability,
    sensitivity_specificity,
    tile_grid,
    tiles_to_tensor,
    tissue_mask,
    tune_threshold,
    vit_tile_classifier,
)

PINK = (200, 120, 170)


def test_fusion_and_decision_reproduce_a_reference_table():
    # Rows: K = 3 experts' artifact probabilities; columns of the table: fusion, threshold, label.
    p = torch.tensor([[0.10, 0.20, 0.05],     # all experts say free
                      [0.10, 0.70, 0.05],     # expert 2 says artifact
                      [0.45, 0.45, 0.40],     # all free, but barely
                      [0.60, 0.80, 0.80],     # tie between experts 2 and 3 → the lower index
                      [0.00, 0.00, 0.00]])
    assert torch.allclose(fuse_free_probability(p, "min"), torch.tensor([0.80, 0.30, 0.55, 0.20, 1.0]))
    assert torch.allclose(fuse_free_probability(p, "product"),
                          torch.tensor([0.9 * 0.8 * 0.95, 0.9 * 0.3 * 0.95, 0.55 * 0.55 * 0.6, 0.4 * 0.2 * 0.2, 1.0]))
    table = {  # (fusion, threshold) -> labels (0 free, k artifact k)
        ("min", 0.5): [0, 2, 0, 2, 0],
        ("min", 0.6): [0, 2, 1, 2, 0],
        ("min", 0.9): [2, 2, 1, 2, 0],
        ("product", 0.5): [0, 2, 1, 2, 0],
        ("product", 0.0): [0, 0, 0, 0, 0],
        ("min", 1.0): [2, 2, 1, 2, 0],
    }
    for (fusion, t), want in table.items():
        got = decide(fuse_free_probability(p, fusion), p, t)
        assert got.tolist() == want, (fusion, t)


def test_min_fusion_at_one_half_is_all_experts_predicting_free():
    # The paper's reading: a tile is artifact-free only when every binary expert says so.
    g = torch.Generator().manual_seed(0)
    p = torch.rand(500, 4, generator=g)
    labels = decide(fuse_free_probability(p, "min"), p, 0.5)
    for row, lab in zip(p.tolist(), labels.tolist()):
        if all(v <= 0.5 for v in row):
            assert lab == 0
        else:
            assert lab == 1 + max(range(4), key=lambda k: (row[k], -k))


@pytest.mark.parametrize("sensitivity", [0.5, 0.8, 0.9, 0.95, 0.99, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tuned_threshold_reaches_the_requested_sensitivity_and_is_the_smallest(sensitivity, dtype):
    g = torch.Generator().manual_seed(1)
    n = 397
    is_art = torch.rand(n, generator=g) < 0.6
    # Artifacts get a low p_free on average, but overlap the free tiles; some exact ties.
    p_free = torch.where(is_art, torch.rand(n, generator=g) * 0.8, 0.3 + 0.7 * torch.rand(n, generator=g)).to(dtype)
    p_free[:20] = 0.25
    t = tune_threshold(p_free, is_art, sensitivity=sensitivity)
    sens = lambda thr: float((p_free[is_art] < thr).double().mean())
    assert sens(t) >= sensitivity
    below = float(p_free.new_tensor(t).nextafter(torch.tensor(-1.0, dtype=dtype)))
    assert sens(below) < sensitivity
    # `decide` (artifact when p_free < t) flags exactly these tiles.
    pred = decide(p_free, torch.rand(n, 2, dtype=dtype, generator=g), t) > 0
    assert sensitivity_specificity(pred, is_art)["sensitivity"] >= sensitivity


def test_tuned_threshold_edge_cases():
    assert tune_threshold(torch.tensor([0.2, 0.9]), torch.tensor([True, False]), sensitivity=0.0) == 0.0
    assert tune_threshold(torch.tensor([1.0]), torch.tensor([True]), sensitivity=1.0) == 1.0    # capped
    with pytest.raises(ValueError, match="at least one artifact"):
        tune_threshold(torch.tensor([0.2]), torch.tensor([False]))
    with pytest.raises(ValueError, match="sensitivity"):
        tune_threshold(torch.tensor([0.2]), torch.tensor([True]), sensitivity=1.5)


@pytest.mark.parametrize("hw,tile", [((97, 65), 32), ((64, 64), 32), ((1, 1), 8), ((5, 40), 64), ((33, 100), 7)])
def test_tiles_cover_the_image_exactly_once(hw, tile):
    H, W = hw
    boxes = tile_grid(H, W, tile)
    cover = np.zeros((H, W), int)
    for y0, x0, y1, x1 in boxes:
        assert 0 <= y0 < y1 <= H and 0 <= x0 < x1 <= W and y1 - y0 <= tile and x1 - x0 <= tile
        cover[y0:y1, x0:x1] += 1
    assert (cover == 1).all()
    assert len(boxes) == math.ceil(H / tile) * math.ceil(W / tile)


def test_extracted_tiles_hold_the_pixels_and_pad_with_white():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (50, 37, 3), dtype=np.uint8)
    boxes = tile_grid(50, 37, 16)
    tiles = extract_tiles(img, boxes, 16)
    for t, (y0, x0, y1, x1) in zip(tiles, boxes):
        assert (t[:y1 - y0, :x1 - x0] == img[y0:y1, x0:x1]).all()
        assert (t[y1 - y0:] == 255).all() and (t[:, x1 - x0:] == 255).all()
    x = tiles_to_tensor(tiles)
    assert x.shape == (len(boxes), 3, 16, 16) and x.dtype == torch.float32 and float(x.max()) <= 1


def test_tissue_mask_separates_stain_from_glass():
    img = np.full((10, 20, 3), 240, np.uint8)
    img[:, 10:] = PINK
    img[0, 0] = (60, 40, 70)          # dark debris counts as tissue
    m = tissue_mask(img)
    assert m[:, 10:].all() and m[0, 0] and not m[1:, :10].any()


class _Darkness(nn.Module):
    """A fixed 'expert': artifact logit grows as the tile darkens below `level`; counts tiles seen."""

    def __init__(self, level):
        super().__init__()
        self.level, self.seen = level, 0

    def forward(self, x):
        self.seen += x.shape[0]
        d = (self.level - x.mean((1, 2, 3))) * 50
        return torch.stack([torch.zeros_like(d), d], 1)


def _slide():
    """96×80 image: glass on the left third, pink tissue elsewhere, and one dark 16×16 patch."""
    img = np.full((96, 80, 3), 242, np.uint8)
    img[:, 32:] = PINK
    img[48:64, 48:64] = (70, 30, 60)
    return img


def test_slide_pipeline_skips_background_and_paints_maps_and_reports():
    experts = {"dark": _Darkness(0.45), "never": _Darkness(-1.0)}
    moe = BinaryExpertMoE(experts)
    img = _slide()
    res = detect_slide(moe, img, tile=16)
    n_tiles = 6 * 5
    assert res.boxes.shape == (n_tiles, 4) and res.labels.shape == (n_tiles,)
    bg = ~res.tissue
    assert bg.sum() == 6 * 2                               # the two glass columns of tiles
    assert (res.labels[bg] == -1).all() and np.isnan(res.p_free[bg]).all() and np.isnan(res.p_artifact[bg]).all()
    assert experts["dark"].seen == n_tiles - bg.sum()      # background never reaches an expert
    assert (res.label_map[:, :32] == -1).all()
    assert (res.label_map[48:64, 48:64] == 1).all()        # the dark patch is "dark"
    assert (res.labels[res.tissue] >= 0).all() and (res.labels == 1).sum() == 1
    # The artifact-free mask: tissue pixels of free tiles only.
    assert res.artifact_free_mask.sum() == (96 * 48 - 16 * 16)
    assert not res.artifact_free_mask[:, :32].any() and not res.artifact_free_mask[48:64, 48:64].any()
    rep = res.report
    assert rep["tissue_tiles"] == n_tiles - 12 and rep["background_tiles"] == 12
    assert rep["dark"]["tiles"] == 1 and rep["never"]["tiles"] == 0 and rep["artifact_free"]["tiles"] == 17
    assert abs(rep["dark"]["share"] + rep["never"]["share"] + rep["artifact_free"]["share"] - 1) < 1e-12
    # A threshold above every p_free flags every tissue tile.
    assert (detect_slide(moe, img, tile=16, threshold=1.0).labels[res.tissue] > 0).all()


def test_overlays_are_written(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    from moekit.models.pathology import save_overlays
    img = _slide()
    res = detect_slide(BinaryExpertMoE({"dark": _Darkness(0.45)}), img, tile=16)
    out = save_overlays(img, res, tmp_path, stem="s")
    with Image.open(out["overlay"]) as ov, Image.open(out["mask"]) as mk:
        assert ov.size == (80, 96) and mk.size == (80, 96)
        ov = np.asarray(ov)
    assert (ov[:, :32] == img[:, :32]).all()              # background untouched
    assert not (ov[48:64, 48:64] == img[48:64, 48:64]).all()


def test_detectors_share_one_interface():
    torch.manual_seed(0)
    x = torch.rand(6, 3, 32, 32)
    experts = {"a": MobileNetTiny(num_classes=2, widths=(8, 16)), "b": vit_tile_classifier(image_size=32,
                                                                                          num_classes=2)}
    moe = BinaryExpertMoE(experts, fusion="product").eval()
    pf, pa = moe.probabilities(x)
    with torch.no_grad():
        ref = torch.stack([e.eval()(x).softmax(-1)[:, 1] for e in experts.values()], 1)
    assert torch.allclose(pa, ref) and torch.allclose(pf, (1 - ref).prod(1))
    assert moe(x).shape == (6,)
    mc = MulticlassDetector(MobileNetTiny(num_classes=3, widths=(8, 16)), ["a", "b"]).eval()
    pf, pa = mc.probabilities(x)
    assert pa.shape == (6, 2) and torch.allclose(pf + pa.sum(1), torch.ones(6))
    with pytest.raises(ValueError, match="3 logits"):
        MulticlassDetector(MobileNetTiny(num_classes=4, widths=(8,)), ["a", "b"]).probabilities(x)


def test_macs_match_torch_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode
    cnn = MobileNetTiny(num_classes=2, widths=(8, 16, 32)).eval()
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        cnn(torch.rand(1, 3, 32, 32))
    assert classifier_macs(cnn, (3, 32, 32)) == fc.get_total_flops() // 2
    # The ViT: torch's counter (with autograd on, MultiheadAttention's projections are counted)
    # plus the two attention matmuls 2·S²·D of each block, which it does not see.
    vit = vit_tile_classifier(image_size=32, num_classes=2, patch_size=8, d_model=48, n_layers=2)
    with FlopCounterMode(display=False) as fc:
        vit(torch.rand(1, 3, 32, 32))
    S, D = 16, 48
    assert classifier_macs(vit, (3, 32, 32)) == fc.get_total_flops() // 2 + 2 * (2 * S * S * D)
    moe = BinaryExpertMoE({"a": cnn, "b": vit})
    assert classifier_macs(moe, (3, 32, 32)) == classifier_macs(cnn, (3, 32, 32)) + classifier_macs(vit, (3, 32, 32))


def test_a_binary_expert_learns_a_separable_task():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(128, 3, 16, 16, generator=g) * 0.5
    y = (torch.arange(128) % 2)
    x[y == 1] += 0.5                                       # bright tiles are the "artifact"
    torch.manual_seed(0)
    net = MobileNetTiny(num_classes=2, widths=(8, 16))
    losses = fit_tile_classifier(net, x, y, steps=40, batch_size=32, lr=1e-2)
    assert len(losses) == 40 and losses[-1] < 0.5 * losses[0]
    with torch.no_grad():
        assert float((net(x).argmax(1) == y).float().mean()) > 0.95


def test_bad_arguments_name_themselves():
    p = torch.rand(3, 2)
    with pytest.raises(ValueError, match="fusion"):
        fuse_free_probability(p, "max")
    with pytest.raises(ValueError, match="threshold"):
        decide(p[:, 0], p, 1.5)
    with pytest.raises(ValueError, match="experts"):
        BinaryExpertMoE({})
    with pytest.raises(TypeError, match="experts"):
        BinaryExpertMoE([nn.Linear(2, 2)])
    with pytest.raises(ValueError, match="image"):
        tissue_mask(np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="tile"):
        tile_grid(10, 10, 0)
    with pytest.raises(ValueError, match="num_classes"):
        MobileNetTiny(num_classes=0)
