"""Finding the dense feed-forward blocks of a model and reading their weights in one form.

Legend: D model dim, F hidden dim.

Recognised dense FFNs (each becomes one `FFNSite`):

- Llama/Mistral/Qwen-style GLU MLPs: a module with ``gate_proj``, ``up_proj``, ``down_proj``
  (``nn.Linear``) and ``act_fn``;
- BERT-style layers: ``intermediate.dense`` + activation and ``output.dense``; the MoE takes
  the place of ``intermediate`` and ``output.dense`` becomes the identity, so
  ``output.LayerNorm(dropout(moe(x)) + x)`` is unchanged;
- moekit's own `DenseFFN` (GLU or MLP) outside any MoE layer;
- ``nn.Sequential(Linear, activation, Linear)``.

`DenseWeights` is the common form: GLU ``w_in`` (2F, D) with the gate rows first (moekit's and
Hugging Face v5's ``gate_up_proj`` layout), or MLP ``w_in`` (F, D) with optional biases;
``w_out`` (D, F).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from moekit.experts.shared import DenseFFN
from moekit.layers.protocol import MoELayer
from moekit.recipes.surgery import get_submodule, identify_activation, set_submodule

__all__ = ["DenseWeights", "FFNSite", "find_dense_ffns", "dense_weights_of"]


@dataclass
class DenseWeights:
    kind: str                          # "glu" | "mlp"
    activation: str                    # name in moekit.experts.ACTIVATIONS
    w_in: torch.Tensor                 # glu (2F, D) gate rows first; mlp (F, D)
    w_out: torch.Tensor                # (D, F)
    b_in: Optional[torch.Tensor] = None    # mlp only: (F,)
    b_out: Optional[torch.Tensor] = None   # (D,)

    @property
    def d_model(self) -> int:
        return self.w_out.shape[0]

    @property
    def d_hidden(self) -> int:
        return self.w_out.shape[1]


@dataclass
class FFNSite:
    """One dense FFN of a model: its dotted `name`, its weights and how to install a layer there."""

    name: str
    kind: str                          # "hf_glu" | "bert" | "moekit_dense" | "sequential"
    module: nn.Module
    read: Callable[[], DenseWeights]
    install: Callable[[nn.Module, nn.Module], None]      # (model, new_layer) -> None

    def put(self, model: nn.Module, moe: nn.Module) -> None:
        """Install `moe` here and mark a moekit TransformerLM block as an MoE block."""
        self.install(model, moe)
        parent = model.get_submodule(self.name.rpartition(".")[0]) if "." in self.name else model
        if isinstance(getattr(parent, "is_moe", None), bool):
            parent.is_moe = True

    @property
    def param_prefixes(self) -> tuple[str, ...]:
        """Dotted prefixes of the FFN's own parameters (what an MoE layer replaces)."""
        base = self.name + "." if self.name else ""
        if self.kind == "bert":
            return (base + "intermediate.", base + "output.dense.")
        return (base,)


def _no_bias(*linears: nn.Linear) -> None:
    for lin in linears:
        if lin.bias is not None:
            raise ValueError(f"GLU FFN with biases is not supported (found a bias on {lin})")


def _hf_glu(mod) -> DenseWeights:
    _no_bias(mod.gate_proj, mod.up_proj, mod.down_proj)
    w_in = torch.cat([mod.gate_proj.weight.detach(), mod.up_proj.weight.detach()], 0)
    return DenseWeights("glu", identify_activation(mod.act_fn), w_in, mod.down_proj.weight.detach())


def _bert(layer) -> DenseWeights:
    inter, out = layer.intermediate.dense, layer.output.dense
    act = identify_activation(layer.intermediate.intermediate_act_fn)
    return DenseWeights("mlp", act, inter.weight.detach(), out.weight.detach(),
                        None if inter.bias is None else inter.bias.detach(),
                        None if out.bias is None else out.bias.detach())


def _moekit_dense(mod: DenseFFN) -> DenseWeights:
    act = identify_activation(mod.act)
    if mod.glu:
        return DenseWeights("glu", act, mod.gate_up_proj.weight.detach(), mod.down_proj.weight.detach())
    return DenseWeights("mlp", act, mod.up_proj.weight.detach(), mod.down_proj.weight.detach())


def _sequential(seq) -> DenseWeights:
    a, act, b = seq
    return DenseWeights("mlp", identify_activation(act), a.weight.detach(), b.weight.detach(),
                        None if a.bias is None else a.bias.detach(), None if b.bias is None else b.bias.detach())


def _is_linear(m) -> bool:
    return isinstance(m, nn.Linear)


def _match(name: str, mod: nn.Module) -> Optional[FFNSite]:
    replace_here = lambda model, new: set_submodule(model, name, new)   # noqa: E731
    if all(_is_linear(getattr(mod, a, None)) for a in ("gate_proj", "up_proj", "down_proj")) \
            and callable(getattr(mod, "act_fn", None)):
        return FFNSite(name, "hf_glu", mod, lambda: _hf_glu(mod), replace_here)
    inter, out = getattr(mod, "intermediate", None), getattr(mod, "output", None)
    if inter is not None and out is not None and _is_linear(getattr(inter, "dense", None)) \
            and callable(getattr(inter, "intermediate_act_fn", None)) and _is_linear(getattr(out, "dense", None)):
        def install(model, new, _name=name):
            layer = get_submodule(model, _name)
            layer.intermediate = new
            layer.output.dense = nn.Identity()
        return FFNSite(name, "bert", mod, lambda: _bert(mod), install)
    if isinstance(mod, DenseFFN):
        return FFNSite(name, "moekit_dense", mod, lambda: _moekit_dense(mod), replace_here)
    if isinstance(mod, nn.Sequential) and len(mod) == 3 and _is_linear(mod[0]) and _is_linear(mod[2]) \
            and not isinstance(mod[1], (nn.Linear, nn.Dropout)) \
            and mod[0].out_features == mod[2].in_features and mod[0].in_features == mod[2].out_features:
        return FFNSite(name, "sequential", mod, lambda: _sequential(mod), replace_here)
    return None


def _is_moe_like(mod: nn.Module) -> bool:
    """A moekit MoE layer, or a foreign sparse block (an ``experts`` bank beside a ``gate`` or
    ``router``, as in every transformers MoE family): its shared experts are not dense FFNs."""
    if isinstance(mod, MoELayer):
        return True
    return hasattr(mod, "experts") and (hasattr(mod, "gate") or hasattr(mod, "router"))


def find_dense_ffns(model: nn.Module) -> list[FFNSite]:
    """Every dense FFN of `model` in module order, skipping anything inside an MoE layer
    (moekit's or a transformers sparse block)."""
    sites: list[FFNSite] = []
    skip: list[str] = []            # prefixes whose subtrees are already taken
    for name, mod in model.named_modules():
        if any(p == "" or name == p or name.startswith(p + ".") for p in skip):
            continue
        if _is_moe_like(mod):
            skip.append(name)
            continue
        site = _match(name, mod)
        if site is not None:
            sites.append(site)
            skip.append(name)
    return sites


def dense_weights_of(module: nn.Module) -> DenseWeights:
    """The `DenseWeights` of a single dense FFN module (raises ValueError if not one)."""
    site = _match("", module)
    if site is None:
        raise ValueError(f"{type(module).__name__} is not a recognised dense FFN")
    return site.read()
