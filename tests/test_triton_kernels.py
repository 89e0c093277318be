"""Triton kernels vs their PyTorch references under the interpreter (CPU, tiny shapes).

Tolerances are derived (STYLE.md, after flash-attention's tests): against a float64
reference, the kernel's max error must be at most twice plain PyTorch's error in the same
dtype, plus a few ulps of the output's magnitude.

Interpreter mode is fixed when triton and the kernels are first imported, so this module
sets ``TRITON_INTERPRET=1`` just for those imports (and restores the variable, so other test files
keep picking their usual backends). If triton was already imported in compiled mode, or a
GPU is present, the checks rerun in a fresh CPU-only subprocess instead.
"""
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.triton

if "triton" not in sys.modules and not torch.cuda.is_available():
    _old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton  # noqa: F401

        # Kernels are decorated at import: import them (and the ops on them) now, while interpreting.
        import moekit.kernels.fused_moe  # noqa: F401
        import moekit.kernels.grouped_gemm  # noqa: F401
        import moekit.kernels.router  # noqa: F401
        import moekit.ops.fused_moe  # noqa: F401
        import moekit.ops.grouped_mm_triton  # noqa: F401
        import moekit.ops.topk_gate  # noqa: F401
    except ImportError:
        pass
    finally:
        if _old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = _old

pytest.importorskip("triton")

from moekit.experts.glu import GLUExperts  # noqa: E402
from moekit.kernels import INTERPRET, gmm_scatter_add  # noqa: E402
from moekit.ops.backends import resolve_backend  # noqa: E402
from moekit.ops.fused_moe import fused_moe_forward, fused_moe_reference  # noqa: E402
from moekit.ops.gate import topk_gate_reference  # noqa: E402
from moekit.ops.grouped_mm import grouped_mm_reference  # noqa: E402
from moekit.ops.grouped_mm_triton import grouped_mm_triton  # noqa: E402
from moekit.ops.topk_gate import fused_topk_gate  # noqa: E402
from moekit.routing.base import Routing  # noqa: E402

in_process = pytest.mark.skipif(not INTERPRET or torch.cuda.is_available(),
                                reason="triton imported in compiled mode; see test_rerun_in_subprocess")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def test_rerun_in_subprocess():
    if INTERPRET and not torch.cuda.is_available():
        pytest.skip("interpreter available in this process; the tests below run here")
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


def assert_derived_close(out, ref64, torch_out, dtype, what):
    """max|out − ref64| ≤ 2 · max|torch_out − ref64| + 2 ulp(dtype) · max|ref64|."""
    out, torch_out = out.double(), torch_out.double()
    if out.numel() == 0:
        return
    err = (out - ref64).abs().max().item()
    base = (torch_out - ref64).abs().max().item()
    tol = 2 * base + 2 * torch.finfo(dtype).eps * ref64.abs().max().item() + 1e-12
    assert err <= tol, f"{what} [{dtype}]: kernel error {err:.3e} > 2 × torch error {base:.3e} + eps"


GMM_CASES = [
    # counts per expert, I, O, weight stored transposed (E, O, I) like nn.Linear
    ([3, 0, 17, 1, 20], 40, 24, True),
    ([1], 100, 36, False),             # one row, D = 100 (no power of two, not a multiple of 16)
    ([0, 0, 5], 24, 9, True),          # leading empty experts, odd output width
    ([0, 0], 16, 16, False),           # no rows at all
]


