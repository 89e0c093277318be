"""Hugging Face transformers v5 MoE blocks ⇄ `moekit.MoE`, in place inside a transformers model.

Legend: E experts, D model dim, F expert hidden dim, K experts per token.

transformers v5 stores every MoE family's experts fused as 3-D parameters — ``gate_up_proj``
(E, 2F, D) with the gate rows first and ``down_proj`` (E, D, F) — which is exactly moekit's
`GLUExperts` layout, and the router as ``gate.weight`` (E, D), moekit's router layout. So
conversion moves no expert data: the moekit layer takes the very ``nn.Parameter`` objects of
the Hugging Face block. Only the dense shared expert is re-packed (``gate_proj`` and
``up_proj`` (F, D) → one ``gate_up_proj`` (2F, D)).

Families and how their routing maps (read from the block itself, not guessed from names):

==================  ===============================  =======================================
HF block            HF routing                       moekit router
==================  ===============================  =======================================
Mixtral             softmax → top-k → renormalise    TopKRouter(norm="renorm")
Qwen2-MoE           softmax → top-k (→ renorm if     TopKRouter(norm="renorm"|"raw") +
                    norm_topk_prob) + shared expert  SharedExperts(gate=True)
                    × sigmoid gate
Qwen3-MoE, OLMoE    softmax → top-k (→ renorm if     TopKRouter(norm="renorm"|"raw")
                    norm_topk_prob)
DeepSeek-V3         sigmoid, +e_score_correction_    SigmoidRouter(num_groups, topk_groups,
                    bias for choice, group-limited,  route_scale, renorm), expert_bias =
                    renorm, × routed_scaling_factor  e_score_correction_bias; SharedExperts
==================  ===============================  =======================================

A converted layer's state dict uses the transformers block's key names (``gate.weight``,
``shared_expert.gate_proj.weight`` …; views of the moekit tensors, no copy), and loads
either names. So the model's own ``save_pretrained`` — the one ``transformers.Trainer``
calls for ``save_model`` and its checkpoints — writes a checkpoint plain transformers loads,
and PEFT adapter files name the same keys as on the original model.

`as_transformers(model)` puts freshly built Hugging Face blocks (sharing the moekit
tensors) back for the duration of a ``with`` block, so ``save_pretrained`` writes a genuine
transformers checkpoint, in transformers' own on-disk format.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from moekit.experts.glu import GLUExperts
from moekit.experts.shared import SharedExperts
from moekit.layers.moe import MoE
from moekit.recipes.surgery import identify_activation, materialise_buffers, set_submodule
from moekit.routing.sigmoid import SigmoidRouter
from moekit.routing.topk import TopKRouter

__all__ = ["HF_MOE_BLOCKS", "HFOrigin", "convert_hf_moe", "as_transformers", "converted_layers",
           "moe_from_hf_block", "hf_block_from_moe"]

# transformers block class name -> family (the families whose routing is mapped exactly).
HF_MOE_BLOCKS = {
    "MixtralSparseMoeBlock": "mixtral",
    "Qwen2MoeSparseMoeBlock": "qwen2_moe",
    "Qwen3MoeSparseMoeBlock": "qwen3_moe",
    "OlmoeSparseMoeBlock": "olmoe",
    "DeepseekV3MoE": "deepseek_v3",
}


@dataclass(frozen=True)
class HFOrigin:
    """Where a converted layer came from: enough to rebuild the transformers block."""

    family: str
    block_class: type
    config: Any


def _record_router_logits_hook():
    """A forward hook on the moekit router that feeds transformers' ``output_router_logits``.

    transformers collects router logits with hooks on its own router classes, which are gone
    after conversion; this hook appends the moekit router's (T, E) logits to the same
    collector. Returns None when this transformers version has no such collector.
    """
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:
        return None

    def hook(module, args, routing):
        collected = _active_collector.get()
        if collected is not None and "router_logits" in collected:
            collected["router_logits"].append(routing.logits)

    return hook


# moekit key -> transformers key, per family, inside a converted layer's state dict.
_RENAMES = {
    "mixtral": {"router.weight": "gate.weight"},
    "qwen3_moe": {"router.weight": "gate.weight"},
    "olmoe": {"router.weight": "gate.weight"},
    "qwen2_moe": {"router.weight": "gate.weight",
                  "shared_experts.ffn.down_proj.weight": "shared_expert.down_proj.weight",
                  "shared_experts.gate.weight": "shared_expert_gate.weight"},
    "deepseek_v3": {"router.weight": "gate.weight",
                    "router.expert_bias": "gate.e_score_correction_bias",
                    "shared_experts.ffn.down_proj.weight": "shared_experts.down_proj.weight"},
}
# The shared expert's (2F, D) gate_up weight is two (F, D) weights in transformers: the gate rows first.
_SPLITS = {
    "qwen2_moe": ("shared_experts.ffn.gate_up_proj.weight",
                  "shared_expert.gate_proj.weight", "shared_expert.up_proj.weight"),
    "deepseek_v3": ("shared_experts.ffn.gate_up_proj.weight",
                    "shared_experts.gate_proj.weight", "shared_experts.up_proj.weight"),
}


def _to_hf_keys(module, state_dict, prefix, local_metadata):
    """State-dict post-hook of a converted layer: moekit keys -> the transformers block's keys.

    Only the exact keys of the layer's own tensors are renamed; anything else under the layer
    (e.g. PEFT's ``base_layer``/``lora_A`` keys once adapters wrap a module) is left as it is.
    """
    family = module.hf_origin.family
    for src, dst in _RENAMES[family].items():
        if prefix + src in state_dict:
            state_dict[prefix + dst] = state_dict.pop(prefix + src)
    if family in _SPLITS:
        src, gate, up = _SPLITS[family]
        if prefix + src in state_dict:
            w_2FD = state_dict.pop(prefix + src)
            F = w_2FD.shape[0] // 2
            state_dict[prefix + gate], state_dict[prefix + up] = w_2FD[:F], w_2FD[F:]


def _from_hf_keys(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    """Load-state-dict pre-hook: the transformers block's keys -> moekit keys (moekit keys load as they are)."""
    family = module.hf_origin.family
    for src, dst in _RENAMES[family].items():
        if prefix + dst in state_dict and prefix + src not in state_dict:
            state_dict[prefix + src] = state_dict.pop(prefix + dst)
    if family in _SPLITS:
        src, gate, up = _SPLITS[family]
        if prefix + gate in state_dict and prefix + up in state_dict and prefix + src not in state_dict:
            state_dict[prefix + src] = torch.cat([state_dict.pop(prefix + gate), state_dict.pop(prefix + up)], 0)


def _dense_glu(mlp: nn.Module) -> tuple[torch.Tensor, torch.Tensor, nn.Parameter]:
    """(gate (F, D), up (F, D), down (D, F)) of an HF ``*MLP`` with gate_proj/up_proj/down_proj."""
    return mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight


def moe_from_hf_block(block: nn.Module, config: Any = None, *, backend: str = "auto",
                      aux_loss_coef: Optional[float] = None) -> MoE:
    """A `moekit.MoE` computing what the transformers MoE block `block` computes.

    The expert and router parameters are the block's own ``nn.Parameter`` objects (no copy);
    the shared expert's gate and up projections are concatenated into one new parameter.
    ``aux_loss_coef`` defaults to ``config.router_aux_loss_coef`` (0 if the config has none).
    """
    family = HF_MOE_BLOCKS.get(type(block).__name__)
    if family is None:
        raise TypeError(f"not a supported transformers MoE block: {type(block).__name__}; "
                        f"supported: {sorted(HF_MOE_BLOCKS)}")
    if getattr(block, "jitter_noise", 0.0):
        raise ValueError(f"router_jitter_noise={block.jitter_noise} has no moekit equivalent (it scales the "
                         "expert inputs too); set it to 0 before converting")
    gate, hf_experts = block.gate, block.experts
    E, D = gate.weight.shape
    F = hf_experts.down_proj.shape[-1]
    K = gate.top_k
    act = identify_activation(hf_experts.act_fn)
    if aux_loss_coef is None:
        aux_loss_coef = float(getattr(config, "router_aux_loss_coef", 0.0) or 0.0)
    device = gate.weight.device

    # Built on meta: no random init of tensors that are replaced at once.
    with torch.device("meta"):
        if family == "deepseek_v3":
            router = SigmoidRouter(D, E, K, num_groups=gate.num_group, topk_groups=gate.topk_group,
                                   route_scale=float(gate.routed_scaling_factor), renorm=bool(gate.norm_topk_prob))
        else:
            norm = "renorm" if getattr(gate, "norm_topk_prob", True) else "raw"
            router = TopKRouter(D, E, K, norm=norm, softmax="before")
        bank = GLUExperts(E, D, F, activation=act)
        shared = None
        if family == "qwen2_moe":
            Fs = block.shared_expert.gate_proj.weight.shape[0]
            shared = SharedExperts(D, Fs, 1, expert="swiglu", activation=act, gate=True)
            src = block.shared_expert
        elif family == "deepseek_v3":
            Fs = block.shared_experts.gate_proj.weight.shape[0]
            n_sh = int(getattr(config, "n_shared_experts", 1) or 1)
            n_sh = n_sh if Fs % n_sh == 0 else 1
            shared = SharedExperts(D, Fs // n_sh, n_sh, expert="swiglu", activation=act)
            src = block.shared_experts

    moe = MoE(d_model=D, num_experts=E, top_k=K, router=router, experts=bank,
              aux_loss_coef=aux_loss_coef, backend=backend)
    router.weight = gate.weight
    if family == "deepseek_v3":
        # The bias only orders experts; moekit keeps it in float32 for its bias updates.
        router.expert_bias = gate.e_score_correction_bias.detach().to(torch.float32).clone()
    bank.gate_up_proj = hf_experts.gate_up_proj
    bank.down_proj = hf_experts.down_proj
    if shared is not None:
        g, u, d = _dense_glu(src)
        shared.ffn.gate_up_proj.weight = nn.Parameter(torch.cat([g.detach(), u.detach()], 0),
                                                      requires_grad=g.requires_grad)
        shared.ffn.down_proj.weight = d
        if shared.gate is not None:
            shared.gate.weight = block.shared_expert_gate.weight
        moe.shared_experts = shared
    materialise_buffers(moe, device)
    moe.aux_loss = torch.zeros((), device=device)
    moe.train(block.training)
    moe.hf_origin = HFOrigin(family=family, block_class=type(block), config=config)
    moe.register_state_dict_post_hook(_to_hf_keys)
    moe.register_load_state_dict_pre_hook(_from_hf_keys)
    return moe


def hf_block_from_moe(moe: MoE) -> nn.Module:
    """The transformers block a converted layer came from, rebuilt around the layer's tensors.

    Raises ValueError if the layer no longer fits its block (experts pruned, router swapped…).
    """
    origin: Optional[HFOrigin] = getattr(moe, "hf_origin", None)
    if origin is None:
        raise ValueError("this MoE layer was not converted from a transformers block (no hf_origin)")
    with torch.device("meta"):
        block = origin.block_class(origin.config)
    sd = {"gate.weight": moe.router.weight,
          "experts.gate_up_proj": moe.experts.gate_up_proj,
          "experts.down_proj": moe.experts.down_proj}
    sh = moe.shared_experts
    if origin.family in ("qwen2_moe", "deepseek_v3"):
        if sh is None:
            raise ValueError(f"{origin.family} layer has lost its shared expert")
        gu = sh.ffn.gate_up_proj.weight
        F = gu.shape[0] // 2
        prefix = "shared_expert" if origin.family == "qwen2_moe" else "shared_experts"
        sd.update({f"{prefix}.gate_proj.weight": gu[:F], f"{prefix}.up_proj.weight": gu[F:],
                   f"{prefix}.down_proj.weight": sh.ffn.down_proj.weight})
        if origin.family == "qwen2_moe":
            sd["shared_expert_gate.weight"] = sh.gate.weight
        else:
            sd["gate.e_score_correction_bias"] = moe.router.expert_bias
    expected = {k: tuple(v.shape) for k, v in block.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in sd.items()}
    if expected != got:
        raise ValueError(f"the moekit layer no longer matches its {origin.block_class.__name__} "
                         f"(config says {expected}, layer has {got}); update the config before saving")
    block.load_state_dict(sd, strict=True, assign=True)
    block.train(moe.training)
    return block


def converted_layers(model: nn.Module) -> list[tuple[str, MoE]]:
    """(name, layer) of every MoE layer in `model` that came from a transformers block."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MoE) and hasattr(m, "hf_origin")]


def convert_hf_moe(model: nn.Module, *, backend: str = "auto", aux_loss_coef: Optional[float] = None) -> int:
    """Replace, in place, every supported transformers MoE block of `model` by a `moekit.MoE`.

    Returns the number of blocks converted; raises ValueError if there were none.
    """
    config = getattr(model, "config", None)
    targets = [(n, m) for n, m in model.named_modules() if type(m).__name__ in HF_MOE_BLOCKS]
    if not targets:
        have = sorted({type(m).__name__ for m in model.modules() if "moe" in type(m).__name__.lower()})
        raise ValueError(f"found no transformers MoE block to convert; supported: {sorted(HF_MOE_BLOCKS)}"
                         + (f", model has {have}" if have else ""))
    record = None
    from_model = type(model).__mro__
    if any("router_logits" in (getattr(c, "_can_record_outputs", None) or {}) for c in from_model):
        record = _record_router_logits_hook()
    for name, block in targets:
        moe = moe_from_hf_block(block, config, backend=backend, aux_loss_coef=aux_loss_coef)
        if record is not None:
            moe.router.register_forward_hook(record)
        set_submodule(model, name, moe)
    return len(targets)


@contextmanager
def as_transformers(model: nn.Module):
    """Within the ``with`` block, `model`'s converted layers are transformers blocks again
    (sharing the same tensors); on exit the moekit layers are back."""
    swapped = []
    try:
        for name, moe in converted_layers(model):
            block = hf_block_from_moe(moe)
            set_submodule(model, name, block)
            swapped.append((name, moe))
        yield model
    finally:
        for name, moe in swapped:
            set_submodule(model, name, moe)
