"""Shared check: two layers with the same weights compute the same outputs and gradients."""
import torch


def assert_same_outputs_and_grads(ref, fast, x, *, rtol_y, atol_y=1e-5, rtol_g=1e-4, atol_g=1e-5):
    """Run `ref` and `fast` on copies of `x`; compare outputs, input grads and every parameter grad."""
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = ref(x1), fast(x2)
    torch.testing.assert_close(y2, y1, rtol=rtol_y, atol=atol_y)
    g = torch.randn_like(y1)
    (y1 * g).sum().backward()
    (y2 * g).sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad, rtol=rtol_g, atol=atol_g)
    for (n, p1), (_, p2) in zip(ref.named_parameters(), fast.named_parameters()):
        torch.testing.assert_close(p2.grad, p1.grad, rtol=rtol_g, atol=atol_g, msg=n)


class CallWith(torch.nn.Module):
    """``module(x, **kwargs)`` (plus ``module.aux_loss`` with ``add_aux=True``) as a module of
    one argument, for `assert_same_outputs_and_grads`."""

    def __init__(self, module, *, add_aux: bool = False, **kwargs):
        super().__init__()
        self.m, self.add_aux, self.kwargs = module, add_aux, kwargs

    def forward(self, x):
        y = self.m(x, **self.kwargs)
        return y + self.m.aux_loss if self.add_aux else y
