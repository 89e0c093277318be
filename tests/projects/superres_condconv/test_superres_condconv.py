"""The super-resolution study (projects/superres_condconv): a short training beats bicubic on held-out
synthetic images, the cosine schedule of `moekit.optim`, errors, and the --quick path on fake data."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from moekit.models.superres import SRNet, bicubic_upsample, downsample
from moekit.optim import lr_at
from projects.superres_condconv import run as sr_run
from projects.superres_condconv.train import evaluate_psnr, train_sr


def _rectangles(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    """(n, 1, size, size) images of 1–3 axis-aligned rectangles of random grey on black: sharp
    edges that bicubic upsampling blurs and a CNN can learn to restore."""
    g = torch.Generator().manual_seed(seed)
    img = torch.zeros(n, 1, size, size)
    for i in range(n):
        for _ in range(int(torch.randint(1, 4, (1,), generator=g))):
            y0, x0 = torch.randint(0, size - 4, (2,), generator=g).tolist()
            h, w = torch.randint(3, size // 2, (2,), generator=g).tolist()
            img[i, 0, y0:y0 + h, x0:x0 + w] = torch.rand(1, generator=g).item() * 0.8 + 0.2
    return img


@pytest.mark.parametrize("num_experts", [0, 2])
def test_short_training_beats_bicubic(num_experts):
    torch.manual_seed(0)
    hr = _rectangles(96)
    lr = downsample(hr)
    net = SRNet(width=16, num_mid=1, num_experts=num_experts)
    train_sr(net, lr[:64], hr[:64], steps=80, batch_size=16, learning_rate=3e-3)
    bicubic = evaluate_psnr(bicubic_upsample, lr[64:], hr[64:])
    assert evaluate_psnr(net, lr[64:], hr[64:]) > bicubic + 0.5     # held-out images


def test_learning_rate_decays_by_a_cosine_to_zero(monkeypatch):
    seen = []
    real_step = torch.optim.Adam.step

    def step(self, *a, **k):
        seen.append(self.param_groups[0]["lr"])
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    hr = _rectangles(8)
    losses = train_sr(SRNet(width=4, num_mid=1), downsample(hr), hr, steps=5, batch_size=4, learning_rate=2e-3)
    assert len(losses) == 5 and all(np.isfinite(losses))
    assert seen == pytest.approx([lr_at(s, lr=2e-3, total_steps=5) for s in range(5)])
    assert seen[0] == pytest.approx(2e-3) and seen[-1] == pytest.approx(0.0, abs=1e-12)


def test_clear_errors():
    net = SRNet(width=4)
    with pytest.raises(ValueError, match="hr must have shape"):
        train_sr(net, torch.rand(4, 1, 8, 8), torch.rand(4, 1, 8, 8), steps=1)
    with pytest.raises(ValueError, match="1 channel"):
        train_sr(net, torch.rand(4, 3, 8, 8), torch.rand(4, 3, 16, 16), steps=1)
    with pytest.raises(ValueError, match="steps must be"):
        train_sr(net, torch.rand(4, 1, 8, 8), torch.rand(4, 1, 16, 16), steps=0)
    with pytest.raises(TypeError, match="model must be"):
        train_sr(torch.nn.Conv2d(1, 1, 1), torch.rand(4, 1, 8, 8), torch.rand(4, 1, 16, 16), steps=1)


def test_quick_run_on_fake_fashion_mnist(capsys):
    gen = np.random.default_rng(0)
    fake = SimpleNamespace(train_images=gen.integers(0, 256, (64, 28, 28), dtype=np.uint8),
                           test_images=gen.integers(0, 256, (16, 28, 28), dtype=np.uint8))
    args = sr_run.parse_args(["--quick", "--seeds", "0", "1", "--batch-size", "8"])
    assert args.steps == 50 and args.train_images == 2000
    args.steps = 3
    out = sr_run.run(fake, args, width=4)
    assert sorted(out) == [0, 1] and len(out[0]) == 4                   # bicubic + three nets
    assert out[0]["bicubic"] == out[1]["bicubic"]
    assert all(np.isfinite(v) for v in out[0].values())
    text = capsys.readouterr().out
    assert "CondConv MoE (width 4, E=4)" in text and "mean test PSNR over seeds [0, 1]" in text
