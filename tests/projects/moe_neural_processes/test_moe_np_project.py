"""The MoE-NP study (projects/moe_neural_processes): the task sampler's families and splits, the
--quick settings, and the run end to end at a tiny size (the method is tested in tests/test_meta_np.py)."""
import numpy as np
import torch

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
    assert args.seeds == [0] and args.steps == 150 and args.test_tasks == 100
    args.seeds, args.steps, args.test_tasks, args.d_hidden, args.z_dim, args.batch = [0, 1], 3, 6, 8, 2, 4
    out = np_run.run(args)
    assert sorted(out) == [("moe-np", 5), ("moe-np", 10), ("np", 5), ("np", 10)]
    for r in out.values():
        assert r["ll"].shape == r["mse"].shape == (2, 6)
        assert np.isfinite(r["ll"]).all() and (r["mse"] >= 0).all()
    text = capsys.readouterr().out
    assert "context  5: np ll" in text and "moe-np mse" in text and "per family" in text
