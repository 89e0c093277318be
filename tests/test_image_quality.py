"""SSIM, NCC and PSNR (moekit.models.image_quality), METHODS.md CV2: checked against a direct
formula over every window position and, where installed, scikit-image."""
import math

import numpy as np
import pytest
import torch

from moekit.models import gaussian_window, ncc, ncc_loss, psnr, ssim, ssim_loss


def ssim_reference(x: np.ndarray, y: np.ndarray, *, data_range=1.0, ws=11, sigma=1.5, k1=0.01, k2=0.03) -> float:
    """Wang et al. (2004) by the book, one window position at a time, float64 (x, y: (C, H, W))."""
    g = np.exp(-((np.arange(ws) - (ws - 1) / 2) ** 2) / (2 * sigma ** 2))
    w = np.outer(g, g)
    w /= w.sum()
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    vals = []
    for c in range(x.shape[0]):
        for i in range(x.shape[1] - ws + 1):
            for j in range(x.shape[2] - ws + 1):
                a, b = x[c, i:i + ws, j:j + ws], y[c, i:i + ws, j:j + ws]
                ma, mb = (w * a).sum(), (w * b).sum()
                va, vb = (w * (a - ma) ** 2).sum(), (w * (b - mb) ** 2).sum()
                cov = (w * (a - ma) * (b - mb)).sum()
                vals.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
    return float(np.mean(vals))


def test_gaussian_window_sums_to_one_and_is_symmetric():
    g = gaussian_window(11, 1.5)
    assert g.shape == (11,) and abs(float(g.sum()) - 1) < 1e-12
    assert torch.equal(g, g.flip(0)) and int(g.argmax()) == 5


def test_ssim_matches_the_direct_formula():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 2, 15, 17, generator=g, dtype=torch.float64)
    y = (x + 0.2 * torch.randn(2, 2, 15, 17, generator=g, dtype=torch.float64)).clamp(0, 1)
    got = ssim(x, y)
    want = [ssim_reference(x[b].numpy(), y[b].numpy()) for b in range(2)]
    assert got.shape == (2,)
    assert torch.allclose(got, torch.tensor(want, dtype=torch.float64), atol=1e-10)
    # another data range and window: the constants and the window follow the arguments
    got = ssim(255 * x, 255 * y, data_range=255.0, window_size=7, sigma=1.0)
    want = [ssim_reference(255 * x[b].numpy(), 255 * y[b].numpy(), data_range=255.0, ws=7, sigma=1.0) for b in range(2)]
    assert torch.allclose(got, torch.tensor(want, dtype=torch.float64), atol=1e-10)


def test_ssim_matches_scikit_image():
    metrics = pytest.importorskip("skimage.metrics")
    g = torch.Generator().manual_seed(1)
    x = torch.rand(1, 1, 40, 33, generator=g, dtype=torch.float64)
    y = (0.8 * x + 0.1 * torch.rand(1, 1, 40, 33, generator=g, dtype=torch.float64))
    want = metrics.structural_similarity(x[0, 0].numpy(), y[0, 0].numpy(), data_range=1.0, gaussian_weights=True,
                                         sigma=1.5, use_sample_covariance=False)
    assert abs(float(ssim(x, y)) - want) < 1e-9


def test_ssim_of_an_image_with_itself_is_one_and_lower_for_noise():
    x = torch.rand(3, 4, 24, 24, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(ssim(x, x), torch.ones(3), atol=1e-6)
    assert float(ssim_loss(x, x)) == pytest.approx(0.0, abs=1e-6)
    noisy = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    assert bool((ssim(noisy, x) < 0.99).all())
    assert torch.allclose(ssim(noisy, x), ssim(x, noisy), atol=1e-6)          # symmetric


def test_ssim_loss_has_a_gradient_that_improves_it():
    g = torch.Generator().manual_seed(3)
    target = torch.rand(2, 1, 16, 16, generator=g)
    pred = torch.rand(2, 1, 16, 16, generator=g, requires_grad=True)
    loss = ssim_loss(pred, target)
    loss.backward()
    with torch.no_grad():
        better = ssim_loss(pred - 0.5 * pred.grad / pred.grad.norm(), target)
    assert float(better) < float(loss)


def test_ncc_is_one_for_positive_affine_maps_and_minus_one_for_negative():
    g = torch.Generator().manual_seed(4)
    x = torch.rand(3, 2, 9, 11, generator=g)
    assert torch.allclose(ncc(2.5 * x + 0.3, x), torch.ones(3), atol=1e-5)
    assert torch.allclose(ncc(-0.5 * x + 1, x), -torch.ones(3), atol=1e-5)
    assert float(ncc_loss(3 * x - 1, x)) == pytest.approx(0.0, abs=1e-5)
    assert float(ncc_loss(-x, x)) == pytest.approx(1.0, abs=1e-5)


def test_ncc_is_per_image_and_band_pearson():
    g = torch.Generator().manual_seed(5)
    x, y = torch.rand(2, 3, 6, 7, generator=g), torch.rand(2, 3, 6, 7, generator=g)
    want = [np.mean([np.corrcoef(x[b, c].flatten().numpy(), y[b, c].flatten().numpy())[0, 1] for c in range(3)])
            for b in range(2)]
    assert torch.allclose(ncc(x, y), torch.tensor(want, dtype=torch.float32), atol=1e-5)
    # bands are scored alone: rescaling one band of one image changes nothing
    z = x.clone()
    z[0, 1] = 10 * z[0, 1] + 3
    assert torch.allclose(ncc(z, y), ncc(x, y), atol=1e-5)
    assert torch.isfinite(ncc(torch.ones(1, 1, 4, 4), y[:1, :1, :4, :4])).all()     # a constant band


def test_psnr_is_exported_and_matches_its_formula():
    x = torch.zeros(1, 1, 4, 4)
    y = torch.full((1, 1, 4, 4), 0.1)
    assert float(psnr(y, x)) == pytest.approx(10 * math.log10(1 / 0.01))


@pytest.mark.parametrize("bad", [torch.rand(4, 4), torch.zeros(1, 1, 8, 8, dtype=torch.long), "x"])
def test_bad_inputs_raise_naming_the_argument(bad):
    with pytest.raises(ValueError, match="pred"):
        ssim(bad, torch.rand(1, 1, 8, 8))
    with pytest.raises(ValueError, match="pred"):
        ncc(bad, torch.rand(1, 1, 8, 8))


def test_shape_mismatch_and_small_images_raise():
    with pytest.raises(ValueError, match="same shape"):
        ssim(torch.rand(1, 1, 12, 12), torch.rand(1, 1, 12, 13))
    with pytest.raises(ValueError, match="window_size=11"):
        ssim(torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8))
    with pytest.raises(ValueError, match="data_range"):
        ssim(torch.rand(1, 1, 12, 12), torch.rand(1, 1, 12, 12), data_range=0)
