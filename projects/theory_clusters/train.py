"""Training and metrics of the two reproductions: normalised GD, the full-batch loops, the
dispatch entropy and router purity, and `run_r1` / `run_r7`.

Legend: B examples, E experts, K clusters, N routed examples.

Every loop makes its updates with `moekit.optim.UpdateStep` (R1's normalised GD is an optimizer
of this study's own, so its update step leaves the learning rates alone, ``lr=None``).

Departures from the official R1 code, each for a stated reason: (1) normalised GD divides an
expert's gradient by its L2 norm over all its parameters (the code divides by the *sum* of
per-tensor norms), so every expert's step has norm exactly lr as METHODS states; (2) evaluation
runs the router in eval mode (no noise; the code scores with the exploration noise on);
(3) the optional 1e-4 balance loss is off, as in the code's reported runs.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from moekit import aux_loss
from moekit.optim import UpdateStep, build_optimizer
from projects.theory_clusters.data import ClusterData, LatentClusterData, make_cluster_data, make_latent_cluster_data
from projects.theory_clusters.models import LatentClusterMoE, PatchCNN, PatchMoE

__all__ = ["NormalizedGD", "expert_param_groups", "dispatch_entropy", "accuracy", "train_patch_moe",
           "train_single_cnn", "R1_MODELS", "R1Result", "run_r1", "router_purity", "train_regression", "R7Result",
           "run_r7"]


class NormalizedGD(torch.optim.Optimizer):
    """``p ← p − lr · g_p / ‖g_group‖₂`` with the norm over all parameters of one param group
    (one group per expert: `expert_param_groups`), so each expert's step has norm lr.

    A group whose gradient is zero (an expert that got no examples) does not move. A group with
    ``normalize=False`` takes plain gradient steps ``p ← p − lr · g_p`` (SGD without momentum;
    Chen et al.'s router), so one optimizer, and one update step, trains the whole MoE.
    """

    def __init__(self, params, lr: float):
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        super().__init__(params, dict(lr=lr, normalize=True))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            grads = [p.grad for p in group["params"] if p.grad is not None]
            if not grads:
                continue
            if not group["normalize"]:
                for p in group["params"]:
                    if p.grad is not None:
                        p.add_(p.grad, alpha=-group["lr"])
                continue
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
            if norm > 0:
                for p in group["params"]:
                    if p.grad is not None:
                        p.add_(p.grad, alpha=-group["lr"] / float(norm))
        return loss


def expert_param_groups(model: PatchMoE) -> list[dict]:
    """One optimiser param group per expert of `model`."""
    return [{"params": list(model.expert(i).parameters())} for i in range(model.moe.num_experts)]


def dispatch_entropy(expert_ids: torch.Tensor, cluster_ids: torch.Tensor, *, num_experts: int,
                     num_clusters: int) -> float:
    """``Σ_e (n_e / N) · H(cluster | expert e)`` in nats (Chen et al. 2022): 0 when every expert
    sees one cluster, ``log K`` when each sees all K clusters equally. Experts with no examples
    do not count."""
    n_KE = torch.zeros(num_clusters, num_experts, dtype=torch.float64)
    n_KE.index_put_((cluster_ids.long().cpu(), expert_ids.long().cpu()),
                    torch.ones(expert_ids.numel(), dtype=torch.float64), accumulate=True)
    n_E = n_KE.sum(0)
    p_KE = n_KE / n_E.clamp_min(1)
    h_E = -torch.where(p_KE > 0, p_KE * p_KE.clamp_min(1e-300).log(), torch.zeros_like(p_KE)).sum(0)
    return float((n_E / n_E.sum() * h_E).sum())


@torch.no_grad()
def accuracy(model: nn.Module, data: ClusterData) -> float:
    """Test accuracy in percent, model in eval mode."""
    was = model.training
    model.eval()
    acc = (model(data.x).argmax(-1) == data.y).double().mean().item() * 100
    model.train(was)
    return acc


def train_patch_moe(model: PatchMoE, data: ClusterData, *, epochs: int = 600, lr_experts: float = 1e-3,
                    lr_router: float = 0.1, early_stop: bool = True) -> dict:
    """Full-batch training of Chen et al. (2022): experts by normalised GD, router by plain
    gradient steps (one `NormalizedGD` with a ``normalize=False`` router group).

    Loss: cross-entropy of the *softmax* of the MoE's logits (the official code applies the
    softmax in the model and again inside ``CrossEntropyLoss``; its minimum is log(1 + e⁻¹) ≈
    0.3133, which bounds the cubic experts' gradients). Early stopping as the code: stop when
    the loss rises 0.02 above its minimum, or is ≤ 0.314 without being a new minimum.
    Returns ``{"epochs", "loss", "dispatch_entropy"}``, the entropy of the last training routing.
    """
    groups = expert_param_groups(model) + [{"params": list(model.moe.router.parameters()), "lr": lr_router,
                                            "normalize": False}]
    update = UpdateStep(model, NormalizedGD(groups, lr=lr_experts), lr=None)    # per-group lrs, no schedule
    model.train()
    best, epoch, loss = float("inf"), 0, torch.zeros(())
    for epoch in range(1, epochs + 1):
        loss = F.cross_entropy(torch.softmax(model(data.x), -1), data.y)
        value = loss.item()
        if value <= best:
            best = value
        elif early_stop and (value > best + 0.02 or value <= 0.314):
            break
        update(loss)
    r = model.moe.last_routing
    ent = dispatch_entropy(r.expert_ids, data.cluster[r.token_ids], num_experts=model.moe.num_experts,
                           num_clusters=int(data.features.shape[0]))
    return {"epochs": epoch, "loss": loss.item(), "dispatch_entropy": ent}


def train_single_cnn(model: PatchCNN, data: ClusterData, *, epochs: int = 800, lr: Optional[float] = None,
                     weight_decay: float = 5e-4) -> dict:
    """Full-batch Adam on plain cross-entropy (official: lr 3e-3 linear, 1e-2 cubic, wd 5e-4);
    after epoch 500, stop when the loss rises 0.02 above its minimum."""
    lr = lr if lr is not None else (1e-2 if model.activation == "cubic" else 3e-3)
    opt = build_optimizer(model, name="adam", lr=lr, weight_decay=weight_decay)     # L2, as torch's Adam
    update = UpdateStep(model, opt, lr=lr, total_steps=epochs, schedule="constant")
    model.train()
    best, epoch, loss = float("inf"), 0, torch.zeros(())
    for epoch in range(1, epochs + 1):
        loss = F.cross_entropy(model(data.x), data.y)
        value = loss.item()
        if value <= best:
            best = value
        elif epoch > 500 and value > best + 0.02:
            break
        update(loss)
    return {"epochs": epoch, "loss": loss.item()}


R1_MODELS = ("moe_cubic", "moe_linear", "single_linear", "single_cubic")


@dataclass(frozen=True)
class R1Result:
    model: str
    setting: str
    seed: int
    test_acc: float
    train_acc: float
    dispatch_entropy: Optional[float]      # MoE only
    epochs: int
    seconds: float


def run_r1(model: str, setting: str = "S1", *, seed: int = 0, data=None, width: Optional[int] = None,
           epochs: Optional[int] = None, n_train: int = 16000, n_test: int = 16000) -> R1Result:
    """Train one R1 model (`R1_MODELS`) and score it on the test split.

    data: a ``(train, test)`` pair to reuse (else drawn from `seed`); the model's init uses
    `seed` too. width: m (default 8 per MoE expert, 64 for a single CNN). epochs default to the
    official 600 (cubic MoE), 500 (linear MoE) and 800 (single CNNs).
    """
    if model not in R1_MODELS:
        raise ValueError(f"model must be one of {R1_MODELS}, got {model!r}")
    if data is not None and (n_train, n_test) != (16000, 16000):
        raise ValueError("n_train / n_test only apply when data is None (the given data has its own sizes)")
    train, test = data if data is not None else make_cluster_data(setting, n_train=n_train, n_test=n_test,
                                                                  seed=seed)
    with torch.random.fork_rng(devices=[]):       # the caller's global RNG is left as it was
        torch.manual_seed(seed)
        return _run_r1(model, setting, seed, train, test, width, epochs)


def _run_r1(model, setting, seed, train, test, width, epochs) -> R1Result:
    kind, act = model.split("_")
    act = "linear" if act == "linear" else "cubic"
    t0 = time.perf_counter()
    if kind == "moe":
        net = PatchMoE(activation=act, width=width or 8)
        log = train_patch_moe(net, train, epochs=epochs or (600 if act == "cubic" else 500))
    else:
        net = PatchCNN(width=width or 64, activation=act)
        log = train_single_cnn(net, train, epochs=epochs or 800)
    secs = time.perf_counter() - t0
    return R1Result(model=model, setting=setting, seed=seed, test_acc=accuracy(net, test),
                    train_acc=accuracy(net, train), dispatch_entropy=log.get("dispatch_entropy"),
                    epochs=log["epochs"], seconds=secs)


# ============================================================================ R7
def router_purity(expert_ids: torch.Tensor, cluster_ids: torch.Tensor, *, num_experts: int,
                  num_clusters: int) -> float:
    """``Σ_e max_k n_{k,e} / N``: the share of examples whose expert's majority cluster is their
    own (clustering purity with experts as the clusters). 1 when no expert mixes clusters;
    ``1/K``-ish for routing that ignores the clusters."""
    n_KE = torch.zeros(num_clusters, num_experts, dtype=torch.float64)
    n_KE.index_put_((cluster_ids.long().cpu(), expert_ids.long().cpu()),
                    torch.ones(expert_ids.numel(), dtype=torch.float64), accumulate=True)
    return float(n_KE.max(0).values.sum() / n_KE.sum().clamp_min(1))


def train_regression(model: nn.Module, data: LatentClusterData, *, steps: int = 1500, lr: float = 1e-2) -> float:
    """Full-batch Adam at a constant lr on ``MSE + aux_loss(model)``; returns the final training MSE."""
    update = UpdateStep(model, build_optimizer(model, name="adam", lr=lr), lr=lr, total_steps=steps,
                        schedule="constant")
    model.train()
    mse = torch.zeros(())
    for _ in range(steps):
        mse = F.mse_loss(model(data.x), data.y)
        update(mse + aux_loss(model))
    return mse.item()


@dataclass(frozen=True)
class R7Result:
    model: str
    seed: int
    test_mse: float
    purity: Optional[float]        # routed models only
    seconds: float


def run_r7(*, seed: int = 0, steps: int = 1500, lr: float = 1e-2, data=None, **data_kwargs) -> dict:
    """Train the learned-routing MoE, the hash-routing MoE and a dense linear map on one draw of
    the R7 data; ``{"learned" | "hash" | "dense": R7Result}`` scored on the test split."""
    if data is not None and data_kwargs:
        raise ValueError(f"data_kwargs {sorted(data_kwargs)} only apply when data is None")
    train, test = data if data is not None else make_latent_cluster_data(seed=seed, **data_kwargs)
    with torch.random.fork_rng(devices=[]):       # the caller's global RNG is left as it was
        return _run_r7(train, test, seed, steps, lr)


def _run_r7(train, test, seed, steps, lr) -> dict:
    K = int(torch.cat([train.cluster, test.cluster]).max()) + 1
    out = {}
    for name in ("learned", "hash", "dense"):
        torch.manual_seed(seed)
        D = train.x.shape[1]
        net = nn.Linear(D, D) if name == "dense" else LatentClusterMoE(routing=name, d_model=D, seed=seed)
        t0 = time.perf_counter()
        train_regression(net, train, steps=steps, lr=lr)
        secs = time.perf_counter() - t0
        net.eval()
        with torch.no_grad():
            mse = F.mse_loss(net(test.x), test.y).item()
        purity = None
        if name != "dense":
            purity = router_purity(net.experts_of(test.x), test.cluster, num_experts=net.moe.num_experts,
                                   num_clusters=K)
        out[name] = R7Result(model=name, seed=seed, test_mse=mse, purity=purity, seconds=secs)
    return out
