"""Process-group start-up from the `torchrun` environment and one-call model preparation."""
from __future__ import annotations

import datetime
import os
from typing import Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from moekit.parallel.grad_sync import GRAD_SYNC_MODES, GradientSync, broadcast_model
from moekit.parallel.sharding import apply_expert_parallel

__all__ = ["init_from_env", "prepare_model", "is_distributed"]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def init_from_env(backend: Optional[str] = None, timeout_s: float = 600.0) -> Tuple[int, int, torch.device]:
    """Start the default process group from torchrun's variables; returns ``(rank, world_size, device)``.

    Reads RANK, WORLD_SIZE, LOCAL_RANK (and MASTER_ADDR/MASTER_PORT through ``env://``).
    Backend: NCCL when CUDA is available, else gloo (override with `backend`). Each rank
    uses ``cuda:LOCAL_RANK`` on GPUs. Without WORLD_SIZE (a plain ``python`` run) nothing is
    started and ``(0, 1, device)`` is returned. Calling it again returns the running group's values.
    """
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), device
    if "WORLD_SIZE" not in os.environ:
        if cuda:
            torch.cuda.set_device(device)
        return 0, 1, device
    backend = backend or ("nccl" if cuda else "gloo")
    if backend not in ("nccl", "gloo", "cpu:gloo,cuda:nccl"):
        raise ValueError(f"backend must be 'nccl', 'gloo' or 'cpu:gloo,cuda:nccl', got {backend!r}")
    if cuda:
        torch.cuda.set_device(device)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    timeout = datetime.timedelta(seconds=timeout_s)
    # Our own store keys per restart: after `torchrun --max-restarts` restarts the group, keys
    # left by the dead attempt (e.g. gloo's peer addresses) must not be read by the new one.
    use_agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                          is_master=(rank == 0 and not use_agent_store), timeout=timeout)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.PrefixStore(f"moekit/attempt_{attempt}", store)
    dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
    return dist.get_rank(), dist.get_world_size(), device


def prepare_model(model: nn.Module, *, mesh=None, ep_dim: str = "ep", dp_dim: str = "dp",
                  grad_sync: str = "hooks", balance_scope: str = "global", broadcast: bool = True,
                  fsdp: bool = False) -> nn.Module:
    """Make `model` train on every rank like one process on the concatenated batch (in place).

    1. broadcast rank 0's parameters and buffers (so every rank starts identical);
    2. `apply_expert_parallel` over the world, or over ``mesh[ep_dim]`` of a 2-D DeviceMesh
       (data × expert, e.g. ``init_device_mesh("cuda", (2, 4), mesh_dim_names=("dp", "ep"))``);
    3. a `GradientSync`: non-expert gradients averaged over all ranks, expert shards over
       ``mesh[dp_dim]`` (ranks holding the same shard). ``grad_sync="hooks"`` does it inside
       every backward; ``"manual"`` waits for `moekit.parallel.sync_gradients(model)`.

    ``fsdp=True``: the non-expert parameters (everything outside the MoE layers) are sharded
    with FSDP2 (``torch.distributed.fsdp.fully_shard``) over all ranks instead of replicated;
    FSDP reduce-scatters their gradients, and the `GradientSync` handles only the MoE layers'
    parameters (expert shards, routers, shared experts). Build the optimizer afterwards.
    Checkpoints and `clip_grad_norm_` are not yet tested with FSDP-sharded parameters.

    With a single process (no process group or world size 1) the model is returned unchanged.
    Returns the same module object (state_dict keys are unchanged, no wrapper).
    """
    if grad_sync not in GRAD_SYNC_MODES:
        raise ValueError(f"grad_sync must be one of {GRAD_SYNC_MODES}, got {grad_sync!r}")
    if getattr(model, "_moekit_grad_sync", None) is not None:
        raise ValueError("prepare_model was already applied to this model")
    if not is_distributed():
        if mesh is not None:
            raise ValueError("mesh given but torch.distributed is not initialised with more than one rank")
        return model
    ep_group = None
    edp_group = None
    if mesh is not None:
        names = mesh.mesh_dim_names or ()
        if ep_dim not in names:
            raise ValueError(f"mesh has dims {names}; expected an expert dim named {ep_dim!r}")
        ep_group = mesh[ep_dim].get_group()
        if mesh.ndim == 2:
            if dp_dim not in names:
                raise ValueError(f"2-D mesh has dims {names}; expected {dp_dim!r} and {ep_dim!r}")
            edp_group = mesh[dp_dim].get_group()
        elif mesh.ndim != 1:
            raise ValueError(f"mesh must be 1-D (ep) or 2-D (dp, ep), got {mesh.ndim}-D")
    if broadcast:
        broadcast_model(model)
    apply_expert_parallel(model, ep_group, balance_scope=balance_scope)
    if fsdp:
        _apply_fsdp(model)
    model._moekit_grad_sync = GradientSync(model, expert_data_group=edp_group, mode=grad_sync)
    model._moekit_ep_group = ep_group
    return model


def _apply_fsdp(model: nn.Module) -> None:
    """FSDP2 over a 1-D mesh of all ranks for every parameter outside the MoE layers."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from moekit.layers import moe_layers

    moe_params = {p for layer in moe_layers(model) for p in layer.parameters()}
    if not any(p not in moe_params for p in model.parameters()):
        raise ValueError("fsdp=True: the model has no parameters outside its MoE layers to shard")
    device_type = next(model.parameters()).device.type
    world_mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    fully_shard(model, mesh=world_mesh, ignored_params=moe_params)
