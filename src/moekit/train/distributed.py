"""The trainer's only contact with `moekit.parallel` (implemented elsewhere), kept in one place.

When ``WORLD_SIZE > 1`` (e.g. under ``torchrun``) the trainer calls
``moekit.parallel.init_from_env() -> (rank, world_size, device)``, wraps the model with
``moekit.parallel.prepare_model(model)`` (expert parallel + data parallel of the rest) and
saves/loads through ``moekit.parallel.save_checkpoint(state, path)`` /
``load_checkpoint(state, path)`` and clips with ``moekit.parallel.clip_grad_norm_`` (the global
norm over sharded experts). Only rank 0 writes logs and reports.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

__all__ = ["DistContext", "distributed_context"]


@dataclass
class DistContext:
    rank: int
    world_size: int
    device: Any
    parallel: Any            # the moekit.parallel module

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def prepare_model(self, model, *, fsdp: bool = False):
        return self.parallel.prepare_model(model, fsdp=fsdp)

    def save_checkpoint(self, state: dict, path) -> None:
        self.parallel.save_checkpoint(state, path)

    def resolve_checkpoint(self, path):
        """``(newest checkpoint under `path` that verifies, notes on newer ones skipped)``."""
        return self.parallel.resolve_checkpoint(path)

    def load_checkpoint(self, state: dict, path) -> dict:
        """Loads model/optimizer in place; returns `state` with its plain values loaded."""
        return self.parallel.load_checkpoint(state, path)

    def clip_grad_norm_(self, model, max_norm: float) -> float:
        return float(self.parallel.clip_grad_norm_(model, max_norm))


def distributed_context() -> Optional[DistContext]:
    """None in a single process; else the initialised context (ImportError if moekit.parallel
    lacks the functions above)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    import moekit.parallel as parallel

    for fn in ("init_from_env", "prepare_model", "save_checkpoint", "load_checkpoint", "resolve_checkpoint",
               "clip_grad_norm_"):
        if not hasattr(parallel, fn):
            raise ImportError(f"WORLD_SIZE={world} needs moekit.parallel.{fn}, which is not available")
    rank, world_size, device = parallel.init_from_env()
    return DistContext(int(rank), int(world_size), device, parallel)
