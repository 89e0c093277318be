"""Saving and loading models made by upcycling or Branch-Train-MiX (safetensors only).

A folder holds the dense model's ``config.json`` (transformers), ``moekit_recipe.json`` — the
structural recipe: experts, top-k, granularity, which FFNs became MoE layers — and
``model.safetensors`` with every tensor. Loading builds the dense architecture from the
config (no weights), applies the same surgery to get the same modules, then loads the tensors
strictly: nothing is guessed and no pickle is read.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Union

from torch import nn

from moekit.recipes.upcycle import upcycle

__all__ = ["save_surgery", "load_surgery", "RECIPE_FILE"]

RECIPE_FILE = "moekit_recipe.json"
_STRUCTURE_KEYS = ("num_experts", "top_k", "granularity", "layers", "router", "router_kwargs")


def save_surgery(model: nn.Module, path: Union[str, os.PathLike], recipe: dict, *,
                 auto_class: str = "AutoModelForCausalLM") -> Path:
    """Write `model` (a transformers model after `upcycle` / `btx`) and its `recipe`."""
    from safetensors.torch import save_model

    missing = [k for k in _STRUCTURE_KEYS if k not in recipe]
    if missing:
        raise ValueError(f"recipe lacks {missing}")
    if not hasattr(model, "config") or not hasattr(model.config, "save_pretrained"):
        raise TypeError(f"model must be a transformers model with a config, got {type(model).__name__}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(str(path))
    (path / RECIPE_FILE).write_text(json.dumps({**recipe, "auto_class": auto_class}, indent=2))
    save_model(model, str(path / "model.safetensors"))
    return path


def load_surgery(path: Union[str, os.PathLike]) -> nn.Module:
    """The model `save_surgery` wrote, rebuilt and loaded (strict)."""
    import transformers
    from safetensors.torch import load_model

    path = Path(path)
    recipe_file = path / RECIPE_FILE
    if not recipe_file.is_file():
        raise ValueError(f"{str(path)!r} has no {RECIPE_FILE}; not written by moekit.recipes.io.save_surgery")
    recipe = json.loads(recipe_file.read_text())
    config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    model = getattr(transformers, recipe["auto_class"]).from_config(config)
    upcycle(model, recipe["num_experts"], recipe["top_k"], granularity=recipe["granularity"],
            layers=recipe["layers"], router=recipe["router"], router_kwargs=recipe["router_kwargs"] or None)
    load_model(model, str(path / "model.safetensors"), strict=True)
    return model.eval()
