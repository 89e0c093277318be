"""Triton kernels and their launchers (GPU fast path; also run on CPU tensors under
``TRITON_INTERPRET=1``). Nothing here imports from moekit outside this package: the autograd
ops built on these launchers, their PyTorch references and the ``"triton"`` backend live in
`moekit.ops` (`grouped_mm_triton`, `fused_moe`, `topk_gate`, `triton_backend`).

- `grouped_gemm`: the grouped GEMM kernels (`gmm`, `gmm_scatter_add`, `gmm_scatter`,
  `gmm_swiglu`, `gmm_swiglu_with_pre`, `gmm_swiglu_backward`, `gmm_wgrad`);
- `fused_moe`: the launch sequences of the fused SwiGLU experts (`swiglu_experts_forward`,
  `swiglu_experts_forward_with_pre`, `swiglu_experts_backward`, `combine_rows`);
- `router`: the fused top-k gate kernel (`topk_gate_forward`);
- `launch`: interpreter mode (`INTERPRET`), tile sizes and their overrides (`check_tiles`).

Names resolve lazily: importing this package does not import triton, because triton fixes
compiled-vs-interpreted mode at its first import.
"""
import importlib

_EXPORTS = {
    "gmm": "grouped_gemm", "gmm_scatter_add": "grouped_gemm", "gmm_scatter": "grouped_gemm",
    "gmm_swiglu": "grouped_gemm", "gmm_swiglu_with_pre": "grouped_gemm", "gmm_swiglu_backward": "grouped_gemm",
    "gmm_wgrad": "grouped_gemm",
    "combine_rows": "fused_moe", "swiglu_experts_forward": "fused_moe",
    "swiglu_experts_forward_with_pre": "fused_moe", "swiglu_experts_backward": "fused_moe",
    "topk_gate_forward": "router",
    "INTERPRET": "launch", "check_tiles": "launch", "GEMM_TILE_KEYS": "launch", "WGRAD_TILE_KEYS": "launch",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"moekit.kernels.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'moekit.kernels' has no attribute {name!r}")
