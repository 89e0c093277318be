"""Distributed checkpoints with `torch.distributed.checkpoint` (DCP) that reshard experts.

Legend: E experts (global), L = E / W experts per rank.

A rank's expert shards (L, ...) are written as DTensors sharded on dim 0 over the
expert-parallel group, so the checkpoint holds the full (E, ...) tensors in pieces with
their global offsets. Loading builds the same description for the *current* layout (any W
that divides E, or one plain process with full (E, ...) parameters) and DCP reads the rows
each rank needs. Replicated tensors are written once. Optimizer states of expert parameters
(Adam's moments, shape (L, ...)) are resharded the same way, keyed by parameter name.

The state dict may hold live objects, which is what makes resharding possible:
``{"model": model, "optimizer": optimizer, "step": 12, "rng": tensor, ...}``. Modules and
optimizers are converted on save and written back on load (optimizer states are created
first when the optimizer has not stepped yet). A plain ``model.state_dict()`` is resharded
too (its expert tensors are recognised by storage). Every other value (step counters, data
sampler and RNG states, a plain ``optimizer.state_dict()`` …) is saved *per rank* as one
blob, because such values often differ between ranks: on load each rank gets its own value
back when the world size is unchanged (a torchrun restart), and rank 0's value otherwise.

Nothing read from a checkpoint can run code: plain values may hold only tensors, numbers,
strings, None and lists, tuples and dicts of them (checked on save, TypeError otherwise) and
are read back with ``torch.load(weights_only=True)``, as DCP reads tensors; DCP's pickled
``.metadata`` is read by an unpickler that builds DCP's metadata classes and nothing else.
Anything else is refused with a ValueError naming the file.

Writes go to ``path + ".tmp"``; once every rank finished, rank 0 writes ``checksums.json``
(size and SHA-256 of every file) and renames the folder into place, so a rank killed
mid-save leaves the previous checkpoint intact and a checkpoint without checksums is
incomplete. Loading verifies the checksums first; given a folder of checkpoints, one that
fails is skipped (with a warning saying why) for the next newest.
"""
from __future__ import annotations

import dataclasses
import enum
import hashlib
import io
import json
import os
import pathlib
import pickle
import shutil
import warnings
import weakref
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist
from torch import nn

from moekit.parallel.sharding import ExpertShard, expert_shard_of, is_dtensor, sharded_tensors

__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint", "resolve_checkpoint", "verify_checkpoint",
           "to_dcp_state_dict"]

_WORLD_KEY = "__world_size__"
_CHECKSUMS = "checksums.json"
_FORMAT = "moekit-dcp-1"


def _rank_key(rank: int, key: str) -> str:
    return f"__rank{rank}__/{key}"


def _rank_world():
    return (dist.get_rank(), dist.get_world_size()) if _distributed() else (0, 1)

_MESHES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _mesh(shard: ExpertShard, device: torch.device):
    from torch.distributed.device_mesh import DeviceMesh

    per_group = _MESHES.setdefault(shard.group, {})
    if device.type not in per_group:
        per_group[device.type] = DeviceMesh.from_group(shard.group, device.type)
    return per_group[device.type]


def _as_dtensor(local: torch.Tensor, shard: ExpertShard):
    from torch.distributed.tensor import DTensor, Shard

    if local.shape[0] != shard.num_local:
        raise ValueError(f"expert shard has {local.shape[0]} rows, expected {shard.num_local}")
    return DTensor.from_local(local.detach(), _mesh(shard, local.device), [Shard(0)], run_check=False)



def _to_local(t):
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _expert_tensors() -> Dict[int, tuple]:
    """Storage pointer → (shard, shape) of every live expert shard (a plain ``model.state_dict()``
    holds detached tensors that share the parameters' storage)."""
    return {t.data_ptr(): (expert_shard_of(t), tuple(t.shape)) for t in sharded_tensors()}


