"""Load a trained model from a checkpoint and sample text from it."""
from __future__ import annotations

import os
import warnings
from typing import Optional

import torch

from moekit.models.transformer import TransformerConfig, TransformerLM
from moekit.train.checkpoint import CheckpointError, load_checkpoint, read_config, resolve_checkpoint
from moekit.train.tokenizer import tokenizer_from_dict
from moekit.validate import check_bool, check_device, check_int, check_number

__all__ = ["load_model", "generate_text", "suppressed_ids"]


def _load_distributed(path: os.PathLike):
    """A checkpoint written by a ``torchrun`` job (torch.distributed.checkpoint, expert shards)
    loaded into one single-process model, or None if `path` (or its ``checkpoints/``) holds none."""
    try:
        from moekit import parallel
    except ImportError:
        return None
    for p in (path, os.path.join(path, "checkpoints")):
        if os.path.isdir(p) and parallel.latest_checkpoint(p) is not None:
            found, notes = parallel.resolve_checkpoint(p)
            for note in notes:
                warnings.warn(f"load_model: {note}", stacklevel=3)
            cfg = parallel.load_checkpoint({"config": {}}, found)["config"]
            model = TransformerLM(TransformerConfig.from_dict(cfg["model"]))
            parallel.load_checkpoint({"model": model}, found)
            return model, cfg
    return None


def suppressed_ids(tok) -> list:
    """Ids a sample must never contain: the tokenizer's unknown id (it decodes as U+FFFD)."""
    unk = getattr(tok, "unknown_id", None)
    return [] if unk is None else [unk]


def load_model(path: os.PathLike, device: str = "cpu"):
    """``(model in eval mode, tokenizer, config dict)`` from a checkpoint folder (written by a
    single process, or resharded to one process from a ``torchrun`` job's checkpoint).

    Given a variant or ``checkpoints/`` folder, the newest checkpoint whose checksums verify is
    read (a warning names any newer one skipped); nothing read can run code."""
    loaded = _load_distributed(path)
    if loaded is not None:
        model, cfg = loaded
        return model.to(device).eval(), tokenizer_from_dict(cfg["tokenizer"]), cfg
    found, notes = resolve_checkpoint(path)
    for note in notes:
        warnings.warn(f"load_model: {note}", stacklevel=2)
    cfg = read_config(found)
    try:
        model = TransformerLM(TransformerConfig.from_dict(cfg["model"]))
        tok = tokenizer_from_dict(cfg["tokenizer"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{found / 'config.json'} does not describe a moekit model ({e!r})") from None
    load_checkpoint(found, model=model, map_location=device)
    return model.to(device).eval(), tok, cfg


def generate_text(path: os.PathLike, prompt: str, *, max_new_tokens: int = 300, temperature: float = 0.8,
                  top_k=None, seed: int = 0, device: str = "cpu", offload_cache: Optional[int] = None,
                  prefetch: bool = False, offload_stats: Optional[dict] = None) -> str:
    """Sample from a checkpoint. With `offload_cache` S the experts stay in host memory with S
    per layer cached on `device` (`moekit.layers.offload_experts`, `prefetch` as there); the
    cache statistics are put into `offload_stats` when a dict is given."""
    check_int("max_new_tokens", max_new_tokens, min=0)
    check_number("temperature", temperature, min=0)
    check_int("top_k", top_k, min=1, allow_none=True)
    check_int("seed", seed)
    check_int("offload_cache", offload_cache, min=1, allow_none=True)
    check_bool("prefetch", prefetch)
    device = str(check_device("device", device))
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
    out = model.generate(ids, max_new_tokens, temperature=temperature, top_k=top_k, generator=gen,
                         suppress_ids=suppressed_ids(tok))
    if offload_cache is not None and offload_stats is not None:
        from moekit.layers.offload import offload_stats as read_stats

        offload_stats.update(read_stats(model))
    return tok.decode(out[0].tolist())
