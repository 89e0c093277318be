"""projects/meta_dmoe: the rotated domains, the episode sampler and one target's run, on tiny synthetic data."""
import argparse

import numpy as np
import pytest
import torch

from projects.meta_dmoe.data import Domain, build_domains, rotate
from projects.meta_dmoe.run import METHODS, episode_sampler, parse_args, run_target


def test_rotate_by_90_degrees_is_a_quarter_turn_and_0_is_the_identity():
    x = torch.rand(3, 8, 8)
    torch.testing.assert_close(rotate(x, 0), x, rtol=0, atol=1e-6)
    r = rotate(x, 90)
    assert any(torch.allclose(r, torch.rot90(x, k, dims=(1, 2)), atol=1e-5) for k in (1, 3))


def test_domains_are_disjoint_rotations_of_one_shuffle():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(60, 28, 28), dtype=np.uint8)
    labels = np.arange(60) % 10
    doms = build_domains(images, labels, angles=(0, 45, 90))
    assert [d.name for d in doms] == ["0deg", "45deg", "90deg"] and [len(d.y) for d in doms] == [20, 20, 20]
    x = torch.as_tensor(images, dtype=torch.float32) / 255
    mean, std = float(x.mean()), float(x.std())
    order = torch.randperm(60, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(doms[0].x, ((x[order[:20]] - mean) / std).flatten(1), rtol=1e-5, atol=1e-4)
    assert torch.equal(torch.cat([d.y for d in doms]), torch.as_tensor(labels)[order])
    with pytest.raises(ValueError, match="at least 3 images"):
        build_domains(images[:2], labels[:2], angles=(0, 45, 90))


def _synthetic_domains():
    g = torch.Generator().manual_seed(0)
    protos = torch.randn(10, 784, generator=g)
    doms = []
    for i in range(3):
        y = torch.arange(60) % 10
        shift = 0.5 * i * torch.randn(784, generator=g)
        doms.append(Domain(f"{15 * i}deg", protos[y] + shift + 0.3 * torch.randn(60, 784, generator=g), y))
    return doms


def test_episodes_mask_their_own_domains_expert_and_never_share_images():
    doms = _synthetic_domains()
    sample = episode_sampler(doms, 8, seed=0)
    for _ in range(5):
        xs, xq, yq, d = sample()
        assert xs.shape == (8, 784) and xq.shape == (8, 784) and yq.shape == (8,)
        rows = [torch.nonzero((doms[d].x == r).all(1)).item() for r in torch.cat([xs, xq])]
        assert len(set(rows)) == 16                                   # support and query disjoint
        assert torch.equal(doms[d].y[rows[8:]], yq)


def test_run_target_on_synthetic_domains():
    args = argparse.Namespace(**{**vars(parse_args([])), **dict(
        d_model=8, expert_epochs=2, erm_epochs=2, meta_steps=3, support=8, batch_size=16)})
    res = run_target(_synthetic_domains(), 15.0, args, seed=0)
    assert set(res) == set(METHODS) and all(0 <= v <= 1 for v in res.values())
    assert res["ERM"] > 0.3          # the classes are separable; the shift is mild


def test_quick_flags():
    a = parse_args(["--quick", "--targets", "75", "30"])
    assert (a.targets, a.seeds, a.meta_steps) == ([75.0], [0], 20)
