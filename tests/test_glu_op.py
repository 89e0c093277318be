"""`moekit.ops.glu` (SwiGLU with a concatenation-free backward) against the plain formula."""
import pytest
import torch
import torch.nn.functional as F

from moekit.ops.glu import glu, glu_reference


def _grads(fn, h, g, act):
    h = h.detach().clone().requires_grad_(True)
    y = fn(h, act)
    (dh,) = torch.autograd.grad(y, h, g)
    return y, dh


@pytest.mark.parametrize("shape", [(1, 2), (97, 200), (5, 3, 2 * 50), (4096, 2 * 176)])
def test_glu_matches_reference_float32(shape):
    torch.manual_seed(0)
    h = torch.randn(shape)
    g = torch.randn(*shape[:-1], shape[-1] // 2)
    y, dh = _grads(glu, h, g, F.silu)
    y_ref, dh_ref = _grads(glu_reference, h, g, F.silu)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    torch.testing.assert_close(dh, dh_ref, rtol=1e-6, atol=1e-6)
    assert dh.shape == h.shape and dh.is_contiguous()


def test_glu_gradcheck_and_double_backward_float64():
    torch.manual_seed(1)
    h = torch.randn(7, 2 * 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: glu(t, F.silu), (h,))
    assert torch.autograd.gradgradcheck(lambda t: glu(t, F.silu), (h,))


def test_glu_second_order_equals_reference():
    torch.manual_seed(2)
    h0 = torch.randn(6, 8, dtype=torch.float64)
    out = []
    for fn in (glu, glu_reference):
        h = h0.clone().requires_grad_(True)
        (dh,) = torch.autograd.grad(fn(h, F.silu).square().sum(), h, create_graph=True)
        (ddh,) = torch.autograd.grad(dh.sin().sum(), h)
        out.append((dh.detach(), ddh))
    torch.testing.assert_close(out[0][0], out[1][0])
    torch.testing.assert_close(out[0][1], out[1][1])


def test_glu_non_contiguous_input_and_other_activations():
    torch.manual_seed(3)
    base = torch.randn(2 * 6, 9)
    h = base.t()                                  # (9, 12), non-contiguous
    g = torch.randn(9, 6)
    for act in (F.silu, F.gelu, torch.relu):
        y, dh = _grads(glu, h, g, act)
        y_ref, dh_ref = _grads(glu_reference, h, g, act)
        torch.testing.assert_close(y, y_ref)
        torch.testing.assert_close(dh, dh_ref)


def test_glu_bfloat16_within_reference_error():
    torch.manual_seed(4)
    h = torch.randn(64, 2 * 32)
    g = torch.randn(64, 32)
    _, dh64 = _grads(glu_reference, h.double(), g.double(), F.silu)
    _, dh_bf = _grads(glu, h.bfloat16(), g.bfloat16(), F.silu)
    _, dh_ref_bf = _grads(glu_reference, h.bfloat16(), g.bfloat16(), F.silu)
    err = (dh_bf.double() - dh64).abs().max()
    ref_err = (dh_ref_bf.double() - dh64).abs().max()
    assert err <= 2 * ref_err + 1e-3


def test_glu_without_grad_is_the_reference():
    h = torch.randn(3, 4)
    with torch.no_grad():
        torch.testing.assert_close(glu(h, F.silu), glu_reference(h, F.silu))
