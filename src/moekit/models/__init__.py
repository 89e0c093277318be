"""Models built from moekit layers: the decoder-only transformer LM (more model families in later modules)."""
from moekit.models.transformer import TransformerConfig, TransformerLM, dense_twin, flops_per_token, param_counts

__all__ = ["TransformerConfig", "TransformerLM", "dense_twin", "flops_per_token", "param_counts"]
