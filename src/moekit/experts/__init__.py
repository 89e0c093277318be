"""Expert banks with stacked weights (E, ...) and shared experts."""
from moekit.experts.base import ACTIVATIONS, ExpertBank, ExpertView, activation_fn
from moekit.experts.glu import GLU_ACTIVATIONS, GLUExperts
from moekit.experts.mlp import MLPExperts
from moekit.experts.shared import DenseFFN, SharedExperts

__all__ = ["ExpertBank", "ExpertView", "MLPExperts", "GLUExperts", "SharedExperts", "DenseFFN",
           "ACTIVATIONS", "GLU_ACTIVATIONS", "activation_fn", "build_experts"]


def build_experts(expert: str, *, num_experts: int, d_model: int, d_hidden: int,
                  activation: str | None = None) -> ExpertBank:
    """A bank by name: ``"mlp"`` (activation default gelu) or a GLU variant (``"swiglu"`` …)."""
    if expert == "mlp":
        return MLPExperts(num_experts, d_model, d_hidden, activation=activation or "gelu")
    if expert in GLU_ACTIVATIONS:
        return GLUExperts(num_experts, d_model, d_hidden, activation=activation or GLU_ACTIVATIONS[expert])
    raise ValueError(f"expert must be 'mlp' or one of {sorted(GLU_ACTIVATIONS)}, got {expert!r}")

# Expert designs beyond stacked FFNs (METHODS.md X3–X7).
from moekit.experts.attention import MixtureOfAttentionHeads  # noqa: E402
from moekit.experts.conv import CondConv2d  # noqa: E402
from moekit.experts.heterogeneous import HeterogeneousExperts  # noqa: E402
from moekit.experts.lora import MoLoRALinear, MoVLinear  # noqa: E402
from moekit.experts.module import ModuleExperts  # noqa: E402
from moekit.experts.smear import SMEAR  # noqa: E402

__all__ += ["ModuleExperts", "HeterogeneousExperts", "MoLoRALinear", "MoVLinear", "CondConv2d", "SMEAR",
            "MixtureOfAttentionHeads"]