@in_process
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", GMM_CASES, ids=lambda c: f"counts{c[0]}-I{c[1]}-O{c[2]}")
def test_grouped_mm_forward_backward(case, dtype):
    counts, I, O, transposed = case
    torch.manual_seed(0)
    E, N = len(counts), sum(counts)
    offs = torch.cumsum(torch.tensor(counts), 0).to(torch.int32)
    x64 = torch.randn(N, I, dtype=torch.float64)
    w64 = torch.randn(E, O, I, dtype=torch.float64) if transposed else torch.randn(E, I, O, dtype=torch.float64)
    gy64 = torch.randn(N, O, dtype=torch.float64)

    def run(fn, dt):
        x = x64.to(dt).requires_grad_(True)
        w = w64.to(dt).requires_grad_(True)
        y = fn(x, w.transpose(1, 2) if transposed else w, offs)
        gx, gw = torch.autograd.grad(y, (x, w), gy64.to(dt), allow_unused=True)
        # The reference leaves x out of the graph when there are no rows at all.
        return y, torch.zeros_like(x) if gx is None else gx, gw

    ref = run(grouped_mm_reference, torch.float64)
    eager = run(grouped_mm_reference, dtype)
    out = run(grouped_mm_triton, dtype)
    for name, o, r, t in zip(("y", "dx", "dw"), out, ref, eager):
        assert o.dtype == dtype and o.shape == r.shape
        assert_derived_close(o, r, t, dtype, name)
    if N == 0:
        assert torch.all(out[2] == 0), "experts with no rows must get zero weight gradient"
    for e, c in enumerate(counts):
        if c == 0:
            assert torch.all(out[2][e] == 0)


@in_process
def test_in_kernel_schedule_computes_each_row_once():
    """Scatter-add to the identity: a row in two tiles would count twice, a skipped row be 0."""
    torch.manual_seed(0)
    counts = torch.tensor([0, 5, 33, 0, 1, 16, 0, 17])     # tiles of 16 rows: borders and empties
    offs = torch.cumsum(counts, 0).to(torch.int32)
    N = int(counts.sum())
    x, w = torch.randn(N, 20), torch.randn(len(counts), 20, 12)
    y = gmm_scatter_add(x, w, offs, torch.arange(N, dtype=torch.int32), N)
    torch.testing.assert_close(y, grouped_mm_reference(x, w, offs), rtol=1e-5, atol=1e-5)


@in_process
def test_backend_registered_auto_and_moe_equivalence(monkeypatch):
    import moekit.ops.triton_backend  # noqa: F401  (what `available_backends()` imports lazily)

    torch.manual_seed(0)
    x = torch.randn(10, 24)
    w = torch.randn(3, 24, 8)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert resolve_backend("auto", x, w).name != "triton", "auto must not pick the interpreter"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("auto", x, w).name == "triton"
    assert resolve_backend("triton", x, w).name == "triton"
    with pytest.raises(ValueError):
        resolve_backend("triton", torch.randint(0, 3, (10, 24)), w)   # integer operands
    bank = GLUExperts(3, 24, 20)
    counts = torch.tensor([4, 0, 6])
    y_t = bank(x, counts, backend="triton")
    y_e = bank(x, counts, backend="eager")
    torch.testing.assert_close(y_t, y_e, rtol=1e-5, atol=1e-5)


def test_grouped_mm_rejects_bad_operands():
    with pytest.raises(ValueError, match="inner dims"):
        grouped_mm_triton(torch.randn(4, 8), torch.randn(2, 9, 3), torch.tensor([2, 4], dtype=torch.int32))
    with pytest.raises(ValueError, match="offs"):
        grouped_mm_triton(torch.randn(4, 8), torch.randn(2, 8, 3), torch.tensor([4], dtype=torch.int32))
    with pytest.raises(TypeError, match="dtype"):
        grouped_mm_triton(torch.randn(4, 8), torch.randn(2, 8, 3, dtype=torch.float64),
                          torch.tensor([2, 4], dtype=torch.int32))