def _reshard_fsdp(module: nn.Module) -> None:
    """FSDP2 keeps a root module's parameters unsharded after a forward without backward (e.g.
    an evaluation); register the sharded ones, which the optimizer holds, before naming them."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return
    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def _param_names(state: Dict[str, Any]) -> Dict[int, str]:
    modules = [(k, v) for k, v in state.items() if isinstance(v, nn.Module)]
    for _, m in modules:
        _reshard_fsdp(m)
    names = {}
    for key, m in modules:
        for n, p in m.named_parameters():
            names[id(p)] = n if len(modules) == 1 else f"{key}.{n}"
    return names


def _module_sd(module: nn.Module) -> Dict[str, Any]:
    out = {}
    for k, t in module.state_dict(keep_vars=True).items():
        s = expert_shard_of(t) if isinstance(t, torch.Tensor) else None
        out[k] = _as_dtensor(t, s) if s is not None else (t.detach() if isinstance(t, torch.Tensor) else t)
    return out


def _optim_params(opt: torch.optim.Optimizer):
    return [p for g in opt.param_groups for p in g["params"]]


def _optim_keys(opt: torch.optim.Optimizer, names: Dict[int, str]):
    params = _optim_params(opt)
    if not names:                              # no module in the dict: positions are the keys
        return params, [f"param_{i}" for i in range(len(params))]
    missing = [i for i, p in enumerate(params) if id(p) not in names]
    if missing:
        raise ValueError(f"optimizer parameters at positions {missing} are not a parameter of the modules in "
                         f"the checkpoint dict (build the optimizer after prepare_model/apply_expert_parallel, "
                         f"which replaces the expert parameters)")
    return params, [names[id(p)] for p in params]


def _optim_sd(opt: torch.optim.Optimizer, names: Dict[int, str]) -> Dict[str, Any]:
    params, keys = _optim_keys(opt, names)
    sd = opt.state_dict()
    state = {}
    for i, st in sd["state"].items():
        p = params[i]
        s = expert_shard_of(p)
        state[keys[i]] = {k: (_as_dtensor(v, s) if s is not None and isinstance(v, torch.Tensor)
                              and v.shape == p.shape else v) for k, v in st.items()}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [keys[i] for i in g["params"]]}
              for g in sd["param_groups"]]
    return {"state": state, "param_groups": groups}


def _expert_hit(t, experts):
    if not isinstance(t, torch.Tensor) or not t.numel():
        return None
    hit = experts.get(t.data_ptr())
    return hit[0] if hit is not None and tuple(t.shape) == hit[1] else None


def _holds_expert_tensor(v, experts) -> bool:
    if isinstance(v, dict):
        return any(_holds_expert_tensor(x, experts) for x in v.values())
    return _expert_hit(v, experts) is not None


def _plain(v, experts: Dict[int, tuple]):
    """A plain (nested) dict of tensors with expert shards as DTensors (e.g. model.state_dict())."""
    if isinstance(v, dict):
        return {k: _plain(x, experts) for k, x in v.items()}
    shard = _expert_hit(v, experts)
    return _as_dtensor(v, shard) if shard is not None else v


def _check_plain(v, where: str) -> None:
    """Raise TypeError unless `v` is what ``torch.load(weights_only=True)`` reads back."""
    if v is None or isinstance(v, (bool, int, float, str, bytes, torch.Tensor, torch.dtype, torch.Size)):
        return
    if isinstance(v, (list, tuple)):
        for i, x in enumerate(v):
            _check_plain(x, f"{where}[{i}]")
        return
    if isinstance(v, dict):
        for k, x in v.items():
            _check_plain(k, f"{where} key {k!r}")
            _check_plain(x, f"{where}[{k!r}]")
        return
    raise TypeError(f"checkpoint entry {where}: plain values may hold tensors, numbers, strings, None and "
                    f"lists, tuples and dicts of them (read back without unpickling code); got "
                    f"{type(v).__module__}.{type(v).__qualname__}")


def _blob(v, key: str) -> bytes:
    _check_plain(v, repr(key))
    buf = io.BytesIO()
    torch.save(v, buf)
    return buf.getvalue()


def _unblob(data: bytes, where: str):
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:          # UnpicklingError, or torch's own error for a corrupt archive
        raise ValueError(f"{where} holds something other than tensors and plain values; refused "
                         f"({type(e).__name__}: {str(e)[:300]})") from None


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP's metadata dataclasses, torch sizes, dtypes and layouts and paths; any other
    global a pickle names (a function to call, a class with side effects) is refused."""

    def find_class(self, module, name):
        obj = None
        if module.startswith("torch.distributed.checkpoint."):
            cand = getattr(__import__(module, fromlist=[name]), name, None)
            if isinstance(cand, type) and (dataclasses.is_dataclass(cand) or issubclass(cand, enum.Enum)):
                obj = cand
        elif module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
            obj = getattr(torch, name)
        elif (module, name) == ("torch.serialization", "_get_layout"):
            obj = _layout
        elif module == "pathlib" and name in ("PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath",
                                              "Path"):
            obj = getattr(pathlib, name)
        elif (module, name) == ("collections", "OrderedDict"):
            import collections
            obj = collections.OrderedDict
        if obj is None:
            raise pickle.UnpicklingError(f"refused global {module}.{name}")
        return obj


