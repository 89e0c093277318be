"""Ops: permute / unpermute, grouped matmul and top-k, each with a pure-PyTorch reference.

The ops on the Triton kernels (`moekit.kernels`) are imported by module, on demand, since
importing them imports triton: `grouped_mm_triton` (the ``"triton"`` backend, registered by
`triton_backend`), `fused_moe` (fused SwiGLU experts) and `topk_gate` (the fused gate);
`fused.fused_experts` and `gate.topk_gate` choose them where they apply.
"""
from moekit.ops.backends import Backend, available_backends, register_backend, resolve_backend
from moekit.ops.counting import count_ids
from moekit.ops.dispatch import DispatchMeta, LocalDispatcher, permute, unpermute
from moekit.ops.grouped_mm import fast_supported, grouped_mm_fast, grouped_mm_reference, offsets_from_counts
from moekit.ops.sync import HostSyncError, no_host_sync
from moekit.ops.topk import topk_stable

__all__ = [
    "Backend", "available_backends", "register_backend", "resolve_backend", "DispatchMeta",
    "LocalDispatcher", "permute", "unpermute", "fast_supported", "grouped_mm_fast",
    "grouped_mm_reference", "offsets_from_counts", "topk_stable", "count_ids", "no_host_sync",
    "HostSyncError",
]