@in_process
def test_tiles_reach_every_launch_and_keep_the_result(monkeypatch):
    """``tiles=`` (a benchmark's sweep) replaces the heuristic's tile sizes in the forward and
    weight-gradient launches of the fused op, and the result stays the same function."""
    from moekit.kernels import grouped_gemm

    seen = {"gemm": [], "wgrad": []}

    def spy(name, key):                 # record the config each launch uses
        real = getattr(grouped_gemm, name)

        def config(*args, **kwargs):
            seen[key].append(real(*args, **kwargs))
            return seen[key][-1]
        monkeypatch.setattr(grouped_gemm, name, config)

    spy("gemm_config", "gemm")
    spy("wgrad_config", "wgrad")
    torch.manual_seed(0)
    T, D, Fh, E, K = 11, 16, 8, 3, 2
    gen = torch.Generator().manual_seed(5)
    expert_ids, weights, token_ids = _routing(T, E, K, gen)
    bank = GLUExperts(E, D, Fh)
    x = torch.randn(T, D)

    def run(**kw):
        xr = x.clone().requires_grad_(True)
        r = Routing(token_ids=token_ids, expert_ids=expert_ids, weights=weights, logits=None,
                    dropped=torch.zeros((), dtype=torch.long), num_experts=E)
        y = fused_moe_forward(xr, r, bank, **kw)
        return (y,) + torch.autograd.grad(y.square().sum(), (xr, bank.gate_up_proj, bank.down_proj))

    ref = run()
    assert seen["gemm"] and all(c["BLOCK_M"] == 16 for c in seen["gemm"]) and seen["wgrad"]
    seen["gemm"].clear()
    seen["wgrad"].clear()
    tiles = dict(BLOCK_M=32, BLOCK_N=16, WG_BLOCK_R=32, WG_BLOCK_I=16)
    out = run(tiles=tiles)
    assert len(seen["gemm"]) == 4 and all(c["BLOCK_M"] == 32 and c["BLOCK_N"] == 16 for c in seen["gemm"])
    assert len(seen["wgrad"]) == 2 and all(c["BLOCK_R"] == 32 and c["BLOCK_I"] == 16 for c in seen["wgrad"])
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5)
    seen["gemm"].clear()
    x2, w2 = torch.randn(6, 8), torch.randn(2, 8, 4)
    offs = torch.tensor([2, 6], dtype=torch.int32)
    torch.testing.assert_close(grouped_mm_triton(x2, w2, offs, tiles=dict(BLOCK_K=16)),
                               grouped_mm_reference(x2, w2, offs), rtol=1e-5, atol=1e-5)
    assert [c["BLOCK_K"] for c in seen["gemm"]] == [16]


def test_tiles_are_checked():
    bank = GLUExperts(2, 8, 4)
    r = Routing(token_ids=torch.arange(2), expert_ids=torch.tensor([0, 1]), weights=torch.ones(2),
                logits=None, dropped=torch.zeros((), dtype=torch.long), num_experts=2)
    with pytest.raises(ValueError, match="unknown keys.*BLOCK_Q"):
        fused_moe_forward(torch.randn(2, 8), r, bank, tiles={"BLOCK_Q": 16})
    with pytest.raises(ValueError, match="BLOCK_M.*positive int"):
        grouped_mm_triton(torch.randn(4, 8), torch.randn(2, 8, 3), torch.tensor([2, 4], dtype=torch.int32),
                          tiles={"BLOCK_M": 0})
    with pytest.raises(TypeError, match="tiles must be a mapping"):
        grouped_mm_triton(torch.randn(4, 8), torch.randn(2, 8, 3), torch.tensor([2, 4], dtype=torch.int32),
                          tiles=[("BLOCK_M", 16)])


def _routing(T, E, K, gen, empty_expert=None):
    """Top-k routing on random logits, optionally with one expert forced empty."""
    logits = torch.randn(T, E, generator=gen)
    if empty_expert is not None:
        logits[:, empty_expert] = -1e4
    p = logits.softmax(-1)
    w, ids = p.topk(K, dim=-1)
    w = w / w.sum(-1, keepdim=True)
    return ids.reshape(-1), w.reshape(-1).float(), torch.arange(T).repeat_interleave(K)


@in_process
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(13, 24, 20, 6, 2), (1, 100, 12, 4, 3), (97, 16, 8, 1, 1), (5, 16, 8, 3, 3)],
                         ids=lambda s: "T{}-D{}-F{}-E{}-K{}".format(*s))
def test_fused_moe_matches_reference(shape, dtype):
    """Includes one token, D = 100, T = 97 with a single expert, and K = E (the dense mixture)."""
    _check_fused_moe(shape, dtype, "atomic")


@in_process
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(13, 24, 20, 6, 2), (5, 16, 8, 3, 3)],
                         ids=lambda s: "T{}-D{}-F{}-E{}-K{}".format(*s))
