"""Checkpoints: safetensors weights + JSON config + a torch file of trainer state, written atomically.

A checkpoint is a folder ``step_000100/`` holding

- ``model.safetensors``: the model's state dict (shared/tied tensors stored once);
- ``config.json``: the model config, tokenizer and run config (enough to rebuild and sample);
- ``trainer_state.pt``: optimizer state, step, data-sampler state, RNG states (torch CPU and
  CUDA, Python, NumPy) and the trainer's running counters.

The folder is written under a temporary name and renamed into place with `os.replace`; the
``latest`` pointer file is replaced the same way afterwards. A crash at any moment therefore
leaves the previous checkpoint and pointer intact.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch

__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint", "rng_state", "set_rng_state",
           "read_config"]

LATEST = "latest"


def _safetensors():
    try:
        import safetensors.torch as st
    except ImportError as e:
        raise ImportError("checkpoints are written with safetensors: pip install 'moekit[train]'") from e
    return st


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_atomic_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(ckpt_dir: os.PathLike, step: int, *, model: torch.nn.Module, config: dict,
                    trainer_state: dict, keep: int = 2) -> Path:
    """Write ``ckpt_dir/step_{step:06d}`` atomically, point ``latest`` at it, keep the newest `keep`."""
    st = _safetensors()
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / f"step_{step:06d}"
    tmp = Path(tempfile.mkdtemp(dir=ckpt_dir, prefix=f".tmp-step_{step:06d}-"))
    try:
        # save_model de-duplicates tied weights (safetensors refuses shared storage otherwise).
        st.save_model(_unwrap(model), str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        torch.save(trainer_state, tmp / "trainer_state.pt")
        if final.exists():           # re-saving the same step (e.g. Ctrl-C right after a save)
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _write_atomic_text(ckpt_dir / LATEST, final.name + "\n")
    steps = sorted(p for p in ckpt_dir.glob("step_*") if p.is_dir())
    for old in steps[:-keep] if keep > 0 else []:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "_orig_mod", model)        # torch.compile wrapper


def latest_checkpoint(path: os.PathLike) -> Optional[Path]:
    """The checkpoint folder `path` refers to: a ``step_*`` folder itself, a folder with a
    ``latest`` pointer, or a run folder containing ``checkpoints/``. None if there is none."""
    path = Path(path)
    if (path / "model.safetensors").exists():
        return path
    for d in (path, path / "checkpoints"):
        ptr = d / LATEST
        if ptr.exists():
            target = d / ptr.read_text().strip()
            if (target / "model.safetensors").exists():
                return target
    return None


def read_config(ckpt: os.PathLike) -> dict:
    found = latest_checkpoint(ckpt)
    if found is None:
        raise FileNotFoundError(f"no checkpoint found at {str(ckpt)!r}")
    return json.loads((found / "config.json").read_text())


def load_checkpoint(ckpt: os.PathLike, *, model: torch.nn.Module, map_location="cpu") -> dict:
    """Load weights into `model` (strict) and return the trainer state dict."""
    st = _safetensors()
    found = latest_checkpoint(ckpt)
    if found is None:
        raise FileNotFoundError(f"no checkpoint found at {str(ckpt)!r}")
    missing, unexpected = st.load_model(_unwrap(model), str(found / "model.safetensors"), strict=True,
                                        device=str(map_location))
    state_path = found / "trainer_state.pt"
    return torch.load(state_path, map_location=map_location, weights_only=False) if state_path.exists() else {}