def _layout(name: str):
    layout = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(layout, torch.layout):
        raise pickle.UnpicklingError(f"refused layout {name!r}")
    return layout


def _safe_reader(path: str):
    """DCP's file reader with its metadata read by `_MetadataUnpickler`."""
    from torch.distributed.checkpoint import FileSystemReader

    class _Reader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            meta_path = os.path.join(path, ".metadata")
            try:
                with open(meta_path, "rb") as f:
                    metadata = _MetadataUnpickler(f).load()
            except Exception as e:
                raise ValueError(f"{meta_path} is not DCP metadata moekit reads; refused "
                                 f"({type(e).__name__}: {str(e)[:300]})") from None
            if not hasattr(metadata, "state_dict_metadata"):
                raise ValueError(f"{meta_path} is not DCP metadata (a {type(metadata).__name__})")
            if getattr(metadata, "storage_meta", None) is None:
                from torch.distributed.checkpoint.metadata import StorageMeta
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return _Reader(path)


def _safe_planner():
    """DCP's load planner with non-tensor entries read by ``torch.load(weights_only=True)``."""
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class _Planner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value):
            loaded = _unblob(value.getvalue(), f"entry {read_item.dest_index.fqn!r}")
            # DCP stores the value with its own (unrestricted) torch.load: hand it bytes written
            # here from the value just read safely, never the file's.
            buf = io.BytesIO()
            torch.save(loaded, buf)
            buf.seek(0)
            super().load_bytes(read_item, buf)

    return _Planner()


def _dcp_load(sd, found: str) -> None:
    import torch.distributed.checkpoint as dcp

    try:
        dcp.load(sd, storage_reader=_safe_reader(found), planner=_safe_planner(), no_dist=not _distributed())
    except ValueError:
        raise
    except (Exception, dcp.CheckpointException) as e:   # DCP wraps a rank's failure (a refused pickle …)
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise ValueError(f"cannot read checkpoint {found!r}: {reason[:500]}") from None


def to_dcp_state_dict(state: Dict[str, Any]) -> Dict[str, Any]:
    """The dict DCP writes: modules and optimizers as name-keyed dicts with expert shards as
    DTensors, other values as per-rank blobs (see the module doc)."""
    if not isinstance(state, dict):
        raise TypeError(f"state_dict must be a dict, got {type(state).__name__}")
    bad = [k for k in state if not isinstance(k, str) or k.startswith("__")]
    if bad:
        raise ValueError(f"checkpoint keys must be strings not starting with '__', got {bad}")
    experts = _expert_tensors()
    names = _param_names(state)
    rank, world = _rank_world()
    out: Dict[str, Any] = {_WORLD_KEY: world}
    for k, v in state.items():
        if isinstance(v, nn.Module):
            out[k] = _module_sd(v)
        elif isinstance(v, torch.optim.Optimizer):
            out[k] = _optim_sd(v, names)
        elif _holds_expert_tensor(v, experts):
            out[k] = _plain(v, experts)
        else:
            out[_rank_key(rank, k)] = _blob(v, k)
    return out


def _complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, ".metadata")) and os.path.isfile(os.path.join(path, _CHECKSUMS))


def _candidates(path: str) -> list:
    """Checkpoints under the directory `path`, newest (by name) first."""
    subs = [d for d in os.listdir(path) if not d.endswith((".tmp", ".old")) and not d.startswith(".")
            and os.path.isdir(os.path.join(path, d))
            and os.path.exists(os.path.join(path, d, ".metadata"))]
    return [os.path.join(path, d) for d in sorted(subs, reverse=True)]