def test_fused_moe_slot_combine_matches_reference(shape, dtype):
    _check_fused_moe(shape, dtype, "slots")


def test_fused_moe_slot_combine_rejects_other_layouts():
    bank = GLUExperts(2, 8, 4)
    r = Routing(token_ids=torch.tensor([0, 1, 1]), expert_ids=torch.tensor([0, 1, 0]), weights=torch.ones(3),
                logits=None, dropped=torch.zeros((), dtype=torch.long), num_experts=2)
    with pytest.raises(ValueError, match="K pairs"):
        fused_moe_forward(torch.randn(2, 8), r, bank, combine="slots")
    with pytest.raises(ValueError, match="combine"):
        fused_moe_forward(torch.randn(2, 8), r, bank, combine="sum")


@in_process
def test_fused_moe_slot_combine_checks_token_order_on_device():
    bank = GLUExperts(2, 8, 4)
    r = Routing(token_ids=torch.tensor([1, 0]), expert_ids=torch.tensor([0, 1]), weights=torch.ones(2),
                logits=None, dropped=torch.zeros((), dtype=torch.long), num_experts=2)
    with pytest.raises(RuntimeError, match="repeat_interleave"):
        fused_moe_forward(torch.randn(2, 8), r, bank, combine="slots")


def _check_fused_moe(shape, dtype, combine):
    T, D, Fh, E, K = shape
    gen = torch.Generator().manual_seed(1)
    empty = E - 1 if K < E else None
    expert_ids, weights, token_ids = _routing(T, E, K, gen, empty_expert=empty)
    bank64 = GLUExperts(E, D, Fh).double()
    x64 = torch.randn(T, D, dtype=torch.float64, generator=gen)
    dy64 = torch.randn(T, D, dtype=torch.float64, generator=gen)

    def run(fn, dt):
        bank = GLUExperts(E, D, Fh).to(dt)
        bank.load_state_dict({k: v.to(dt) for k, v in bank64.state_dict().items()})
        x = x64.to(dt).requires_grad_(True)
        wts = weights.double().clone().requires_grad_(True) if dt == torch.float64 else \
            weights.clone().requires_grad_(True)
        r = Routing(token_ids=token_ids, expert_ids=expert_ids, weights=wts, logits=None,
                    dropped=torch.zeros((), dtype=torch.long), num_experts=E)
        y = fn(x, r, bank)
        grads = torch.autograd.grad(y, (x, bank.gate_up_proj, bank.down_proj, wts), dy64.to(dt))
        return (y,) + grads

    ref = run(fused_moe_reference, torch.float64)
    eager = run(fused_moe_reference, dtype)
    out = run(lambda x, r, bank: fused_moe_forward(x, r, bank, combine=combine), dtype)
    for name, o, r, t in zip(("y", "dx", "d_gate_up", "d_down", "d_weights"), out, ref, eager):
        assert o.shape == r.shape, name
        assert_derived_close(o, r, t, dtype, name)
    if empty is not None:
        assert torch.all(out[2][empty] == 0) and torch.all(out[3][empty] == 0), "empty expert gets zero grad"
    if dtype == torch.float32:
        # The inference path (no pre-activations stored) computes the same output.
        bank = GLUExperts(E, D, Fh)
        bank.load_state_dict({k: v.float() for k, v in bank64.state_dict().items()})
        r = Routing(token_ids=token_ids, expert_ids=expert_ids, weights=weights, logits=None,
                    dropped=torch.zeros((), dtype=torch.long), num_experts=E)
        with torch.no_grad():
            torch.testing.assert_close(fused_moe_forward(x64.float(), r, bank, combine=combine), out[0].detach())


@in_process
def test_fused_moe_applicable(monkeypatch):
    from moekit.ops.triton_backend import fused_moe_applicable

    x = torch.randn(3, 8)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not fused_moe_applicable(x, GLUExperts(2, 8, 4)), "never the interpreter unless asked"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert fused_moe_applicable(x, GLUExperts(2, 8, 4))
    assert fused_moe_applicable(x.bfloat16(), GLUExperts(2, 8, 4))      # weights cast like `grouped`
    assert not fused_moe_applicable(x, GLUExperts(2, 8, 4, activation="gelu"))
    assert not fused_moe_applicable(x.double(), GLUExperts(2, 8, 4))


