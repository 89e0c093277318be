"""The peers both benchmark scripts time beside moekit, built from the installed libraries.

Legend: T tokens, D model dim, F expert hidden dim, E experts, K experts per token, A experts
hit by a batch (the union of the T·K choices).

Every peer is ``fn(x_TD) -> y_TD`` over the weights of one `moekit.MoE` layer whose router is
``TopKRouter(norm="renorm", softmax="before")`` — softmax over the E logits, top-k, the K
weights renormalised to sum 1 — which is what every peer here computes:

=========================  ==========================================  ======================
peer                       routing as the peer defines it              weights
=========================  ==========================================  ======================
HF Mixtral block           softmax → top-k → renormalise               shared (same layout)
HF Qwen3-MoE block         softmax → top-k → renormalise when          shared (same layout)
                           ``norm_topk_prob`` (True here, as in
                           Qwen3-30B-A3B's config)
torchtitan MoE             softmax → top-k → ``route_norm``            copied: w1/w3 (E, F, D)
                           (True here), no expert bias                 split from gate_up
=========================  ==========================================  ======================

The HF blocks take the moekit layer's own ``nn.Parameter`` objects (the HF v5 layout is
moekit's, as in `moekit.recipes.hf_convert`), and `hf_peer` asks `moe_from_hf_block` which
moekit router settings the block maps to, refusing a block whose routing is not the bench
layer's. torchtitan's ``GroupedExperts`` casts x and the weights to bfloat16 inside its
forward (by design, whatever the parameters' dtype), so in float32 runs it is checked with
a bf16 tolerance (`peer_tolerance`).

Install the peers with ``pip install 'moekit[bench]'`` (pinned versions in pyproject.toml).
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import warnings
from typing import Callable, Optional

import torch
import torch.nn.functional as F

HF_FAMILIES = ("mixtral", "qwen3_moe")
HF_NAMES = {"mixtral": "HF Mixtral", "qwen3_moe": "HF Qwen3-MoE"}
BF16_UNIT_ROUNDOFF = 2.0 ** -8


# ---------------------------------------------------------------------------------------
# what is installed
# ---------------------------------------------------------------------------------------
def hf_unavailable() -> Optional[str]:
    """None if transformers' Mixtral and Qwen3-MoE blocks import, else the reason."""
    try:
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock  # noqa: F401
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock  # noqa: F401
    except Exception as exc:  # noqa: BLE001 — any import failure makes the peer unavailable
        return f"{type(exc).__name__}: {exc}"
    return None


def torchtitan_unavailable() -> Optional[str]:
    """None if ``torchtitan.models.common.moe`` imports, else the reason."""
    try:
        import torchtitan.models.common.moe  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {exc}"
    return None


