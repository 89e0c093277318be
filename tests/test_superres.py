"""Super-resolution models (`moekit.models.superres`): shapes, PSNR by hand, the CondConv MoE with
identical experts equals the dense net, errors on bad input (training: tests/projects/superres_condconv)."""
import math

import pytest
import torch

from moekit.models.superres import SRNet, bicubic_upsample, condconv_from_dense, downsample, psnr, sr_macs


@pytest.mark.parametrize("num_experts", [0, 3])
@pytest.mark.parametrize("channels,scale", [(1, 2), (3, 3)])
def test_shapes_and_untrained_net_is_bicubic(num_experts, channels, scale):
    net = SRNet(channels=channels, scale=scale, width=8, num_experts=num_experts)
    lr = torch.rand(2, channels, 7, 9)                       # odd, non-square on purpose
    out = net(lr)
    assert out.shape == (2, channels, 7 * scale, 9 * scale)
    # The last conv is zero-initialised: the residual is exactly zero before training.
    torch.testing.assert_close(out, bicubic_upsample(lr, scale), rtol=0, atol=0)


def test_psnr_matches_hand_computation():
    target = torch.zeros(2, 1, 2, 2, dtype=torch.float64)    # float64: 0.1 and 0.02 without float32 rounding
    pred = torch.zeros(2, 1, 2, 2, dtype=torch.float64)
    pred[0] += 0.1                                           # MSE 0.01 → 10·log10(1/0.01) = 20 dB
    pred[1, 0, 0, 0] = 0.02                                  # MSE 0.0004/4 = 1e-4 → 40 dB
    assert psnr(pred, target).item() == pytest.approx(30.0, abs=1e-9)
    # Scaling both images and the peak by 255 leaves PSNR unchanged.
    assert psnr(pred * 255, target * 255, max_val=255.0).item() == pytest.approx(30.0, abs=1e-9)
    assert math.isinf(psnr(target, target).item())


def test_moe_with_identical_experts_equals_dense():
    torch.manual_seed(0)
    dense = SRNet(width=8, num_mid=2).double()
    torch.nn.init.normal_(dense.tail.weight, std=0.1)        # a non-zero residual, so the mid convs matter
    torch.nn.init.normal_(dense.tail.bias, std=0.1)
    moe = condconv_from_dense(dense, num_experts=4)
    lr = torch.rand(5, 1, 6, 7, dtype=torch.float64)
    torch.testing.assert_close(moe(lr), dense(lr), rtol=1e-12, atol=1e-12)
    for conv in moe.mid:
        torch.testing.assert_close(conv.last_routing_weights, torch.full((5, 4), 0.25, dtype=torch.float64))
    # Same gradient for the input, too.
    lr_d, lr_m = lr.clone().requires_grad_(), lr.clone().requires_grad_()
    dense(lr_d).square().sum().backward()
    moe(lr_m).square().sum().backward()
    torch.testing.assert_close(lr_m.grad, lr_d.grad, rtol=1e-10, atol=1e-12)


def test_sr_macs_hand_count():
    dense = SRNet(width=4, num_mid=1)
    assert sr_macs(dense, 5, 5) == (1 * 4 * 9 + 4 * 4 * 9 + 4 * 4 * 9) * 25
    moe = SRNet(width=4, num_mid=1, num_experts=3)
    assert sr_macs(moe, 5, 5) == sr_macs(dense, 5, 5) + 3 * 4 * 4 * 9 + 4 * 3


def test_clear_errors():
    net = SRNet(width=4)
    with pytest.raises(ValueError, match="1 channel"):
        net(torch.rand(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        net(torch.rand(8, 8))
    with pytest.raises(ValueError, match="float tensor"):
        net(torch.zeros(1, 1, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="same shape"):
        psnr(torch.rand(2, 1, 4, 4), torch.rand(2, 1, 4, 5))
    with pytest.raises(ValueError, match="max_val"):
        psnr(torch.rand(2, 4), torch.rand(2, 4), max_val=0.0)
    with pytest.raises(ValueError, match="divisible by scale"):
        downsample(torch.rand(1, 1, 7, 8))
    with pytest.raises(ValueError, match="num_experts"):
        SRNet(num_experts=-1)
    with pytest.raises(ValueError, match="num_experts must be an int >= 2, got 1"):
        condconv_from_dense(net, 1)
