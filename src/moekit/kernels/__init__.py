"""Triton kernels (GPU fast path; also run on CPU tensors under ``TRITON_INTERPRET=1``).

Imported only by `moekit.ops` (lazily, for the ``"triton"`` backend) and by code that asks
for a fused op. Each op has a PyTorch reference of the same signature:

- `grouped_mm_triton` ↔ `moekit.ops.grouped_mm.grouped_mm_reference`;
- `fused_moe_forward` ↔ `fused_moe_reference` (gather + SwiGLU + combine + scatter);
- `fused_topk_gate` ↔ `topk_gate_reference` (softmax / sigmoid + top-k + normalisation).

Names resolve lazily: importing this package (or registering the backend) does not import
triton, because triton fixes compiled-vs-interpreted mode at its first import.
"""
import importlib

_EXPORTS = {
    "grouped_mm_triton": "grouped_gemm", "gmm": "grouped_gemm", "gmm_wgrad": "grouped_gemm",
    "fused_moe_forward": "fused_moe", "fused_moe_reference": "fused_moe", "fused_moe_applicable": "backend",
    "fused_swiglu_experts": "fused_moe", "sort_pairs": "fused_moe",
    "fused_topk_gate": "router", "topk_gate_reference": "router",
    "INTERPRET": "launch",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"moekit.kernels.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'moekit.kernels' has no attribute {name!r}")