def versions() -> dict:
    out = {"torch": torch.__version__}
    for name in ("transformers", "torchtitan"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001
            out[name] = None
    return out


def hf_experts_implementations() -> list[str]:
    """Every ``experts_implementation`` this transformers offers: eager + its registered backends."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    return ["eager"] + sorted(ALL_EXPERTS_FUNCTIONS.keys())


# ---------------------------------------------------------------------------------------
# the peers
# ---------------------------------------------------------------------------------------
def hf_config(family: str, D: int, F_: int, E: int, K: int, impl: str):
    if family == "mixtral":
        from transformers import MixtralConfig

        cfg = MixtralConfig(hidden_size=D, intermediate_size=F_, num_local_experts=E, num_experts_per_tok=K,
                            router_jitter_noise=0.0, hidden_act="silu")
    elif family == "qwen3_moe":
        from transformers import Qwen3MoeConfig

        cfg = Qwen3MoeConfig(hidden_size=D, moe_intermediate_size=F_, num_experts=E, num_experts_per_tok=K,
                             norm_topk_prob=True, hidden_act="silu")
    else:
        raise ValueError(f"family must be one of {HF_FAMILIES}, got {family!r}")
    # A block built outside a PreTrainedModel reads the backend straight from its config.
    cfg._experts_implementation = impl
    return cfg


def hf_peer(family: str, impl: str, moe) -> tuple[Callable, torch.nn.Module]:
    """The transformers sparse-MoE block of `family` running `impl`, on `moe`'s own parameters."""
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    from moekit.recipes.hf_convert import moe_from_hf_block

    E, D = moe.router.weight.shape
    F_ = moe.experts.down_proj.shape[-1]
    cls = {"mixtral": MixtralSparseMoeBlock, "qwen3_moe": Qwen3MoeSparseMoeBlock}[family]
    with torch.device("meta"):
        block = cls(hf_config(family, D, F_, E, moe.router.top_k, impl))
    block.load_state_dict({"gate.weight": moe.router.weight, "experts.gate_up_proj": moe.experts.gate_up_proj,
                           "experts.down_proj": moe.experts.down_proj}, strict=True, assign=True)
    block.train(moe.training)
    twin = moe_from_hf_block(block).router           # the library's reading of the block's routing
    mine = moe.router
    if (type(twin), twin.norm, twin.softmax_position) != (type(mine), mine.norm, mine.softmax_position):
        raise ValueError(f"{type(block).__name__} routes as {type(twin).__name__}(norm={twin.norm!r}, "
                         f"softmax={twin.softmax_position!r}); the bench layer has {type(mine).__name__}"
                         f"(norm={mine.norm!r}, softmax={mine.softmax_position!r})")

    def fn(x_TD):
        return block(x_TD.unsqueeze(0)).squeeze(0)
    return fn, block


def torchtitan_peer(moe) -> tuple[Callable, torch.nn.Module]:
    """torchtitan's MoE (router + local token dispatcher + grouped experts) with `moe`'s weights copied."""
    from torchtitan.models.common.linear import Linear
    from torchtitan.models.common.moe import GroupedExperts, MoE, RoutedExperts, TokenChoiceTopKRouter
    from torchtitan.models.common.token_dispatcher import LocalTokenDispatcher

    E, D = moe.router.weight.shape
    F_ = moe.experts.down_proj.shape[-1]
    K = moe.router.top_k
    cfg = MoE.Config(
        num_experts=E,
        routed_experts=RoutedExperts.Config(
            inner_experts=GroupedExperts.Config(dim=D, hidden_dim=F_, num_experts=E),
            token_dispatcher=LocalTokenDispatcher.Config(num_experts=E, top_k=K)),
        router=TokenChoiceTopKRouter.Config(num_experts=E, gate=Linear.Config(in_features=D, out_features=E),
                                            top_k=K, score_func="softmax", route_norm=True),
        load_balance_coeff=None)
    w = moe.router.weight
    with torch.device("meta"):
        tt = cfg.build()
    tt = tt.to_empty(device=w.device).to(w.dtype)        # the router's Linear must match x's dtype
    tt.tokens_per_expert_E = torch.zeros(E, dtype=torch.float32, device=w.device)   # float32, as torchtitan keeps it
    gu_E2FD = moe.experts.gate_up_proj.detach()
    with torch.no_grad():
        tt.router.gate.weight.copy_(w)
        tt.routed_experts.inner_experts.w1_EFD.copy_(gu_E2FD[:, :F_])     # gate rows first
        tt.routed_experts.inner_experts.w3_EFD.copy_(gu_E2FD[:, F_:])
        tt.routed_experts.inner_experts.w2_EDF.copy_(moe.experts.down_proj)
    tt.train(moe.training)
    # Its router asks for a float32 autocast, which the CPU declines (with a warning per call): the
    # gate then runs in the weights' dtype, float32 here, as torchtitan intends.
    warnings.filterwarnings("ignore", message="In CPU autocast, but the target dtype is not supported")

    def fn(x_TD):
        return tt(x_TD.unsqueeze(0)).squeeze(0)
    return fn, tt


def build_peers(moe, *, hf_impls=None, max_pair_weight_bytes: Optional[float] = None,
                tokens: Optional[int] = None, train: bool = True, torchtitan: bool = True) -> dict:
    """name -> (fn, module) for every peer that is installed and fits, or name -> reason string.

    ``batched_mm`` gathers one weight copy per (token, expert) pair: it is skipped (with the
    bytes it would need) when ``tokens · K · 3·D·F`` weights (doubled for the backward's
    gradient) exceed `max_pair_weight_bytes`. torchtitan's MoE holds a copy of the weights;
    ``torchtitan=False`` leaves it out.
    """
    peers: dict = {}
    reason = hf_unavailable()
    impls = hf_impls if hf_impls is not None else (hf_experts_implementations() if reason is None else [])
    E, D = moe.router.weight.shape
    F_ = moe.experts.down_proj.shape[-1]
    for family in HF_FAMILIES:
        if reason is not None:
            peers[f"{HF_NAMES[family]}"] = f"unavailable: {reason}"
            continue
        for impl in impls:
            name = f"{HF_NAMES[family]} {impl}"
            if impl == "batched_mm" and max_pair_weight_bytes is not None and tokens is not None:
                need = tokens * moe.router.top_k * 3 * D * F_ * moe.router.weight.element_size() * (2 if train else 1)
                if need > max_pair_weight_bytes:
                    peers[name] = f"skipped: needs ~{need / 2**30:.1f} GiB of gathered weights"
                    continue
            try:
                peers[name] = hf_peer(family, impl, moe)
            except Exception as exc:  # noqa: BLE001 — a backend this machine cannot run is a row, not a crash
                peers[name] = f"unavailable: {type(exc).__name__}: {exc}"[:200]
    if not torchtitan:
        return peers
    reason = torchtitan_unavailable()
    if reason is not None:
        peers["torchtitan MoE"] = f"unavailable: {reason}"
    else:
        try:
            peers["torchtitan MoE"] = torchtitan_peer(moe)
        except Exception as exc:  # noqa: BLE001
            peers["torchtitan MoE"] = f"unavailable: {type(exc).__name__}: {exc}"[:200]
    return peers


def peer_tolerance(name: str, dtype: torch.dtype) -> float:
    """Relative tolerance (max |peer − reference| / max |reference|) of a peer's equality check.

    fp32 peers: 1e-5 (reassociation of fp32 sums only). In bf16, for torchtitan in any dtype
    (it computes its experts in bf16 whatever the weights' dtype) and for rows named "bf16"
    (moekit under bf16 autocast, the like-for-like row beside it): x, the weights, the
    hidden activation and the output are each rounded once to bf16 (unit roundoff u = 2⁻⁸),
    so 8u bounds it with room; a routing or layout bug is an O(1) error.
    """
    u = BF16_UNIT_ROUNDOFF if (dtype == torch.bfloat16 or name.startswith("torchtitan") or "bf16" in name) \
        else torch.finfo(dtype).eps / 2
    return max(1e-5, 8 * u)


# ---------------------------------------------------------------------------------------
# decode: the weight-read floor
# ---------------------------------------------------------------------------------------
def weight_read_floor(moe, x_TD: torch.Tensor) -> tuple[Callable, int]:
    """(fn, A): the time to read the weights of the A experts `x_TD` hits, once each.

    One token's SwiGLU through all A experts at once: a matrix-vector product against their
    gate/up rows stacked (A·2F, D), the SwiGLU, one against their down columns side by side
    (D, A·F). Every active weight is read exactly once and the FLOPs are negligible (one row),
    so no MoE layer can return sooner on the same machine. For T = 1, A = K and this is the
    layer's own work without routing; for T = 8, 64 computing every token through every hit
    expert would be compute-bound (T·A ≫ T·K pairs), hence the single row. The stacked copies
    are made here, outside the timed call.
    """
    with torch.no_grad():
        ids_A = torch.unique(moe.router(x_TD).expert_ids)
        A = int(ids_A.numel())
        F_ = moe.experts.down_proj.shape[-1]
        D = moe.experts.down_proj.shape[1]
        gu_AFD = moe.experts.gate_up_proj.detach()[ids_A].view(A, 2, F_, D)
        w_gu = torch.cat([gu_AFD[:, 0].reshape(A * F_, D), gu_AFD[:, 1].reshape(A * F_, D)], 0)  # (2·A·F, D)
        w_d = moe.experts.down_proj.detach()[ids_A].permute(1, 0, 2).reshape(D, A * F_).contiguous()

    def fn(x):
        g, u = F.linear(x[:1], w_gu).chunk(2, dim=-1)                            # (1, A·F) each
        return F.linear(F.silu(g) * u, w_d)                                      # (1, D)
    return fn, A


# ---------------------------------------------------------------------------------------
# import time
# ---------------------------------------------------------------------------------------
_IMPORT_SNIPPET = "import time; t0 = time.perf_counter(); import {mod}; print(time.perf_counter() - t0)"


def import_times(reps: int, src: Optional[str] = None) -> dict:
    """Seconds to ``import torch`` and to ``import moekit`` (torch included), each in a fresh
    interpreter, alternating, `reps` times each: {name: [seconds, ...]}."""
    env = dict(os.environ)
    if src:
        env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    out = {"import torch": [], "import moekit": []}
    for _ in range(reps):
        for name in out:
            mod = name.split()[1]
            res = subprocess.run([sys.executable, "-c", _IMPORT_SNIPPET.format(mod=mod)], env=env,
                                 capture_output=True, text=True, check=True)
            out[name].append(float(res.stdout.strip().splitlines()[-1]))
    return out


def summary(seconds: list) -> dict:
    """Median, min and max in milliseconds."""
    return {"median_ms": statistics.median(seconds) * 1e3, "min_ms": min(seconds) * 1e3,
            "max_ms": max(seconds) * 1e3, "n": len(seconds)}


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max |a − ref| / max |ref|, in float64."""
    a, ref = a.detach().double(), ref.detach().double()
    return ((a - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()

