"""Find host synchronisations on any device: `no_host_sync()`.

A CUDA graph (and ``torch.compile(mode="reduce-overhead")``) can only capture work whose
shapes and control flow do not depend on tensor values: reading a value on the host
(``.item()``, ``int(t)``, ``bool(t)``, ``.tolist()``) or an op whose output size depends on
the data (``nonzero``, boolean-mask indexing, ``masked_select``, ``bincount``, ``unique``,
``repeat_interleave`` by counts) waits for the device and breaks the capture.

`no_host_sync` is a `TorchDispatchMode` that raises `HostSyncError` at the first such op,
on CPU tensors too, so the property is tested without a GPU. It sees ops as they reach the
dispatcher (forward and, when the backward runs inside the block on the CPU, backward).
Limits: copies between host and device (``.cpu()``, ``torch.tensor(..., device="cuda")``) only
exist on a GPU and are not seen on CPU tensors — write device scalars with ``torch.full`` or
pass Python scalars to ops; ``Tensor.tolist`` / ``.numpy`` are patched on the class while the
mode is active, so other threads see the patch too (a test tool, not for production code).
"""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["no_host_sync", "HostSyncError", "SYNCING_OPS"]

aten = torch.ops.aten

# Ops that read device values on the host or whose output shape depends on the data.
SYNCING_OPS = {
    aten._local_scalar_dense.default: "reads a tensor value on the host (.item(), int(), bool(), float())",
    aten.is_nonzero.default: "reads a tensor value on the host (bool(tensor))",
    aten.equal.default: "torch.equal returns a host bool",
    aten.allclose.default: "torch.allclose returns a host bool",
    aten._unique.default: "output size depends on the data",
    aten.nonzero.default: "output size depends on the data",
    aten.masked_select.default: "output size depends on the data",
    aten.bincount.default: "output size depends on the data",
    aten._unique2.default: "output size depends on the data",
    aten.unique_consecutive.default: "output size depends on the data",
    aten.unique_dim.default: "output size depends on the data",
    aten.repeat_interleave.Tensor: "output size depends on the data (repeat counts)",
    aten.repeat_interleave.self_Tensor: "output size depends on the data (repeat counts)",
}
_REPEAT_OPS = {aten.repeat_interleave.Tensor, aten.repeat_interleave.self_Tensor}
_BOOL_INDEX_OPS = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default,
                   aten._index_put_impl_.default}


class HostSyncError(RuntimeError):
    pass


def _refuse(name):
    def method(self, *args, **kwargs):
        raise HostSyncError(f"Tensor.{name}() would synchronise with the host: reads tensor values")
    return method


class no_host_sync(TorchDispatchMode):
    """``with no_host_sync(): y = layer(x)`` raises `HostSyncError` naming the first op that
    would synchronise with the host on a GPU (see the module docstring)."""

    # ``Tensor.tolist`` / ``.numpy()`` read CPU memory without reaching the dispatcher:
    # they are wrapped while the mode is active.
    _HOST_READS = ("tolist", "numpy")

    def __enter__(self):
        self._saved = {name: getattr(torch.Tensor, name) for name in self._HOST_READS}
        for name in self._HOST_READS:
            setattr(torch.Tensor, name, _refuse(name))
        return super().__enter__()

    def __exit__(self, *exc):
        for name, fn in self._saved.items():
            setattr(torch.Tensor, name, fn)
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        why = SYNCING_OPS.get(func)
        if func in _REPEAT_OPS and kwargs.get("output_size") is not None:
            why = None                  # the output size is given: nothing to read back
        if why is None and func in _BOOL_INDEX_OPS:
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ()):
                why = "boolean-mask indexing: output size depends on the data"
        if why is not None:
            raise HostSyncError(f"{func} would synchronise with the host: {why}")
        return func(*args, **kwargs)
