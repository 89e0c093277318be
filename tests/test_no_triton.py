"""moekit without triton installed: everything but the kernels works, and asking for the
kernels is a clear error. Runs in a subprocess whose import system refuses ``triton``."""
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent('''
    import importlib.abc, sys

    class NoTriton(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "triton" or name.startswith("triton."):
                raise ModuleNotFoundError(f"No module named {name!r}")
            return None

    sys.meta_path.insert(0, NoTriton())
    import torch, moekit, moekit.ops
    from moekit.routing import build_router

    assert "triton" not in moekit.ops.available_backends(), moekit.ops.available_backends()
    x = torch.randn(2, 6, 16, requires_grad=True)
    for backend in ("auto", "eager", "grouped_mm"):
        for kw in ({}, {"capacity_factor": 0.5}, {"router": "sigmoid"}):
            moe = moekit.MoE(d_model=16, num_experts=4, d_hidden=8, backend=backend, **kw)
            (moe(x).sum() + moe.aux_loss).backward()
    moe = moekit.MoE(d_model=16, num_experts=4, d_hidden=8, capacity_factor=0.5, sync_free=True)
    moe(x, mask=torch.rand(2, 6) > 0.3).sum().backward()
    try:
        moekit.MoE(d_model=16, num_experts=4, backend="triton")
        raise SystemExit("backend='triton' was accepted without triton")
    except ValueError as e:
        assert "install the 'triton' extra" in str(e), e
    try:
        build_router("topk", d_model=16, num_experts=4, fused_gate=True)(torch.randn(3, 16))
        raise SystemExit("fused_gate=True ran without triton")
    except ValueError as e:
        assert "fused_gate=True" in str(e), e
    try:
        from moekit.ops.fused_moe import fused_moe_forward  # noqa: F401
        raise SystemExit("moekit.ops.fused_moe imported its kernels without triton")
    except ImportError:
        pass
    try:
        from moekit.kernels import gmm  # noqa: F401
        raise SystemExit("moekit.kernels imported its kernels without triton")
    except ImportError:
        pass
    assert "triton" not in sys.modules
    print("OK")
''')


def test_moekit_works_without_triton():
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stdout[-3000:] + r.stderr[-3000:]
