"""The MoE layer inside ``torch.autocast``: routers in float32, expert matmuls in the autocast
dtype on every backend (as ``nn.Linear`` would be), the output in the input's dtype."""
import pytest
import torch

import moekit
from moekit.ops.precision import autocast_dtype


def _layer(seed=0, top_k=2, **kw):
    torch.manual_seed(seed)
    moe = moekit.MoE(d_model=32, num_experts=6, top_k=top_k, d_hidden=24, **kw)
    with torch.no_grad():
        moe.router.weight.normal_(0, 1.0)
    return moe


def test_autocast_dtype_follows_the_region():
    x = torch.randn(3, 4)
    assert autocast_dtype(x) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert autocast_dtype(x) == torch.bfloat16
        assert autocast_dtype(x.double()) is None          # autocast leaves float64 alone
        with torch.autocast("cpu", enabled=False):
            assert autocast_dtype(x) is None


@pytest.mark.parametrize("router", ["topk", "switch", "sigmoid"])
def test_router_runs_in_float32_under_autocast(router):
    """Routing under autocast equals routing without it: the router's linear is not rounded to
    bf16 (a rounded logit flips near-tied choices)."""
    moe = _layer(router=router, top_k=1 if router == "switch" else 2)
    x = torch.randn(257, 32)
    moe(x)
    ref = moe.last_routing
    with torch.autocast("cpu", dtype=torch.bfloat16):
        moe(x)
    got = moe.last_routing
    assert got.logits.dtype == torch.float32
    assert torch.equal(got.expert_ids, ref.expert_ids) and torch.equal(got.token_ids, ref.token_ids)
    torch.testing.assert_close(got.weights, ref.weights)


@pytest.mark.parametrize("backend", ["auto", "grouped_mm"])
def test_expert_matmuls_take_the_autocast_dtype_on_every_backend(backend):
    """Every backend computes what the eager reference (``x @ w``, which autocast casts) computes
    under autocast: bf16 expert matmuls, within bf16 rounding of float32, gradients included."""
    moe = _layer(1)
    x = torch.randn(97, 32)
    dy = torch.randn(97, 32)
    seen = []
    moe.experts.register_forward_hook(lambda m, i, o: seen.append(o.dtype))

    def run(b, amp):
        moe.backend = b
        xg = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            y = moe(xg)
        (gx,) = torch.autograd.grad(y, xg, dy)
        return y, gx

    y32, g32 = run("eager", False)
    y_ref, g_ref = run("eager", True)
    y, g = run(backend, True)
    assert seen[-1] == torch.bfloat16 and seen[0] == torch.float32
    assert y.dtype == torch.float32 and g.dtype == torch.float32
    torch.testing.assert_close(y, y_ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(g, g_ref, rtol=2e-2, atol=2e-2)
    # bf16 matmuls are not float32 ones, and stay within bf16 rounding of them.
    assert not torch.equal(y, y32)
    assert (y - y32).abs().max() <= 8 * 2 ** -8 * y32.abs().max()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["auto", "grouped_mm", "triton"])
def test_cuda_backends_under_bf16_autocast_match_eager(backend):
    """On CUDA (the fused Triton path under "auto"): routing in float32 equal to the routing
    without autocast, output and input gradient within bf16 rounding of the eager reference
    under the same autocast."""
    if backend == "triton" and "triton" not in moekit.ops.available_backends():
        pytest.skip("triton not installed")
    moe = _layer(2).cuda()
    x = torch.randn(512, 32, device="cuda")
    dy = torch.randn(512, 32, device="cuda")
    moe(x)
    ref_routing = moe.last_routing

    def run(b):
        moe.backend = b
        xg = x.clone().requires_grad_(True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = moe(xg)
        (gx,) = torch.autograd.grad(y, xg, dy)
        return y.float(), gx.float(), moe.last_routing

    y_ref, g_ref, _ = run("eager")
    y, g, routing = run(backend)
    assert routing.logits.dtype == torch.float32
    assert torch.equal(routing.expert_ids, ref_routing.expert_ids)
    torch.testing.assert_close(y, y_ref, rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(g, g_ref, rtol=3e-2, atol=3e-2)
