"""Shared launch machinery of the Triton kernels: interpreter mode, tile schedule, tile sizes.

Legend: N rows grouped by expert, E experts, M row tiles.

Triton decides at import whether its kernels are compiled (GPU) or interpreted
(``TRITON_INTERPRET=1``, NumPy on the CPU). moekit's kernels therefore run on CPU tensors
only when triton was imported in interpreter mode; `INTERPRET` records that. Each CPU launch
re-asserts ``TRITON_INTERPRET=1`` for its duration (Triton reads it lazily while launching),
so the rest of the process is not steered onto the interpreter by a global variable.

The grouped kernels are launched without host synchronisation: the number of row tiles is
bounded from shapes alone, ``Σ_e ceil(n_e / BM) ≤ ceil(N / BM) + min(E, N)``; each program
finds its expert and first row inside the kernel (idle programs exit at once).
"""
from __future__ import annotations

import contextlib
import os
from typing import Mapping, Optional

import torch
import triton

__all__ = ["INTERPRET", "interpreting", "launch_context", "num_tiles_bound", "gemm_config", "wgrad_config",
           "check_tiles", "GEMM_TILE_KEYS", "WGRAD_TILE_KEYS", "HALF_DTYPES", "FLOAT_DTYPES", "upcast_for_dot"]

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
HALF_DTYPES = (torch.bfloat16, torch.float16)


def _probe_interpret() -> bool:
    @triton.jit
    def _probe(x_ptr):
        pass

    return type(_probe).__name__ == "InterpretedFunction"


# Whether this process's triton interprets kernels (fixed when triton was first imported).
INTERPRET: bool = _probe_interpret()


def interpreting(device: torch.device) -> bool:
    """Whether a launch on `device` runs under the interpreter (CPU tensors)."""
    return device.type != "cuda"


@contextlib.contextmanager
def launch_context(device: torch.device):
    """Assert the interpreter's environment variable during a CPU launch; a no-op on CUDA."""
    if device.type == "cuda":
        with torch.cuda.device(device):
            yield
        return
    if not INTERPRET:
        raise RuntimeError("moekit's Triton kernels got CPU tensors but triton was imported without "
                           "TRITON_INTERPRET=1; set it before the first `import triton` to run them on the CPU")
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old


def upcast_for_dot(dtype: torch.dtype, device: torch.device) -> bool:
    """The interpreter's ``tl.dot`` is wrong for bf16 operands (triton 3.9): feed it float32.

    Products of two half-precision numbers are exact in float32, so upcasting before an
    fp32-accumulating dot is what a tensor core computes; the test keeps its meaning.
    """
    return interpreting(device) and dtype in HALF_DTYPES


def num_tiles_bound(n_rows: int, num_experts: int, block_m: int) -> int:
    """Upper bound on ``Σ_e ceil(n_e / BM)`` from shapes alone (no host sync)."""
    return triton.cdiv(n_rows, block_m) + min(num_experts, n_rows)


# Tile sizes a caller may force (a benchmark's sweep), passed as ``tiles=`` to a launcher:
# the forward kernel's keys (as `gemm_config` returns them) and the weight-gradient kernel's.
GEMM_TILE_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")
WGRAD_TILE_KEYS = ("WG_BLOCK_I", "WG_BLOCK_O", "WG_BLOCK_R", "WG_GROUP_I")


def check_tiles(tiles: Optional[Mapping[str, int]]) -> None:
    """``tiles``: None, or a mapping from some of `GEMM_TILE_KEYS` / `WGRAD_TILE_KEYS` to
    positive ints (tile sizes must also be powers of two, which triton checks)."""
    if tiles is None:
        return
    if not isinstance(tiles, Mapping):
        raise TypeError(f"tiles must be a mapping of tile sizes or None, got {type(tiles).__name__}")
    unknown = sorted(set(tiles) - set(GEMM_TILE_KEYS + WGRAD_TILE_KEYS))
    if unknown:
        raise ValueError(f"tiles: unknown keys {unknown}; expected keys among {GEMM_TILE_KEYS + WGRAD_TILE_KEYS}")
    for key, value in tiles.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"tiles[{key!r}] must be a positive int, got {value!r}")


def gemm_config(n_rows: int, n_in: int, n_out: int, num_experts: int, device: torch.device,
                dtype: torch.dtype, two_outputs: bool = False,
                tiles: Optional[Mapping[str, int]] = None) -> dict:
    """Tile sizes and launch options of the grouped forward kernel; the `GEMM_TILE_KEYS` of
    ``tiles`` replace the heuristic's choice.

    On the GPU: 128-row tiles for prefill/training (each expert holds hundreds of rows at
    the BENCHMARKS shapes), 16-row tiles when the average expert holds few rows (decode),
    where the kernel is bound by reading weights and wide K tiles keep loads long.
    Under the interpreter: small tiles (fewer NumPy ops per program matter more than count).
    """
    check_tiles(tiles)
    cfg = _gemm_heuristic(n_rows, num_experts, device, dtype, two_outputs)
    cfg.update({k: v for k, v in (tiles or {}).items() if k in GEMM_TILE_KEYS})
    return cfg


def _gemm_heuristic(n_rows, num_experts, device, dtype, two_outputs) -> dict:
    if interpreting(device):
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, num_warps=4, num_stages=1)
    # float32 operands take twice the shared memory per stage: two stages fit, three may not.
    stages = 2 if dtype == torch.float32 else 3
    rows_per_expert = n_rows / max(1, min(num_experts, n_rows))
    if rows_per_expert <= 32:
        # Few rows per expert: bound by reading weights; narrow column tiles give enough
        # programs to keep every SM streaming.
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=4)
    if rows_per_expert <= 96:
        # Mid-size groups: 64-row tiles waste less of the last tile of each expert.
        return dict(BLOCK_M=64, BLOCK_N=64 if two_outputs else 128, BLOCK_K=64, GROUP_M=8, num_warps=4,
                    num_stages=stages)
    if two_outputs:
        return dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=stages)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=stages)


def wgrad_config(device: torch.device, dtype: torch.dtype, tiles: Optional[Mapping[str, int]] = None) -> dict:
    """Tile sizes and launch options of the weight-gradient kernel (``tiles``' `WGRAD_TILE_KEYS`
    replace the heuristic's ``BLOCK_I``, ``BLOCK_O``, ``BLOCK_R``, ``GROUP_I``)."""
    check_tiles(tiles)
    if interpreting(device):
        cfg = dict(BLOCK_I=32, BLOCK_O=32, BLOCK_R=16, GROUP_I=8, num_warps=4, num_stages=1)
    else:
        cfg = dict(BLOCK_I=128, BLOCK_O=128, BLOCK_R=64, GROUP_I=8, num_warps=8,
                   num_stages=2 if dtype == torch.float32 else 3)
    cfg.update({k[len("WG_"):]: v for k, v in (tiles or {}).items() if k in WGRAD_TILE_KEYS})
    return cfg
