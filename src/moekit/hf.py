"""Hugging Face checkpoints in and out: transformers v5 MoE models with moekit MoE layers.

    >>> import moekit.hf
    >>> model = moekit.hf.from_pretrained("path/to/mixtral")     # a local folder, safetensors
    >>> moekit.aux_loss(model)                                    # moekit layers inside
    >>> moekit.hf.save_pretrained(model, "out/")                  # transformers loads it back

`from_pretrained` returns the transformers model itself (same class, same ``forward`` and
``generate``) in which every sparse-MoE block — Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE,
DeepSeek-V3 — is a `moekit.MoE` holding the same weights; its logits equal the original
model's. `save_pretrained` writes a plain transformers checkpoint. Weights move only as
safetensors: a folder without ``*.safetensors`` files is refused, never unpickled.
See `moekit.recipes.hf_convert` for the mapping of each family.

The converted model fits the Hugging Face tools unchanged (recipes in docs/huggingface.md):

* ``transformers.Trainer``: with ``config.output_router_logits=True`` the model's loss adds
  ``router_aux_loss_coef`` × transformers' own balancing loss, computed from the moekit
  routers' logits — the same number as the original model's. The converted layers' state
  dicts use transformers' key names, so ``trainer.save_model`` writes a checkpoint plain
  transformers loads.
* PEFT LoRA: ``target_modules`` for attention, ``target_parameters=["mlp.experts.gate_up_proj",
  "mlp.experts.down_proj"]`` for the stacked experts (the moekit bank keeps transformers'
  names and (E, out, in) layout); adapter files load onto the original transformers model.
  Merge (``merge_and_unload``) before `save_pretrained`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

from torch import nn

from moekit.recipes.hf_convert import HF_MOE_BLOCKS, as_transformers, convert_hf_moe, converted_layers

__all__ = ["from_pretrained", "save_pretrained", "is_converted", "SUPPORTED_BLOCKS"]

SUPPORTED_BLOCKS = tuple(sorted(HF_MOE_BLOCKS))


def _require_transformers():
    try:
        import transformers
    except ImportError as e:      # pragma: no cover - the hf extra is missing
        raise ImportError("moekit.hf needs transformers: pip install 'moekit[hf]'") from e
    return transformers


def from_pretrained(path_or_model: Union[str, os.PathLike, nn.Module], *, backend: str = "auto",
                    aux_loss_coef: Optional[float] = None, auto_class: str = "AutoModelForCausalLM",
                    **load_kwargs) -> nn.Module:
    """A transformers MoE model whose sparse-MoE blocks are `moekit.MoE` layers.

    Args:
        path_or_model: a local folder holding a transformers checkpoint in safetensors, or a
            transformers model instance, which is converted **in place** and returned.
        backend: the moekit expert backend (``"auto"``, ``"eager"``, ``"grouped_mm"`` …).
        aux_loss_coef: the layers' balancing-loss weight (default: ``config.router_aux_loss_coef``).
        auto_class: the transformers auto class that loads the folder.
        load_kwargs: passed to ``from_pretrained`` (e.g. ``dtype=torch.bfloat16``).
    """
    if isinstance(path_or_model, nn.Module):
        if load_kwargs:
            raise ValueError(f"load options {sorted(load_kwargs)} only apply when loading from a folder")
        model = path_or_model
    elif isinstance(path_or_model, (str, os.PathLike)):
        path = Path(path_or_model)
        if not path.is_dir():
            raise ValueError(f"path must be a local folder with a transformers checkpoint, got {str(path)!r}")
        if not any(path.glob("*.safetensors")):
            raise ValueError(f"{str(path)!r} holds no *.safetensors file; moekit loads safetensors only")
        for key in ("use_safetensors", "local_files_only"):
            if load_kwargs.get(key, True) is not True:
                raise ValueError(f"{key} must be True (safetensors only, no downloads), got {load_kwargs[key]!r}")
            load_kwargs.pop(key, None)
        transformers = _require_transformers()
        cls = getattr(transformers, auto_class, None)
        if cls is None:
            raise ValueError(f"transformers has no {auto_class!r}")
        model = cls.from_pretrained(str(path), use_safetensors=True, local_files_only=True, **load_kwargs)
    else:
        raise TypeError(f"path_or_model must be a folder path or an nn.Module, got {type(path_or_model).__name__}")
    convert_hf_moe(model, backend=backend, aux_loss_coef=aux_loss_coef)
    return model


def save_pretrained(model: nn.Module, path: Union[str, os.PathLike], **save_kwargs) -> Path:
    """Write `model` (from `from_pretrained`) as a transformers checkpoint in safetensors.

    The folder loads with ``transformers.AutoModel*.from_pretrained`` alone and gives the same
    logits. A model with no converted layer is saved as it is. Returns the folder.
    """
    if not hasattr(model, "save_pretrained"):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    if save_kwargs.get("safe_serialization", True) is not True:
        raise ValueError("moekit saves safetensors only; safe_serialization must be True")
    save_kwargs.pop("safe_serialization", None)
    adapters = sorted({type(m).__name__ for m in model.modules() if type(m).__module__.split(".")[0] == "peft"})
    if adapters:
        raise ValueError(f"model carries PEFT adapters ({', '.join(adapters)}); merge them into the weights first "
                         "(model = model.merge_and_unload()), or save the adapters alone with the PeftModel's own "
                         "save_pretrained")
    from moekit.layers.moe import moe_layers

    foreign = len(moe_layers(model)) - len(converted_layers(model))
    if foreign:
        raise ValueError(f"{foreign} MoE layer(s) have no transformers counterpart (pruned, merged or added "
                         "after conversion); transformers could not load them from this checkpoint")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    with as_transformers(model):
        model.save_pretrained(str(path), **save_kwargs)
    if not any(path.glob("*.safetensors")):      # a transformers that wrote something else
        raise RuntimeError(f"transformers wrote no *.safetensors file into {str(path)!r}")
    return path


def is_converted(model: nn.Module) -> bool:
    """True if `model` has at least one moekit layer converted from a transformers block."""
    return bool(converted_layers(model))
