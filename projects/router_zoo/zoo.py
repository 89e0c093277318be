"""The router zoo of METHODS.md R9: every registered router that suits a causal LM, on one
model, at equal active FLOPs per token.

The variants themselves are the library's ``routers`` preset (`moekit.train.config.PRESETS`):
a router that runs K experts per token gets experts of hidden ``F / K`` (F = 352, the top-1
width), so every variant does the matmul work of one dense FFN of hidden F per token — the
dense twin of the top-1 model. Routers that choose their own number of experts (top-p, ReLU,
DynMoE, null experts, DSelect-k) get the width of their nominal K = 2; what they really run is
measured by the trainer from the routing taken, and the table reports that. This file says what
each variant stands for, how the zoo splits into two commands, and which routers are left out.
"""
from __future__ import annotations

# Expert width of a top-1 router: the FFN hidden of the dense twin every variant is matched to.
F = 352

# Variant of the ``routers`` preset -> the router family it stands for (METHODS.md section).
# Part 1 holds the fixed-count token-choice routers and the dense twin; part 2 the routers with
# no learned gate (hash, random), the balanced-assignment ones, and every dynamic router.
DESCRIPTIONS: dict = {
    # --- part 1
    "dense": "FLOP-matched dense twin (one SwiGLU FFN of hidden 352)",
    "switch": "Switch top-1, raw gate (G4)",
    "sampled_top1": "sampled top-1, Gumbel straight-through (T7)",
    "topk2": "softmax top-2, renormalised (G2)",
    "noisy_topk2": "Shazeer noisy top-2 (G2)",
    "gshard2": "GShard top-2, random second expert (G3)",
    "vmoe2": "V-MoE noisy top-2, raw gates",
    "cosine2": "X-MoE cosine top-2 (G12)",
    "gaussian2": "Gaussian (GMM posterior) top-2 (F3)",
    "sigmoid_bias2": "DeepSeek-V3 sigmoid top-2 + bias balancing, no aux loss (G13)",
    "shared1": "Switch top-1 of half width + 1 shared expert of half width",
    "deepseek": "DeepSeekMoE fine-grained: 16 experts of F/4, top-3 + 1 shared",
    # --- part 2
    "hash": "hash of the token id, 1 expert (G8)",
    "random1": "random expert, no learning (baseline)",
    "base": "BASE balanced assignment in training, argmax in eval (G6)",
    "sinkhorn1": "S-BASE: Sinkhorn-balanced top-1 in training (G7)",
    "top_p0.4": "top-p 0.4 + dynamic loss 1e-4 (G11)",
    "relu2": "ReMoE ReLU, L1 adapted to a target of 2 experts (G15)",
    "dynmoe": "DynMoE top-any, learned thresholds (G16)",
    "null_experts2": "AdaMoE top-2 over 8 + 1 null experts (G16)",
    "dselect_k2": "DSelect-k, 2 selectors (G10)",
}
PART = {name: (1 if i < 12 else 2) for i, name in enumerate(DESCRIPTIONS)}

# Registered routers left out, and why (the README's list; a test checks it covers the registry).
EXCLUDED = {
    "expert_choice": "not causal: whether an expert takes a token depends on later tokens' scores "
                     "(its causal=True mode is a different, token-choice rule in eval); an encoder router",
    "dense": "every expert on every token: E times the active FLOPs, so not at equal FLOPs "
             "(the FLOP-matched dense model is the `dense` twin)",
    "thor": "needs its own training loop (two forward passes per batch and a consistency loss) and "
            "evaluates the ensemble of all experts (E times the FLOPs)",
    "stable_moe": "two-stage training (learn, distil, then freeze a token-id router) that the trainer "
                  "does not schedule",
    "dense_to_sparse": "its Gumbel temperature schedule (dense to sparse) must be stepped by the "
                       "training loop, which the LM trainer does not do",
    "multihash": "inside a plain MoE layer it is the hash router (one hash per whole token); the "
                 "chunked form is `moekit.layers.MultiHashMoE`, which TransformerLM does not build",
    "task": "routes by a task id, which a language model does not have",
    "task_topk": "routes by a task id, which a language model does not have",
}


def part_names(part: int) -> list:
    """Variants of part 1 or 2 (each part is one command of about 20 minutes here)."""
    return [n for n in DESCRIPTIONS if PART[n] == part]
