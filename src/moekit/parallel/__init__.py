"""Expert parallelism over `torch.distributed` (DESIGN.md, METHODS.md S1).

``torchrun --nproc-per-node N train.py`` with, in the script::

    rank, world, device = moekit.parallel.init_from_env()
    model = moekit.parallel.prepare_model(model.to(device))   # shard experts, average grads
    opt = torch.optim.AdamW(model.parameters())                 # after prepare_model
    ...  loss.backward(); moekit.parallel.clip_grad_norm_(model, 1.0); opt.step()
    moekit.parallel.save_checkpoint({"model": model, "optimizer": opt, "step": step}, path)
"""
from moekit.parallel.balance import GlobalBatchSum
from moekit.parallel.checkpoint import (
                                       latest_checkpoint,
                                       load_checkpoint,
                                       resolve_checkpoint,
                                       save_checkpoint,
                                       verify_checkpoint,
)
from moekit.parallel.clip import clip_grad_norm_, grad_norm
from moekit.parallel.comm import all_reduce_sum, all_to_all_single, all_to_all_single_reference
from moekit.parallel.dispatcher import ExpertParallelDispatcher, ExpertParallelMeta
from moekit.parallel.grad_sync import GradientSync, broadcast_model, sync_gradients
from moekit.parallel.launch import init_from_env, is_distributed, prepare_model
from moekit.parallel.sharding import ExpertShard, apply_expert_parallel, expert_shard_of, is_expert_param

__all__ = [
    "apply_expert_parallel", "ExpertParallelDispatcher", "ExpertParallelMeta", "ExpertShard",
    "all_to_all_single", "all_to_all_single_reference", "all_reduce_sum",
    "GlobalBatchSum",
    "GradientSync", "sync_gradients", "broadcast_model", "clip_grad_norm_", "grad_norm",
    "init_from_env", "prepare_model", "is_distributed",
    "save_checkpoint", "load_checkpoint", "latest_checkpoint", "resolve_checkpoint", "verify_checkpoint",
    "expert_shard_of", "is_expert_param",
]
