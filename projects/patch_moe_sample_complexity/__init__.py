"""R6: patch-level routing (pMoE, Chowdhury et al. 2023) against a single CNN: sample complexity
and reliance on spurious patches."""
