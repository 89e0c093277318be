"""Load a trained model from a checkpoint and sample text from it."""
from __future__ import annotations

import os
from typing import Optional

import torch

from moekit.models.transformer import TransformerConfig, TransformerLM
from moekit.train.checkpoint import latest_checkpoint, load_checkpoint, read_config
from moekit.train.tokenizer import tokenizer_from_dict

__all__ = ["load_model", "generate_text"]


def _find(path: os.PathLike):
    found = latest_checkpoint(path)
    if found is None:
        raise FileNotFoundError(f"no checkpoint at {str(path)!r} (give a step_* folder, a variant folder "
                                f"or its checkpoints/ folder)")
    return found


def _load_distributed(path: os.PathLike):
    """A checkpoint written by a ``torchrun`` job (torch.distributed.checkpoint, expert shards)
    loaded into one single-process model, or None if `path` holds none."""
    try:
        from moekit import parallel
    except ImportError:
        return None
    found = parallel.latest_checkpoint(path) if os.path.isdir(path) else None
    if found is None:
        return None
    cfg = parallel.load_checkpoint({"config": {}}, found)["config"]
    model = TransformerLM(TransformerConfig.from_dict(cfg["model"]))
    parallel.load_checkpoint({"model": model}, found)
    return model, cfg


def load_model(path: os.PathLike, device: str = "cpu"):
    """``(model in eval mode, tokenizer, config dict)`` from a checkpoint folder (written by a
    single process, or resharded to one process from a ``torchrun`` job's checkpoint)."""
    if latest_checkpoint(path) is None:
        loaded = _load_distributed(path) or _load_distributed(os.path.join(path, "checkpoints"))
        if loaded is not None:
            model, cfg = loaded
            return model.to(device).eval(), tokenizer_from_dict(cfg["tokenizer"]), cfg
    found = _find(path)
    cfg = read_config(found)
    model = TransformerLM(TransformerConfig.from_dict(cfg["model"]))
    load_checkpoint(found, model=model, map_location=device)
    return model.to(device).eval(), tokenizer_from_dict(cfg["tokenizer"]), cfg


def generate_text(path: os.PathLike, prompt: str, *, max_new_tokens: int = 300, temperature: float = 0.8,
                  top_k=None, seed: int = 0, device: str = "cpu", offload_cache: Optional[int] = None,
                  prefetch: bool = False, offload_stats: Optional[dict] = None) -> str:
    """Sample from a checkpoint. With `offload_cache` S the experts stay in host memory with S
    per layer cached on `device` (`moekit.layers.offload_experts`, `prefetch` as there); the
    cache statistics are put into `offload_stats` when a dict is given."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if prefetch and offload_cache is None:
        raise ValueError("prefetch=True needs offload_cache")
    if offload_cache is None:
        model, tok, _ = load_model(path, device)
    else:
        # Load on the host and offload before moving: the experts never need room on `device`.
        from moekit.layers.offload import offload_experts

        model, tok, _ = load_model(path, "cpu")
        offload_experts(model, cache_size=offload_cache, prefetch=prefetch, device=device)
        model.to(device)
    ids = tok.encode(prompt if prompt else "\n")[None].to(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    out = model.generate(ids, max_new_tokens, temperature=temperature, top_k=top_k, generator=gen)
    if offload_cache is not None and offload_stats is not None:
        from moekit.layers.offload import offload_stats as read_stats

        offload_stats.update(read_stats(model))
    return tok.decode(out[0].tolist())