def latest_checkpoint(path) -> Optional[str]:
    """`path` if it is a complete checkpoint, else its newest complete sub-checkpoint (by name), else
    None. Complete: written to the end (``checksums.json`` present); `verify_checkpoint` checks the bytes."""
    path = os.fspath(path)
    if _complete(path):
        return path
    if not os.path.isdir(path):
        return None
    subs = [c for c in _candidates(path) if _complete(c)]
    return subs[0] if subs else None


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def verify_checkpoint(path) -> str:
    """Check every file of the checkpoint `path` against its ``checksums.json``; returns `path`
    or raises ValueError naming the file that is missing, truncated or changed."""
    path = os.fspath(path)
    sums_path = os.path.join(path, _CHECKSUMS)
    if not os.path.isfile(sums_path):
        raise ValueError(f"{path} is incomplete: no {_CHECKSUMS} (the save did not finish)")
    try:
        with open(sums_path, "rb") as f:
            sums = json.loads(f.read())
        files = sums["files"]
        if sums.get("format") != _FORMAT or ".metadata" not in files:
            raise ValueError(f"format {sums.get('format')!r}")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{sums_path} is not a moekit checksum file ({_FORMAT}): {e}") from None
    for name, want in files.items():
        f = os.path.join(path, name)
        if os.path.basename(name) != name or not os.path.isfile(f):
            raise ValueError(f"{f} is missing")
        size = os.path.getsize(f)
        if size != want.get("size"):
            raise ValueError(f"{f} is {'truncated' if size < want.get('size', 0) else 'changed'}: {size} bytes, "
                             f"expected {want.get('size')}")
        if _sha256(f) != want.get("sha256"):
            raise ValueError(f"{f} does not match its checksum (the file was changed or corrupted)")
    return path


def resolve_checkpoint(path) -> tuple:
    """``(checkpoint, notes)``: `path` itself when it is a checkpoint (verified), else the newest
    checkpoint under it that verifies; `notes` say which newer ones were skipped and why.
    FileNotFoundError when there is none at all, ValueError when none verifies."""
    path = os.fspath(path)
    if os.path.isfile(os.path.join(path, ".metadata")):
        return verify_checkpoint(path), []
    cands = _candidates(path) if os.path.isdir(path) else []
    if not cands:
        raise FileNotFoundError(f"no checkpoint at {path!r}")
    notes, errors = [], []
    for c in cands:
        try:
            return verify_checkpoint(c), notes
        except ValueError as e:
            errors.append(str(e))
            notes.append(f"skipped {os.path.basename(c)}: {e}")
    raise ValueError(f"no complete checkpoint in {path}: " + "; ".join(errors))


def _write_checksums(tmp: str) -> None:
    files = {}
    for name in sorted(os.listdir(tmp)):
        f = os.path.join(tmp, name)
        if os.path.isfile(f):
            files[name] = {"size": os.path.getsize(f), "sha256": _sha256(f)}
    with open(os.path.join(tmp, _CHECKSUMS), "w") as f:
        f.write(json.dumps({"format": _FORMAT, "files": files}, indent=1))
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(state_dict: Dict[str, Any], path: str) -> None:
    """Write `state_dict` (see module doc) to the directory `path` from every rank (collective)."""
    path = os.fspath(path)
    sd = to_dcp_state_dict(state_dict)
    tmp = path + ".tmp"
    rank0 = not _distributed() or dist.get_rank() == 0
    if rank0:
        for stale in (tmp, path + ".old"):
            if os.path.exists(stale):
                shutil.rmtree(stale)
    if _distributed():
        dist.barrier()
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.save(sd, checkpoint_id=tmp, no_dist=not _distributed())
    if _distributed():
        dist.barrier()
    if rank0:
        _write_checksums(tmp)
        old = path + ".old"
        if os.path.exists(path):
            os.replace(path, old)
        os.replace(tmp, path)
        if os.path.exists(old):
            shutil.rmtree(old)
    if _distributed():
        dist.barrier()


