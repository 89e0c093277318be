"""Checkpoints: safetensors weights, JSON config and trainer state, checksums; nothing is unpickled.

A checkpoint is a folder ``step_000100/`` holding

- ``model.safetensors``: the model's state dict (shared/tied tensors stored once);
- ``config.json``: the model config, tokenizer and run config (enough to rebuild and sample);
- ``trainer_state.json`` + ``trainer_state.safetensors``: optimizer state, step, data-sampler
  state, RNG states (torch CPU and CUDA, Python, NumPy) and the trainer's running counters —
  the structure as JSON, every tensor in it stored in the safetensors file;
- ``checksums.json``: size and SHA-256 of each file above, written last.

Loading parses JSON and safetensors only, so a file planted in a checkpoint cannot run code;
a pickled ``trainer_state.pt`` (older moekit) is refused. Checksums are verified on load: a
truncated or changed file makes the checkpoint *broken*, and loading a run folder falls back
to the newest checkpoint that verifies, saying which one it skipped and why.

The folder is written under ``.tmp-step_*`` and renamed into place with `os.replace`; the
``latest`` pointer is replaced the same way afterwards. A crash (or a full disk) at any moment
leaves the previous checkpoint intact.
"""
from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import random
import re
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch

__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint", "resolve_checkpoint", "verify_checkpoint",
           "read_config", "read_trainer_state", "clean_stale", "rng_state", "set_rng_state", "CheckpointError",
           "encode_tree", "decode_tree"]

LATEST = "latest"
CHECKSUMS = "checksums.json"
FORMAT = "moekit-checkpoint-1"
FILES = ("model.safetensors", "config.json", "trainer_state.json", "trainer_state.safetensors")
_STEP = re.compile(r"step_(\d+)")


class CheckpointError(ValueError):
    """A checkpoint is incomplete, broken (checksum, truncation) or holds something moekit
    refuses to read (e.g. a pickle)."""


def _safetensors():
    try:
        import safetensors.torch as st
    except ImportError as e:
        raise ImportError("checkpoints are written with safetensors: pip install 'moekit[train]'") from e
    return st


