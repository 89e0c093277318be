"""projects/swin2_mose on tiny synthetic scenes: the area split never leaks, pairs are the 20 m grid,
training lowers the loss, and the --quick path runs end to end."""
import numpy as np
import pytest
import torch

from moekit.models import Swin2MoSE
from projects.swin2_mose.data import area_split, eval_tiles, make_pairs, random_crops, synthetic_scene
from projects.swin2_mose.run import MODELS, main
from projects.swin2_mose.train import evaluate, sr_loss, train_swin


def _split():
    return area_split(synthetic_scene(size=256, seed=1), block=64, test_blocks=4)


def test_area_split_is_disjoint_and_scaled_on_train_blocks():
    scene = synthetic_scene(size=256, seed=1)
    split = area_split(scene, block=64, test_blocks=4)
    assert len(split.test_blocks) == 4 and len(split.train_blocks) == 12
    assert not set(split.test_blocks) & set(split.train_blocks)
    train = torch.stack([split.scene_CHW[:, r:r + 64, c:c + 64] for r, c in split.train_blocks])
    assert torch.allclose(train.amin((0, 2, 3)), torch.zeros(4), atol=1e-6)
    assert torch.allclose(train.amax((0, 2, 3)), torch.ones(4), atol=1e-6)
    assert area_split(scene, block=64, test_blocks=4).test_blocks == split.test_blocks   # fixed split
    with pytest.raises(ValueError, match="test_blocks"):
        area_split(scene, block=64, test_blocks=16)


def test_crops_stay_inside_train_blocks_and_tiles_inside_test_blocks():
    split = _split()
    # mark each pixel by its block's side: crops must only ever see train pixels
    marked = np.zeros((4, 256, 256), dtype=np.uint16)
    for r, c in split.test_blocks:
        marked[:, r:r + 64, c:c + 64] = 1000
    marked[:, 0, 0] = 1                                        # keep the per-band range non-empty
    marked_split = area_split(marked, block=64, test_blocks=4)
    assert marked_split.test_blocks == split.test_blocks
    crops = random_crops(marked_split, 50, 32, generator=torch.Generator().manual_seed(0))
    assert crops.shape == (50, 4, 32, 32)
    assert float(crops.max()) <= 1.0 + 1e-6 and float(crops.min()) >= 0    # no test pixel (value 1000 / 1) inside
    assert float(crops.max()) < 2.0
    tiles = eval_tiles(marked_split, 32)
    assert tiles.shape == (4 * 4, 4, 32, 32)
    assert bool((tiles > 100).all())                            # all test pixels


def test_pairs_are_the_2x2_means():
    hr = torch.arange(16.0).view(1, 1, 4, 4)
    assert torch.equal(make_pairs(hr), torch.tensor([[[[2.5, 4.5], [10.5, 12.5]]]]))


def test_losses_vanish_at_the_target():
    x = torch.rand(2, 4, 16, 16)
    assert float(sr_loss(x, x, "mse")) == 0.0
    assert float(sr_loss(x, x, "ncc_ssim")) == pytest.approx(0.0, abs=1e-5)
    with pytest.raises(ValueError, match="kind"):
        sr_loss(x, x, "l1")


@pytest.mark.parametrize("ffn", ["mlp", "moe_sm"])
def test_training_lowers_the_loss(ffn):
    torch.manual_seed(0)
    net = Swin2MoSE(embed_dim=8, depths=[2], num_heads=[2], window_size=4, ffn=ffn, num_experts=4, top_k=2)
    split = _split()
    tiles = eval_tiles(split, 32)
    before = evaluate(net, tiles)[0]
    losses = train_swin(net, split, steps=40, batch_size=4, tile=32, lr=3e-3, warmup_steps=5, seed=0)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    assert evaluate(net, tiles)[0] > before


def test_quick_run_end_to_end(tmp_path):
    out = main(["--quick", "--seeds", "0", "--json", str(tmp_path / "r.json")])
    assert set(out["rows"]) == {"bicubic", *MODELS}
    assert (tmp_path / "r.json").exists()
    rows = out["rows"]
    assert rows["Swin2SR (MLP), MSE"]["total"] == rows["Swin2SR (MLP), MSE"]["active"]
    assert rows["Swin2-MoSE (MoE-SM 8/2)"]["total"] > rows["Swin2-MoSE (MoE-SM 8/2)"]["active"]
    assert 20 < rows["bicubic"]["psnr"] < 60


def test_paste_on_grid_keeps_the_first_image_where_both_have_data():
    from projects.swin2_mose.data import paste_on_grid

    a = np.full((2, 4, 4), 5, dtype=np.uint16)
    a[:, 0, 0] = 0                                        # a no-data pixel of the first image
    b = np.full((2, 4, 4), 9, dtype=np.uint16)
    canvas, valid = paste_on_grid([a, b], [(0, 0), (2, 2)])
    assert canvas.shape == (2, 6, 6) and valid.sum() == 15 + 12
    assert (canvas[:, 2:4, 2:4] == 5).all()               # overlap: the first image wins
    assert (canvas[:, 4:, 4:] == 9).all() and not valid[0, 4] and canvas[0, 0, 0] == 0 and not valid[0, 0]


def test_area_split_drops_blocks_with_invalid_pixels_and_splits_by_fraction():
    scene = synthetic_scene(size=256, seed=3)
    valid = np.ones((256, 256), dtype=bool)
    valid[10, 200] = False                                 # spoils the block at (0, 192)
    split = area_split(scene, block=64, valid_HW=valid, test_fraction=0.25)
    blocks = set(split.train_blocks) | set(split.test_blocks)
    assert len(blocks) == 15 and (0, 192) not in blocks and len(split.test_blocks) == 4
    with pytest.raises(ValueError, match="valid_HW"):
        area_split(scene, block=64, valid_HW=valid[:10])
    with pytest.raises(ValueError, match="test_fraction"):
        area_split(scene, block=64, test_fraction=1.5)