@torch.no_grad()
def _init_optimizer_state(opt: torch.optim.Optimizer) -> None:
    # DCP loads into existing tensors: give a fresh optimizer its state with one step of zero
    # gradients at learning rate 0 (no parameter moves, weight decay included).
    if opt.state:
        return
    params = _optim_params(opt)
    saved_grads = [p.grad for p in params]
    lrs = [g["lr"] for g in opt.param_groups]
    for p in params:
        p.grad = torch.zeros_like(p) if p.requires_grad else None
    for g in opt.param_groups:
        g["lr"] = torch.zeros_like(g["lr"]) if isinstance(g["lr"], torch.Tensor) else 0.0
    with torch.enable_grad():
        opt.step()
    for g, lr in zip(opt.param_groups, lrs):
        g["lr"] = lr
    for p, g in zip(params, saved_grads):
        p.grad = g


def _write_back(target, loaded):
    """Copy loaded values into the user's objects; returns the value to store for plain entries."""
    if isinstance(target, torch.Tensor):
        local = _to_local(loaded)
        if local is not target:
            target.copy_(local)
        return target
    if isinstance(target, dict):
        for k in target:
            target[k] = _write_back(target[k], loaded[k])
        return target
    return loaded


@torch.no_grad()
def load_checkpoint(state_dict: Dict[str, Any], path) -> Dict[str, Any]:
    """Read the checkpoint at `path` into the objects of `state_dict` (in place; collective).

    `path` is a checkpoint directory (its checksums verified), or a directory of them (the newest
    one that verifies is read, see `resolve_checkpoint`; a warning names any newer one skipped);
    FileNotFoundError if there is none, ValueError if none verifies. Works for any number
    of ranks that divides each layer's experts, and for one plain process. Returns
    `state_dict`, its plain values replaced by the loaded ones (each rank's own when the world
    size is unchanged, else rank 0's).
    """
    found, notes = resolve_checkpoint(path)
    for note in notes:
        warnings.warn(f"load_checkpoint: {note}", stacklevel=2)
    for v in state_dict.values():
        if isinstance(v, torch.optim.Optimizer):
            _init_optimizer_state(v)
    sd = to_dcp_state_dict(state_dict)
    rank, world = _rank_world()
    saved = _safe_reader(found).read_metadata().state_dict_metadata
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        head = {_WORLD_KEY: 0}
        _dcp_load(head, found)
        src = rank if head[_WORLD_KEY] == world else 0
        blobs = {}
        for k in list(sd):
            if k.startswith("__rank"):
                key = k.split("/", 1)[1]
                del sd[k]
                if _rank_key(src, key) in saved:
                    blobs[key] = _rank_key(src, key)
                    sd[blobs[key]] = b""
                elif any(n.startswith(key + ".") for n in saved):
                    # Saved as a (resharded) dict of tensors: load into the given tensors in place.
                    sd[key] = _plain(state_dict[key], {})
                else:
                    raise KeyError(f"checkpoint {found!r} has no entry {key!r}")
        for key, v in state_dict.items():
            plain_structured = not isinstance(v, (nn.Module, torch.optim.Optimizer)) and key not in blobs
            if plain_structured and _rank_key(src, key) in saved:
                # Saved per rank but given here as a dict holding expert shards: take the blob.
                blobs[key] = _rank_key(src, key)
                sd.pop(key, None)
                sd[blobs[key]] = b""
        del sd[_WORLD_KEY]
        _dcp_load(sd, found)
    names = _param_names(state_dict)
    for k, v in state_dict.items():
        if isinstance(v, nn.Module):
            # FSDP2 parameters are DTensors and take the loaded DTensors (DCP resharded them);
            # expert shards and replicated tensors take local tensors.
            current = v.state_dict(keep_vars=True)
            v.load_state_dict({n: t if is_dtensor(current.get(n)) else _to_local(t) for n, t in sd[k].items()})
        elif isinstance(v, torch.optim.Optimizer):
            params, keys = _optim_keys(v, names)
            index = {n: i for i, n in enumerate(keys)}
            loaded = sd[k]

            def _value(i, vv):
                return vv if is_dtensor(params[i]) else _to_local(vv)
            v.load_state_dict({
                "state": {index[n]: {kk: _value(index[n], vv) for kk, vv in st.items()}
                          for n, st in loaded["state"].items()},
                "param_groups": [{**{kk: vv for kk, vv in g.items() if kk != "params"},
                                  "params": [index[n] for n in g["params"]]} for g in loaded["param_groups"]],
            })
        elif k in blobs:
            state_dict[k] = _unblob(sd[blobs[k]], f"{found}: entry {k!r}")
        else:
            _write_back(v, sd[k])
    return state_dict
