"""Keep freed memory in the process heap (glibc), so CPU training stops paying page faults.

glibc's ``malloc`` serves every block above its mmap threshold (at most 32 MiB) with a fresh
``mmap`` and returns it to the system on ``free``. A training step allocates and frees the
same large activations every step, so each one is faulted in again, a 4 KiB page at a time,
and zeroed by the kernel: the default preset's two variants took 67.6 million minor page faults
and 136 s of system time out of 802 s of CPU time (``/usr/bin/time -v``, 3 Dec 2026). With
``M_MMAP_MAX = 0`` large blocks come from the heap and with a high ``M_TRIM_THRESHOLD`` the
heap keeps them, so later steps reuse the same pages — what a caching allocator (PyTorch's on
CUDA, or jemalloc / tcmalloc preloaded) does. The price: memory freed during the run stays
with the process until it exits (its resident size is the run's high-water mark).
"""
from __future__ import annotations

import ctypes
import sys

__all__ = ["keep_freed_memory"]

_M_TRIM_THRESHOLD = -1          # glibc <malloc.h>
_M_MMAP_MAX = -4
_TRIM_BYTES = 2**31 - 1         # mallopt takes an int: trim only a free heap top above 2 GiB
_applied = False


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version") else None


def keep_freed_memory() -> bool:
    """Tune glibc's allocator for a training process (see the module docstring); True when
    applied (Linux with glibc), False elsewhere, where nothing changes. Process-wide and
    idempotent; the trainer calls it on CPU runs unless ``train.keep_freed_memory=false``."""
    global _applied
    if _applied:
        return True
    libc = _libc()
    if libc is None:
        return False
    _applied = bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_BYTES))
    return _applied