# -- RNG states as tensors and plain values ------------------------------------------------
def rng_state() -> dict:
    """Every global RNG's state as tensors, ints, floats and strings (JSON + safetensors, or a
    ``weights_only`` torch file, hold it)."""
    version, key, gauss = random.getstate()
    name, mt, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "python": {"version": int(version), "key": [int(k) for k in key], "gauss_next": gauss},
             "numpy": {"bit_generator": str(name), "key": torch.from_numpy(mt.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((int(py["version"]), tuple(int(k) for k in py["key"]), py["gauss_next"]))
    n = state["numpy"]
    np.random.set_state((n["bit_generator"], n["key"].numpy().astype(np.uint32), int(n["pos"]),
                         int(n["has_gauss"]), float(n["cached_gaussian"])))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


# -- nested values ↔ (JSON, tensors) ---------------------------------------------------------
def encode_tree(value, tensors: dict, where: str = "state"):
    """`value` as JSON-ready data, each tensor moved into `tensors` (name → tensor) and replaced
    by ``{"__tensor__": name}``. Tuples, dicts with non-string keys and non-finite floats are
    tagged so `decode_tree` gives them back as they were; anything else is a TypeError."""
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"__float__": repr(value)}
    if isinstance(value, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = value.detach().to("cpu", copy=True).contiguous()
        return {"__tensor__": name}
    if isinstance(value, tuple):
        return {"__tuple__": [encode_tree(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [encode_tree(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: encode_tree(v, tensors, f"{where}[{k!r}]") for k, v in value.items()}
        return {"__items__": [[encode_tree(k, tensors, f"{where} key"), encode_tree(v, tensors, f"{where}[{k!r}]")]
                              for k, v in value.items()]}
    raise TypeError(f"{where}: a checkpoint stores tensors, numbers, strings, None and lists, tuples and dicts "
                    f"of them; got {type(value).__module__}.{type(value).__qualname__}")


def decode_tree(data, tensors: dict):
    """Inverse of `encode_tree`."""
    if isinstance(data, list):
        return [decode_tree(v, tensors) for v in data]
    if not isinstance(data, dict):
        return data
    if len(data) == 1:
        (tag, v), = data.items()
        if tag == "__tensor__":
            return tensors[v]
        if tag == "__float__":
            return float(v)
        if tag == "__tuple__":
            return tuple(decode_tree(x, tensors) for x in v)
        if tag == "__items__":
            return {_hashable(decode_tree(k, tensors)): decode_tree(x, tensors) for k, x in v}
    return {k: decode_tree(v, tensors) for k, v in data.items()}


def _hashable(k):
    return tuple(_hashable(x) for x in k) if isinstance(k, list) else k


# -- writing -------------------------------------------------------------------------------
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_file(path: Path, data: bytes) -> None:
    """Write `data` to `path` and fsync it: every byte of a checkpoint goes through here."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _model_bytes(model: torch.nn.Module) -> bytes:
    st = _safetensors()
    sd = _unwrap(model).state_dict()
    # safetensors refuses shared storage: drop tied duplicates exactly as st.save_model does,
    # so st.load_model recognises the dropped names on load.
    metadata = {"format": "pt"}
    for kept, removed in st._remove_duplicate_names(sd).items():
        for name in removed:
            metadata[name] = kept
            del sd[name]
    return st.save({k: v.detach().cpu().contiguous() for k, v in sd.items()}, metadata=metadata)


def _step_of(p: Path) -> Optional[int]:
    m = _STEP.fullmatch(p.name)
    return int(m.group(1)) if m else None


def clean_stale(ckpt_dir: os.PathLike) -> list:
    """Remove what an interrupted save leaves behind in `ckpt_dir` (``.tmp-*`` folders, pointer
    and replaced-folder temporaries); returns the names removed."""
    ckpt_dir = Path(ckpt_dir)
    removed = []
    if not ckpt_dir.is_dir():
        return removed
    for p in ckpt_dir.iterdir():
        if p.name.startswith((".tmp-", f".{LATEST}.tmp", ".old-")):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(p.name)
    return sorted(removed)


def save_checkpoint(ckpt_dir: os.PathLike, step: int, *, model: torch.nn.Module, config: dict,
                    trainer_state: dict, keep: int = 2) -> Path:
    """Write ``ckpt_dir/step_{step:06d}`` atomically, point ``latest`` at it, keep the newest `keep`.

    A full disk raises OSError(ENOSPC) saying "no space left" and naming the file; the
    previous checkpoint is left as it was."""
    st = _safetensors()
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    clean_stale(ckpt_dir)
    dir_mode = 0o777 & ~_umask()
    final = ckpt_dir / f"step_{step:06d}"
    tmp = ckpt_dir / f".tmp-step_{step:06d}-{os.getpid()}"
    previous = latest_checkpoint(ckpt_dir, verify=False)
    current = tmp
    try:
        tmp.mkdir(mode=dir_mode)
        os.chmod(tmp, dir_mode)                       # mkdir's mode is masked; make it explicit
        tensors: dict = {}
        state_json = json.dumps(encode_tree(trainer_state, tensors, "trainer_state"), indent=1)
        files = {"model.safetensors": _model_bytes(model),
                 "config.json": json.dumps(config, indent=2).encode(),
                 "trainer_state.json": state_json.encode(),
                 "trainer_state.safetensors": st.save(tensors)}
        sums = {}
        for name, data in files.items():
            current = tmp / name
            _write_file(current, data)
            sums[name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        current = tmp / CHECKSUMS
        _write_file(current, json.dumps({"format": FORMAT, "step": int(step), "files": sums}, indent=1).encode())
        if final.exists():           # re-saving the same step (e.g. Ctrl-C right after a save)
            old = ckpt_dir / f".old-{final.name}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        current = ckpt_dir / LATEST
        ptr_tmp = ckpt_dir / f".{LATEST}.tmp-{os.getpid()}"
        _write_file(ptr_tmp, (final.name + "\n").encode())
        os.replace(ptr_tmp, ckpt_dir / LATEST)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        (ckpt_dir / f".{LATEST}.tmp-{os.getpid()}").unlink(missing_ok=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
            raise OSError(e.errno, f"no space left on device writing {current} (checkpoint of step {step}); "
                                   f"{kept}. Free space, or point the run at another disk") from e
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # Older checkpoints only: a folder of a later step (left by a run resumed from before it)
    # is history of that run and stays until this run overwrites that step.
    steps = sorted((p for p in ckpt_dir.glob("step_*") if p.is_dir() and (_step_of(p) or 0) <= step),
                   key=lambda p: _step_of(p) or 0)
    for old in steps[:-keep] if keep > 0 else []:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "_orig_mod", model)        # torch.compile wrapper


# -- finding and verifying -----------------------------------------------------------------
def _is_checkpoint_folder(p: Path) -> bool:
    marks = ("model.safetensors", "trainer_state.json", "trainer_state.safetensors", CHECKSUMS, "trainer_state.pt")
    # A folder with DCP's .metadata is a distributed checkpoint (moekit.parallel reads it).
    return p.is_dir() and not (p / ".metadata").exists() and any((p / n).exists() for n in marks)


def verify_checkpoint(path: os.PathLike) -> Path:
    """Check `path` is a complete checkpoint whose files match ``checksums.json`` (sizes and
    SHA-256); returns it, or raises CheckpointError saying what is wrong."""
    path = Path(path)
    sums_path = path / CHECKSUMS
    if not sums_path.exists():
        if (path / "trainer_state.pt").exists():
            raise CheckpointError(f"{path} was written by an older moekit: its trainer_state.pt is a pickle, "
                                  f"which moekit no longer reads (loading a pickle can run code)")
        raise CheckpointError(f"{path} is incomplete: no {CHECKSUMS} (the save did not finish)")
    try:
        sums = json.loads(sums_path.read_bytes())
        files = sums["files"]
        if sums.get("format") != FORMAT or set(files) != set(FILES):
            raise ValueError(f"format {sums.get('format')!r}, files {sorted(files)}")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{sums_path} is not a moekit checksum file ({FORMAT}): {e}") from None
    for name in FILES:
        f = path / name
        want = files[name]
        if not f.is_file():
            raise CheckpointError(f"{f} is missing")
        size = f.stat().st_size
        if size != want.get("size"):
            raise CheckpointError(f"{f} is {'truncated' if size < want.get('size', 0) else 'changed'}: "
                                  f"{size} bytes, expected {want.get('size')}")
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
        if h.hexdigest() != want.get("sha256"):
            raise CheckpointError(f"{f} does not match its checksum (the file was changed or corrupted)")
    # Checksums match what the file claims; check each file also parses as what it must be
    # (headers only), so a forged folder is skipped like a corrupted one.
    for name in FILES:
        f = path / name
        if name.endswith(".json"):
            read_json(f)
        else:
            try:
                with _safetensors().safe_open(str(f), framework="pt") as fh:
                    fh.keys()
            except Exception as e:      # safetensors' own error type
                raise CheckpointError(f"{f} is not a safetensors file ({type(e).__name__}: {e})") from None
    return path


def _pointer_note(d: Path) -> tuple:
    """(name the ``latest`` pointer of `d` names or None, note about it or None)."""
    ptr = d / LATEST
    if not ptr.exists():
        return None, f"{d} has no '{LATEST}' pointer"
    try:
        name = ptr.read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        return None, f"{ptr} is unreadable ({e}); ignored"
    if not _STEP.fullmatch(name):
        return None, f"{ptr} points outside {d} ({name[:80]!r}); ignored"
    if not (d / name).is_dir():
        return None, f"{ptr} names {name}, which does not exist; ignored"
    return name, None


def resolve_checkpoint(path: os.PathLike, *, verify: bool = True) -> tuple:
    """``(checkpoint folder, notes)`` for `path`: a ``step_*`` folder itself (verified, never
    replaced by another), or a folder holding ``step_*`` folders (or its ``checkpoints/``), whose
    newest checkpoint that verifies is taken. `notes` say which newer ones were skipped and why,
    and what was wrong with the ``latest`` pointer. FileNotFoundError when there is no
    checkpoint at all, CheckpointError when there are some and none verifies."""
    path = Path(path)
    if _is_checkpoint_folder(path):
        return (verify_checkpoint(path) if verify else path), []
    for d in (path, path / "checkpoints"):
        cands = sorted((p for p in d.glob("step_*") if p.is_dir() and _step_of(p) is not None
                        and not (p / ".metadata").exists()),
                       key=_step_of, reverse=True) if d.is_dir() else []
        if not cands and not (d / LATEST).exists():
            continue
        pointed, note = _pointer_note(d)
        notes = [note] if note else []
        errors = []
        for c in cands:
            try:
                found = verify_checkpoint(c) if verify else c
            except CheckpointError as e:
                errors.append(str(e))
                notes.append(f"skipped {c.name}: {e}")
                continue
            if pointed is not None and _step_of(Path(pointed)) < _step_of(c):
                notes.append(f"{d / LATEST} names {pointed}; {c.name} is newer and complete")
            return found, notes
        raise CheckpointError(f"no complete checkpoint in {d}: " + ("; ".join(errors) or "no step_* folders")
                              + (f" ({note})" if note else ""))
    raise FileNotFoundError(f"no checkpoint at {str(path)!r} (give a step_* folder, a variant folder or its "
                            f"checkpoints/ folder)")


def latest_checkpoint(path: os.PathLike, *, verify: bool = True) -> Optional[Path]:
    """The checkpoint `resolve_checkpoint` picks for `path`, or None if there is none that verifies."""
    try:
        return resolve_checkpoint(path, verify=verify)[0]
    except (FileNotFoundError, CheckpointError):
        return None


def read_json(path: Path):
    """A JSON file's content; a file that is not JSON raises `CheckpointError` (a ValueError) naming it."""
    try:
        return json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None


def read_config(ckpt: os.PathLike) -> dict:
    found, _ = resolve_checkpoint(ckpt)
    return read_json(found / "config.json")


def read_trainer_state(ckpt: os.PathLike, map_location="cpu") -> dict:
    """The trainer state of the checkpoint `resolve_checkpoint` picks for `ckpt` (no weights)."""
    found, _ = resolve_checkpoint(ckpt)
    return _read_state(found, map_location)


def _read_state(found: Path, map_location) -> dict:
    st = _safetensors()
    path = found / "trainer_state.safetensors"
    try:
        tensors = st.load_file(str(path), device=str(map_location))
    except Exception as e:          # safetensors' own error type: a file that is not safetensors
        raise CheckpointError(f"{path} is not a safetensors file ({type(e).__name__}: {e})") from None
    data = read_json(found / "trainer_state.json")
    try:
        return decode_tree(data, tensors)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{found / 'trainer_state.json'} does not match {path.name} ({e!r})") from None


def load_checkpoint(ckpt: os.PathLike, *, model: torch.nn.Module, map_location="cpu") -> dict:
    """Load weights into `model` (strict) and return the trainer state dict."""
    st = _safetensors()
    found, _ = resolve_checkpoint(ckpt)
    path = found / "model.safetensors"
    try:
        st.load_model(_unwrap(model), str(path), strict=True, device=str(map_location))
    except Exception as e:          # not safetensors, or weights of another model
        raise CheckpointError(f"cannot load {path} into this model ({type(e).__name__}: {e})") from None
    return _read_state(found, map_location)
