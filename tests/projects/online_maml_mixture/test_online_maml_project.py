"""The online MAML-mixture study (projects/online_maml_mixture): the task families, the --quick
settings and the run end to end at a tiny size (the method: tests/test_meta_online_maml.py)."""
import numpy as np
import pytest
import torch

from projects.online_maml_mixture import run as om_run


def test_task_families():
    g = torch.Generator().manual_seed(0)
    for family in om_run.PHASES:
        xs, ys, xq, yq = om_run.sample_task(family, g, n_support=7, n_query=5, noise=0.0)
        assert xs.shape == ys.shape == (7, 1) and xq.shape == yq.shape == (5, 1)
        assert ((xs >= -5) & (xs <= 5)).all()
    xs, ys, xq, yq = om_run.sample_task("line", g, noise=0.0)
    x, y = torch.cat([xs, xq]), torch.cat([ys, yq])
    slope = (y[1:] - y[0]) / (x[1:] - x[0])
    assert torch.allclose(slope, slope[0].expand_as(slope), atol=1e-4)          # one straight line
    xs, ys, _, _ = om_run.sample_task("sine", g, noise=0.0)
    assert ys.abs().max() <= 5.0
    with pytest.raises(ValueError, match="family"):
        om_run.sample_task("cubic", g)


def test_quick_run_end_to_end(capsys):
    args = om_run.parse_args(["--quick"])
    assert args.seeds == [0] and args.tasks_per_phase == 40 and args.test_tasks == 30
    args.seeds, args.tasks_per_phase, args.test_tasks = [0, 1], 3, 4
    out = om_run.run(args, hidden=8)
    for name in ("maml", "mixture"):
        for family in om_run.PHASES:
            assert out[name, family].shape == (2, 4) and (out[name, family] >= 0).all()
    assert out["components", "mixture"].shape == (2,) and (out["components", "mixture"] >= 1).all()
    text = capsys.readouterr().out
    assert "maml     sine" in text and "mixture components per seed" in text
    assert np.isfinite(out["maml", "sine"]).all()
