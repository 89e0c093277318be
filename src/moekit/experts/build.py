"""Build an expert bank by name, or check a given bank instance, for any MoE-style layer."""
from __future__ import annotations

from typing import Optional

from moekit.experts.base import ExpertBank
from moekit.experts.glu import GLU_ACTIVATIONS, GLUExperts
from moekit.experts.mlp import MLPExperts
from moekit.validate import check_choice, check_int

__all__ = ["build_experts", "resolve_experts"]


def build_experts(expert: str, *, num_experts: int, d_model: int, d_hidden: int,
                  activation: Optional[str] = None) -> ExpertBank:
    """A bank by name: ``"mlp"`` (activation default gelu) or a GLU variant (``"swiglu"`` …)."""
    check_choice("expert", expert, ("mlp", *sorted(GLU_ACTIVATIONS)))
    if activation is None:
        activation = "gelu" if expert == "mlp" else GLU_ACTIVATIONS[expert]
    if expert == "mlp":
        return MLPExperts(num_experts, d_model, d_hidden, activation=activation)
    return GLUExperts(num_experts, d_model, d_hidden, activation=activation)


def resolve_experts(experts: Optional[ExpertBank], *, expert: Optional[str], d_hidden: Optional[int],
                    activation: Optional[str], num_experts: int, d_model: int, default_expert: str,
                    default_hidden) -> ExpertBank:
    """The layer's bank: `experts` checked against the layer's sizes, or one built by name.

    `default_hidden(d_model, expert)` gives d_hidden when it is None. Giving both an instance
    and build options is an error (they would be silently ignored otherwise).
    """
    if experts is not None:
        if not isinstance(experts, ExpertBank):
            raise TypeError(f"experts must be a moekit ExpertBank, got {type(experts).__name__}")
        if expert is not None or d_hidden is not None or activation is not None:
            raise ValueError("give either experts= (an instance) or expert=/d_hidden=/activation=, not both")
        if experts.num_experts != num_experts or experts.d_model != d_model:
            raise ValueError(f"experts instance has num_experts={experts.num_experts}, d_model="
                             f"{experts.d_model}; the layer has {num_experts}, {d_model}")
        return experts
    expert = default_expert if expert is None else expert
    check_int("d_hidden", d_hidden, min=1, allow_none=True)
    d_hidden = d_hidden if d_hidden is not None else default_hidden(d_model, expert)
    return build_experts(expert, num_experts=num_experts, d_model=d_model, d_hidden=d_hidden,
                         activation=activation)
