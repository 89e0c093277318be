"""The MoE-NP study (projects/moe_neural_processes): the task sampler's families and splits, the
--quick settings, and the run end to end at a tiny size (the method is tested in tests/test_meta_np.py)."""
import numpy as np
import pytest
import torch

from projects.moe_neural_processes import images as img
from projects.moe_neural_processes import run as np_run
from projects.moe_neural_processes.data import FAMILIES, function_values, sample_tasks


def test_families_are_the_published_functions():
    x = torch.linspace(-5, 5, 11).expand(5, 11)
    g = torch.Generator().manual_seed(0)
    y = function_values(torch.arange(5), x, g)
    assert y.shape == (5, 11)
    line = y[1]
    assert torch.allclose(line.diff(), line.diff()[0].expand(10), atol=1e-5)      # a straight line
    kinks = (y[3].diff().diff().abs() > 1e-4).sum()
    assert kinks <= 2                                                               # a |x - c| + b: one kink
    assert y[4].diff().abs().max() <= 3.0                                           # |a tanh'| ≤ 3
    assert y[0].abs().max() <= 5.0                                                  # amplitude ≤ 5


def test_sample_tasks_shapes_and_targets():
    x_c, y_c, x_t, y_t, fam = sample_tasks(8, 4, 6, seed=3)
    assert x_c.shape == y_c.shape == (8, 4, 1) and x_t.shape == y_t.shape == (8, 10, 1)
    assert torch.equal(x_t[:, :4], x_c) and torch.equal(y_t[:, :4], y_c)            # context among targets
    e = sample_tasks(8, 4, 6, seed=3, include_context=False)
    assert e[2].shape == (8, 6, 1) and torch.equal(e[2], x_t[:, 4:])                # evaluation: new points only
    assert ((x_t >= -5) & (x_t <= 5)).all() and set(fam.tolist()) <= set(range(len(FAMILIES)))
    only = sample_tasks(50, 2, 2, seed=0, families=("sine",))[4]
    assert (only == 0).all()


def test_quick_run_end_to_end(capsys):
    args = np_run.parse_args(["--quick"])
    assert args.seeds == [0] and args.steps == 150 and args.test_tasks == 100 and args.benchmark == "sinusoid"
    args.seeds, args.steps, args.test_tasks, args.d_hidden, args.z_dim, args.batch = [0, 1], 3, 6, 8, 2, 4
    out = np_run.run(args)
    assert sorted(k for k in out if k[0] != "params") == [(m, c) for m in sorted(np_run.MODELS) for c in (5, 10)]
    for k, r in out.items():
        if k[0] != "params":
            assert r["ll"].shape == r["mse"].shape == (2, 6)
            assert np.isfinite(r["ll"]).all() and (r["mse"] >= 0).all()
    text = capsys.readouterr().out
    assert "context   5: np ll" in text and "moe-np mse" in text and "per family" in text


@pytest.mark.parametrize("benchmark", ["sinusoid", "images"])
def test_wide_np_matches_the_moe_np_in_parameters(benchmark):
    args = np_run.parse_args(["--benchmark", benchmark])
    n = {m: np_run.n_params(np_run.build(m, args)) for m in np_run.MODELS}
    assert n["np"] < n["moe-np"] and abs(n["np-wide"] - n["moe-np"]) / n["moe-np"] < 0.02
    assert np_run.build("np-wide", args).x_dim == (1 if benchmark == "sinusoid" else 2)


def test_pixel_grid_and_completion_tasks():
    grid = img.pixel_grid(4)
    assert grid.shape == (16, 2) and grid.min() == -1 and grid.max() == 1
    torch.testing.assert_close(grid[1], torch.tensor([-1.0, -1 / 3]))                       # row-major: (row, column)
    pixels = torch.arange(3 * 16, dtype=torch.float32).reshape(3, 16) / 100
    x_c, y_c, x_t, y_t = img.completion_tasks(pixels, 5, 6, seed=0)
    assert x_c.shape == (3, 5, 2) and y_c.shape == (3, 5, 1) and x_t.shape == (3, 11, 2) and y_t.shape == (3, 11, 1)
    assert torch.equal(x_t[:, :5], x_c) and torch.equal(y_t[:, :5], y_c)
    for b in range(3):                                   # every (x, y) pair is a real pixel of image b, none twice
        rows = ((x_t[b] + 1) / 2 * 3).round().long()
        flat = rows[:, 0] * 4 + rows[:, 1]
        assert len(set(flat.tolist())) == 11 and torch.equal(y_t[b, :, 0], pixels[b, flat])
    e = img.completion_tasks(pixels, 5, 6, seed=0, include_context=False)
    assert torch.equal(e[2], x_t[:, 5:])
    with pytest.raises(ValueError, match="context"):
        img.completion_tasks(pixels, 10, 7, seed=0)


def test_images_split_by_image():
    train, test = img.split_images(100, test=20, seed=0)
    assert len(train) == 80 and len(test) == 20 and not set(train) & set(test)
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(100))
    assert not np.array_equal(test, np.sort(test))                          # random order: a prefix is a sample


def test_images_quick_run_end_to_end(tmp_path, capsys):
    args = np_run.parse_args(["--benchmark", "images", "--quick"])
    assert args.steps == 150 and args.test_tasks == 50 and args.x_dim == 2 and args.samples == 16
    g = torch.Generator().manual_seed(0)
    args.images = (torch.rand(40, 784, generator=g) > 0.7).float()
    args.seeds, args.steps, args.test_tasks, args.d_hidden, args.z_dim, args.batch = [0], 2, 4, 8, 2, 3
    args.figure = str(tmp_path / "completions.png")
    out = np_run.run(args)
    for m in np_run.MODELS:
        for c in np_run.CONTEXTS["images"]:
            assert out[m, c]["ll"].shape == (1, 4) and np.isfinite(out[m, c]["mse"]).all()
    assert (tmp_path / "completions.png").stat().st_size > 1000
    assert "held-out digits" in capsys.readouterr().out