def test_fused_moe_rejects_non_swiglu_bank():
    bank = GLUExperts(2, 8, 4, activation="gelu")
    r = Routing(token_ids=torch.arange(2), expert_ids=torch.tensor([0, 1]), weights=torch.ones(2),
                logits=None, dropped=torch.zeros((), dtype=torch.long), num_experts=2)
    with pytest.raises(ValueError, match="SwiGLU"):
        fused_moe_forward(torch.randn(2, 8), r, bank)


GATE_CASES = [("softmax", True, 1.0, False), ("softmax", False, 1.0, False), ("softmax", True, 2.5, False),
              ("sigmoid", True, 1.0, True), ("sigmoid", False, 0.5, False)]


@in_process
@pytest.mark.parametrize("case", GATE_CASES, ids=lambda c: f"{c[0]}-norm{c[1]}-scale{c[2]}-bias{c[3]}")
def test_fused_topk_gate_matches_reference(case):
    score, normalize, scale, with_bias = case
    torch.manual_seed(3)
    T, E, K = 37, 12, 3
    logits = torch.randn(T, E)
    bias = torch.randn(E) * 0.3 if with_bias else None
    kw = dict(score=score, normalize=normalize, route_scale=scale, bias_E=bias)
    lg_k = logits.clone().requires_grad_(True)
    lg_r = logits.clone().requires_grad_(True)
    ids_k, w_k, p_k = fused_topk_gate(lg_k, K, **kw)
    ids_r, w_r, p_r = topk_gate_reference(lg_r, K, **kw)
    assert ids_k.dtype == torch.int64 and torch.equal(ids_k, ids_r)
    torch.testing.assert_close(w_k, w_r, rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(p_k, p_r, rtol=2e-6, atol=1e-7)
    gw, gp = torch.randn_like(w_r), torch.randn_like(p_r)
    (g_k,) = torch.autograd.grad((w_k * gw).sum() + (p_k * gp).sum(), lg_k)
    (g_r,) = torch.autograd.grad((w_r * gw).sum() + (p_r * gp).sum(), lg_r)
    torch.testing.assert_close(g_k, g_r, rtol=1e-5, atol=1e-6)
    if bias is not None:
        # The bias steers the choice only: weights are unbiased scores of the chosen experts.
        s = torch.sigmoid(logits).gather(1, ids_k)
        torch.testing.assert_close(w_k, s / s.sum(-1, keepdim=True) * scale)


@in_process
def test_fused_topk_gate_ties_go_to_lowest_index():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.5, 3.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    ids, w, _ = fused_topk_gate(logits, 2)
    assert ids.tolist() == [[1, 2], [0, 1]]
    torch.testing.assert_close(w, torch.full((2, 2), 0.5))
    ids1, _, _ = fused_topk_gate(logits, 1, score="sigmoid")
    assert ids1.tolist() == [[1], [0]]


@in_process
def test_fused_topk_gate_matches_topk_router():
    """The gate reproduces `TopKRouter.select` (softmax before, renorm)."""
    from moekit.routing.topk import TopKRouter

    torch.manual_seed(4)
    router = TopKRouter(16, 8, 2)
    logits = router.logits(torch.randn(21, 16))
    ids_r, w_r, p_r = router.select(logits)
    ids_k, w_k, p_k = fused_topk_gate(logits, 2)
    assert torch.equal(ids_k, ids_r)
    torch.testing.assert_close(w_k, w_r)
    torch.testing.assert_close(p_k, p_r)


ROUTER_GATES = [
    ("topk", dict(top_k=2)), ("topk", dict(top_k=3, norm="raw")), ("topk", dict(top_k=2, norm="scaled",
                                                                                route_scale=2.5)),
    ("switch", dict()), ("sigmoid", dict(top_k=2)), ("sigmoid", dict(top_k=3, renorm=False, route_scale=1.5)),
]


@in_process
@pytest.mark.parametrize("name,kw", ROUTER_GATES, ids=lambda v: v if isinstance(v, str) else "-".join(map(str,
                                                                                                          v.values())))
def test_routers_with_the_fused_gate_match_the_pytorch_gate(monkeypatch, name, kw):
    """`fused_gate=True` (the Triton kernel, here interpreted) routes exactly as
    `fused_gate=False`: same experts, same weights and probabilities, same router gradients."""
    from moekit.routing import build_router

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    torch.manual_seed(2)
    ref = build_router(name, d_model=16, num_experts=9, fused_gate=False, **kw)
    fast = build_router(name, d_model=16, num_experts=9, fused_gate=True, **kw)
    fast.load_state_dict(ref.state_dict())
    if name == "sigmoid":                       # a selection bias that changes choices
        for r in (ref, fast):
            r.expert_bias.copy_(torch.linspace(-0.3, 0.3, 9))
    x = torch.randn(23, 16)
    r1, r2 = ref(x), fast(x)
    assert torch.equal(r1.expert_ids, r2.expert_ids) and torch.equal(r1.token_ids, r2.token_ids)
    torch.testing.assert_close(r2.weights, r1.weights)
    torch.testing.assert_close(r2.probs, r1.probs)
    g = torch.randn_like(r1.weights)
    (r1.weights * g).sum().add(r1.probs.square().sum()).backward()
    (r2.weights * g).sum().add(r2.probs.square().sum()).backward()
    torch.testing.assert_close(fast.weight.grad, ref.weight.grad)


@in_process
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")     # NumPy's inf − inf
def test_fused_topk_gate_keeps_ids_in_range_on_nan_and_inf_rows():
    """A NaN or +inf logit makes the row's scores NaN: the kernel still picks real experts,
    the ones the reference picks (NaN ranks first, ties to the lowest index)."""
    logits = torch.randn(4, 5)
    logits[0, 2] = float("nan")
    logits[1, 3] = float("inf")
    logits[2] = float("nan")
    for score in ("softmax", "sigmoid"):
        ids, _, _ = fused_topk_gate(logits, 2, score=score)
        ids_r, _, _ = topk_gate_reference(logits, 2, score=score)
        assert ids.min() >= 0 and ids.max() < 5
        assert torch.equal(ids, ids_r), (score, ids, ids_r)


def test_gate_rejects_bad_arguments():
    with pytest.raises(ValueError, match="top_k"):
        topk_gate_reference(torch.randn(3, 4), 5)
    with pytest.raises(ValueError, match="score"):
        fused_topk_gate(torch.randn(3, 4), 2, score="relu")
    with pytest.raises(ValueError, match="float32"):
        fused_topk_gate(torch.randn(3, 4, dtype=torch.float64), 2)


# ---- full size on the GPU machine (marker `gpu`, deselected by default) ---------------------
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_grouped_mm_full_size(dtype):
    torch.manual_seed(0)
    E, I, O = 64, 2048, 1536
    counts = torch.randint(0, 300, (E,))
    counts[3] = 0
    offs = torch.cumsum(counts, 0).to(torch.int32).cuda()
    N = int(counts.sum())
    x64 = torch.randn(N, I, dtype=torch.float64, device="cuda")
    w64 = torch.randn(E, O, I, dtype=torch.float64, device="cuda") / I ** 0.5
    gy64 = torch.randn(N, O, dtype=torch.float64, device="cuda")

    def run(fn, dt):
        x = x64.to(dt).requires_grad_(True)
        w = w64.to(dt).requires_grad_(True)
        y = fn(x, w.transpose(1, 2), offs)
        return (y,) + torch.autograd.grad(y, (x, w), gy64.to(dt))

    ref, eager, out = run(grouped_mm_reference, torch.float64), run(grouped_mm_reference, dtype), \
        run(grouped_mm_triton, dtype)
    for name, o, r, t in zip(("y", "dx", "dw"), out, ref, eager):
        assert_derived_close(o, r, t, dtype, name)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("combine", ["atomic", "slots"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_gpu_fused_moe_full_size(dtype, combine):
    T, D, Fh, E, K = 2048, 1024, 768, 32, 4
    gen = torch.Generator().manual_seed(1)
    expert_ids, weights, token_ids = _routing(T, E, K, gen, empty_expert=5)
    bank64 = GLUExperts(E, D, Fh).double().cuda()
    x64 = torch.randn(T, D, dtype=torch.float64, generator=gen).cuda()
    dy64 = torch.randn(T, D, dtype=torch.float64, generator=gen).cuda()

    def run(fn, dt):
        bank = GLUExperts(E, D, Fh).to(device="cuda", dtype=dt)
        bank.load_state_dict({k: v.to(dt) for k, v in bank64.state_dict().items()})
        x = x64.to(dt).requires_grad_(True)
        wts = weights.cuda().to(torch.float64 if dt == torch.float64 else torch.float32).requires_grad_(True)
        r = Routing(token_ids=token_ids.cuda(), expert_ids=expert_ids.cuda(), weights=wts, logits=None,
                    dropped=torch.zeros((), dtype=torch.long), num_experts=E)
        y = fn(x, r, bank)
        return (y,) + torch.autograd.grad(y, (x, bank.gate_up_proj, bank.down_proj, wts), dy64.to(dt))

    ref, eager, out = run(fused_moe_reference, torch.float64), run(fused_moe_reference, dtype), \
        run(lambda x, r, bank: fused_moe_forward(x, r, bank, combine=combine), dtype)
    for name, o, r, t in zip(("y", "dx", "d_gate_up", "d_down", "d_weights"), out, ref, eager):
        assert_derived_close(o, r, t, dtype, name)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_gpu_fused_topk_gate(score):
    torch.manual_seed(0)
    logits = torch.randn(4096, 128, device="cuda")
    bias = torch.randn(128, device="cuda") * 0.1 if score == "sigmoid" else None
    ids_k, w_k, p_k = fused_topk_gate(logits, 8, score=score, bias_E=bias)
    ids_r, w_r, p_r = topk_gate_reference(logits, 8, score=score, bias_E=bias)
    assert torch.equal(ids_k, ids_r)
    torch.testing.assert_close(w_k, w_r)
    torch.testing.assert_close(p_k, p_r)


@in_process
@pytest.mark.parametrize("cap,sync_free,masked", [(None, False, False), (0.5, False, False), (0.5, True, False),
                                                  (None, True, True), (0.75, True, True)],
                         ids=["dropless", "capacity", "capacity-sync-free",
                          "mask-sync-free", "capacity+mask-sync-free"])
def test_moe_layer_takes_the_fused_path_and_matches_eager(monkeypatch, cap, sync_free, masked):
    """`MoE(backend="triton")` runs `fused_moe_forward` (slots when dropless, atomic with
    capacity or with the static layout of sync-free routing, whose dropped slots the kernels
    skip) and computes what the eager layer computes, outputs and gradients."""
    import moekit
    from moekit.ops import fused_moe as fm

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    calls = []
    real = fm.fused_moe_forward
    monkeypatch.setattr(fm, "fused_moe_forward", lambda *a, **k: calls.append(k["combine"]) or real(*a, **k))
    torch.manual_seed(0)
    ref = moekit.MoE(d_model=16, num_experts=4, top_k=2, d_hidden=8, backend="eager", capacity_factor=cap,
                     num_shared_experts=1)
    fast = moekit.MoE(d_model=16, num_experts=4, top_k=2, d_hidden=8, backend="triton", capacity_factor=cap,
                      num_shared_experts=1, sync_free=sync_free)
    fast.load_state_dict(ref.state_dict())
    from equivalence import CallWith, assert_same_outputs_and_grads

    mask = torch.rand(2, 9, generator=torch.Generator().manual_seed(1)) > 0.3 if masked else None
    assert_same_outputs_and_grads(CallWith(ref, mask=mask), CallWith(fast, mask=mask), torch.randn(2, 9, 16),
                                  rtol_y=1e-4)
    assert calls == ["atomic" if (cap or sync_free) else "slots"]
    if sync_free:
        assert fast.last_routing.keep is not None and int(ref.last_stats.dropped) == int(fast.last_stats.dropped)
