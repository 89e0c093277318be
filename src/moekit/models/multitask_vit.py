"""Multi-task ViTs with task-conditioned MoE: M³ViT and Mod-Squad, and their shared baselines.

Legend: B batch, C image channels, H height, W width, P patch size, S tokens per image (patches
+ 1 class token), D model dim, E experts, K experts per token, M tasks.

One ViT backbone serves M tasks, each with its own head (`TaskSpec`: image classification, or a
per-pixel output read from the patch tokens). The backbone's MLPs at the MoE positions (every
``moe_every``-th block) are chosen by ``routing``:

- ``"dense"``: a plain MLP of hidden ``K · F_e`` — the shared-backbone dense baseline with the
  same active MLP parameters per token as the MoE variants;
- ``"shared"``: a `moekit.MoE` whose top-k router ignores the task — one routing for all tasks,
  so one backbone pass feeds every head;
- ``"task"``: a `moekit.MoE` with `moekit.routing.TaskTokenRouter`, one gate per task over the
  shared experts, so the backbone runs once per task (the M copies of a batch go through as one
  batch with per-token ``task_ids``).

M³ViT (Liang et al. 2022, NeurIPS, METHODS.md MT5) is ``routing="task"`` on the MLPs, with
``task_experts_per_layer=m``: task t may only use a fixed window of m experts in each MoE layer
(`moekit.routing.m3vit_task_experts`), so serving one task needs only those experts.
Mod-Squad (Chen et al. 2023, CVPR, MT4) adds MoE attention — the attention of the MoE blocks
becomes `moekit.layers.MixtureOfAttentionHeads` with per-task head routers — and the
mutual-information loss ``−w · I(T; E)`` in every task-routed layer (``mi_loss_coef``), which
replaces the balancing loss. `multitask_vit_config` gives the named variants.

``task_embedding=True`` conditions a backbone on the task without routing: a learned vector per
task is added to every input token (patches and class token), so the backbone runs once per task
as the task-routed ones do. With dense MLPs (``"dense_task"``) it is the control that separates
task routing from per-task backbone passes.

After training, `extract_task_submodel` keeps, in every routed layer, only the experts a task
uses (all it used on a calibration set, its ``top`` most used, or those above a usage share):
a single-task network whose outputs equal the full model's for that task whenever each token's
chosen experts are all kept (renormalised top-k gates do not depend on the dropped experts).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from moekit.experts import DenseFFN
from moekit.layers import MoE, default_hidden
from moekit.layers.attention_heads import MixtureOfAttentionHeads
from moekit.layers.grow import slice_expert_rows
from moekit.routing import TaskTokenRouter, m3vit_task_experts
from moekit.validate import check_bool, check_choice, check_instance, check_int, check_number

__all__ = ["TaskSpec", "MultiTaskViTConfig", "MultiTaskViT", "multitask_vit_config", "MULTITASK_VIT_METHODS",
           "task_expert_counts", "extract_task_submodel", "multitask_active_params"]

TASK_KINDS = ("classify", "segment", "regress")
ROUTINGS = ("dense", "shared", "task")
MULTITASK_VIT_METHODS = ("dense", "dense_task", "moe_shared", "m3vit", "modsquad")


@dataclass(frozen=True)
class TaskSpec:
    """One task's head: ``"classify"`` (``out`` classes, from the class token), ``"segment"``
    (``out`` classes per pixel) or ``"regress"`` (``out`` channels per pixel), both from the
    patch tokens."""

    name: str
    kind: str
    out: int

    def __post_init__(self):
        check_instance("name", self.name, str)
        check_choice("kind", self.kind, TASK_KINDS)
        check_int("out", self.out, min=1)


@dataclass(frozen=True)
class MultiTaskViTConfig:
    """Shape of a `MultiTaskViT`.

    expert_hidden: F_e of each MLP expert (default ``mlp_hidden // top_k``, so the dense
        baseline's MLP, of hidden ``top_k · F_e``, is the plain ViT MLP).
    moe_attention: the attention of the MoE blocks is a `MixtureOfAttentionHeads` with
        ``attn_experts`` head experts, ``n_heads`` of them per token, head dim ``D / n_heads``
        (needs ``routing="task"``: Mod-Squad).
    task_experts_per_layer: M³ViT's fixed per-task expert windows (None: any expert).
    mi_loss_coef: Mod-Squad's mutual-information weight (needs ``routing="task"``).
    aux_loss_coef: the Switch balancing loss of the MoE MLPs.
    task_embedding: add a learned per-task vector to every input token (a task-conditioned
        backbone, one pass per task, whatever the routing).
    """

    tasks: tuple
    image_size: int = 28
    patch_size: int = 7
    in_channels: int = 1
    d_model: int = 64
    n_layers: int = 4
    n_heads: int = 4
    mlp_hidden: Optional[int] = None
    routing: str = "task"
    moe_every: int = 2
    num_experts: int = 8
    top_k: int = 2
    expert_hidden: Optional[int] = None
    moe_attention: bool = False
    attn_experts: int = 8
    task_experts_per_layer: Optional[int] = None
    mi_loss_coef: float = 0.0
    aux_loss_coef: float = 0.01
    task_embedding: bool = False

    def __post_init__(self):
        tasks = tuple(self.tasks) if isinstance(self.tasks, (list, tuple)) else self.tasks
        if not isinstance(tasks, tuple) or not tasks or not all(isinstance(t, TaskSpec) for t in tasks):
            raise TypeError(f"tasks must be a non-empty sequence of TaskSpec, got {self.tasks!r}")
        if len({t.name for t in tasks}) != len(tasks):
            raise ValueError(f"task names must be distinct, got {[t.name for t in tasks]}")
        object.__setattr__(self, "tasks", tasks)
        for name in ("image_size", "patch_size", "in_channels", "d_model", "n_layers", "n_heads", "num_experts",
                     "top_k", "attn_experts"):
            check_int(name, getattr(self, name), min=1)
        for name in ("mlp_hidden", "expert_hidden"):
            check_int(name, getattr(self, name), min=1, allow_none=True)
        check_int("moe_every", self.moe_every, min=0)
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size={self.image_size} must be a multiple of patch_size={self.patch_size}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must split into n_heads={self.n_heads} equal heads")
        check_choice("routing", self.routing, ROUTINGS)
        check_bool("moe_attention", self.moe_attention)
        check_bool("task_embedding", self.task_embedding)
        check_number("mi_loss_coef", self.mi_loss_coef, min=0)
        check_number("aux_loss_coef", self.aux_loss_coef, min=0)
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k must be <= num_experts={self.num_experts}, got {self.top_k}")
        if self.moe_attention and self.n_heads > self.attn_experts:
            raise ValueError(f"attn_experts must be >= n_heads={self.n_heads} (heads per token), "
                             f"got {self.attn_experts}")
        check_int("task_experts_per_layer", self.task_experts_per_layer, min=self.top_k, max=self.num_experts,
                  allow_none=True)
        if self.routing != "task":
            for name, bad in (("moe_attention", self.moe_attention), ("mi_loss_coef", self.mi_loss_coef > 0),
                              ("task_experts_per_layer", self.task_experts_per_layer is not None)):
                if bad:
                    raise ValueError(f"{name}={getattr(self, name)!r} needs routing='task', got "
                                     f"routing={self.routing!r}")
        if self.moe_every == 0 and self.routing != "dense":
            raise ValueError(f"moe_every=0 leaves no MoE layer; routing={self.routing!r} needs one")

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def dense_hidden(self) -> int:
        return self.mlp_hidden if self.mlp_hidden is not None else default_hidden(self.d_model, "mlp")

    @property
    def f_expert(self) -> int:
        return self.expert_hidden if self.expert_hidden is not None else max(1, self.dense_hidden // self.top_k)

    def is_moe_position(self, i: int) -> bool:
        return self.moe_every > 0 and (i + 1) % self.moe_every == 0


def multitask_vit_config(method: str, tasks: Sequence[TaskSpec], **overrides) -> MultiTaskViTConfig:
    """The four compared variants, at equal active MLP parameters per token:

    ``"dense"`` shared dense backbone; ``"dense_task"`` the same conditioned on the task by a learned
    task embedding (one pass per task, like the task-routed ones); ``"moe_shared"`` MoE MLPs with
    one router for all tasks;
    ``"m3vit"`` per-task routers restricted to fixed windows of half the experts; ``"modsquad"``
    per-task routers over all experts, MoE attention, MI loss 0.05 instead of the balance loss.
    """
    check_choice("method", method, MULTITASK_VIT_METHODS)
    preset = {
        "dense": dict(routing="dense"),
        "dense_task": dict(routing="dense", task_embedding=True),
        "moe_shared": dict(routing="shared"),
        "m3vit": dict(routing="task", task_experts_per_layer=max(2, overrides.get("num_experts", 8) // 2)),
        "modsquad": dict(routing="task", moe_attention=True, mi_loss_coef=0.05, aux_loss_coef=0.0),
    }[method]
    preset.update(overrides)
    return MultiTaskViTConfig(tasks=tuple(tasks), **preset)


class MultiTaskBlock(nn.Module):
    """Pre-norm block; attention is multi-head or MoA, the MLP dense or an MoE (see module docstring)."""

    def __init__(self, c: MultiTaskViTConfig, index: int):
        super().__init__()
        moe_here = c.is_moe_position(index)
        self.attn_norm = nn.LayerNorm(c.d_model, eps=1e-6)
        self.mlp_norm = nn.LayerNorm(c.d_model, eps=1e-6)
        self.task_attn = moe_here and c.moe_attention
        if self.task_attn:
            self.attn = MixtureOfAttentionHeads(d_model=c.d_model, num_experts=c.attn_experts, top_k=c.n_heads,
                                                head_dim=c.d_model // c.n_heads, aux_loss_coef=c.aux_loss_coef,
                                                num_tasks=c.num_tasks, mi_loss_coef=c.mi_loss_coef)
        else:
            self.attn = nn.MultiheadAttention(c.d_model, c.n_heads, batch_first=True)
        self.is_moe = moe_here and c.routing != "dense"
        self.task_mlp = self.is_moe and c.routing == "task"
        if not self.is_moe:
            width = c.top_k * c.f_expert if moe_here else c.dense_hidden
            self.mlp = DenseFFN(c.d_model, width, expert="mlp")
        elif c.routing == "shared":
            self.mlp = MoE(d_model=c.d_model, num_experts=c.num_experts, top_k=c.top_k, d_hidden=c.f_expert,
                           expert="mlp", aux_loss_coef=c.aux_loss_coef)
        else:
            allowed = None if c.task_experts_per_layer is None else \
                m3vit_task_experts(c.num_tasks, c.num_experts, c.task_experts_per_layer)
            router = TaskTokenRouter(c.d_model, c.num_experts, c.top_k, num_tasks=c.num_tasks, task_experts=allowed,
                                     mi_loss_coef=c.mi_loss_coef)
            self.mlp = MoE(d_model=c.d_model, num_experts=c.num_experts, router=router, d_hidden=c.f_expert,
                           expert="mlp", aux_loss_coef=c.aux_loss_coef)

    def forward(self, x_BSD: torch.Tensor, task_B: Optional[torch.Tensor]) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        task_BS = None if task_B is None else task_B[:, None].expand(B, S)
        h_BSD = self.attn_norm(x_BSD)
        if self.task_attn:
            x_BSD = x_BSD + self.attn(h_BSD, task_ids=task_BS)
        else:
            x_BSD = x_BSD + self.attn(h_BSD, h_BSD, h_BSD, need_weights=False)[0]
        h_BSD = self.mlp_norm(x_BSD)
        if self.task_mlp:
            return x_BSD + self.mlp(h_BSD, task_ids=task_BS)
        return x_BSD + self.mlp(h_BSD)


class MultiTaskViT(nn.Module):
    """``forward(images_BCHW) -> [output of each task]``; ``forward_task(images_BCHW, t)`` one task.

    Outputs: (B, out) logits for ``"classify"``, (B, out, H, W) for ``"segment"`` / ``"regress"``.
    `losses(outputs, targets)` gives each task's loss (cross-entropy, per-pixel cross-entropy,
    mean squared error); add `moekit.aux_loss(model)` when training.
    """

    def __init__(self, config: MultiTaskViTConfig):
        super().__init__()
        check_instance("config", config, MultiTaskViTConfig)
        c = self.config = config
        self.tasks = c.tasks
        self.patch_embed = nn.Conv2d(c.in_channels, c.d_model, kernel_size=c.patch_size, stride=c.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.d_model))
        self.pos_embed = nn.Parameter(torch.randn(1, c.num_patches + 1, c.d_model) * 0.02)
        self.task_embed = nn.Parameter(torch.randn(c.num_tasks, c.d_model) * 0.02) if c.task_embedding else None
        self.blocks = nn.ModuleList(MultiTaskBlock(c, i) for i in range(c.n_layers))
        self.norm = nn.LayerNorm(c.d_model, eps=1e-6)
        P = c.patch_size
        self.heads = nn.ModuleList(
            nn.Linear(c.d_model, t.out if t.kind == "classify" else P * P * t.out) for t in c.tasks)

    @property
    def task_routed(self) -> bool:
        """Whether the backbone's routing depends on the task (one backbone pass per task)."""
        return any(b.task_mlp or b.task_attn for b in self.blocks)

    @property
    def task_conditioned(self) -> bool:
        """Whether the backbone's output depends on the task (task routing or a task embedding):
        then it runs once per task."""
        return self.task_routed or self.task_embed is not None

    def _check_images(self, images_BCHW: torch.Tensor) -> None:
        c = self.config
        expected = (c.in_channels, c.image_size, c.image_size)
        if not isinstance(images_BCHW, torch.Tensor) or images_BCHW.dim() != 4 or \
                tuple(images_BCHW.shape[1:]) != expected or not images_BCHW.is_floating_point():
            got = f"{images_BCHW.dtype} {tuple(images_BCHW.shape)}" if isinstance(images_BCHW, torch.Tensor) \
                else type(images_BCHW).__name__
            raise ValueError(f"images must be a floating (B, {', '.join(map(str, expected))}) tensor, got {got}")

    def features(self, images_BCHW: torch.Tensor, task_B: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, S, D) normalised tokens; ``task_B`` (B,) int conditions a task-conditioned backbone."""
        B = images_BCHW.shape[0]
        x_BSD = self.patch_embed(images_BCHW).flatten(2).transpose(1, 2)         # (B, H/P · W/P, D)
        x_BSD = torch.cat([self.cls_token.expand(B, -1, -1), x_BSD], dim=1) + self.pos_embed
        if self.task_embed is not None:
            if task_B is None:
                raise ValueError("task_B must be given to a backbone with a task embedding, got None")
            x_BSD = x_BSD + self.task_embed[task_B][:, None, :]
        for block in self.blocks:
            x_BSD = block(x_BSD, task_B)
        return self.norm(x_BSD)

    def head(self, t: int, x_BSD: torch.Tensor) -> torch.Tensor:
        spec, c = self.tasks[t], self.config
        if spec.kind == "classify":
            return self.heads[t](x_BSD[:, 0])
        B, g, P = x_BSD.shape[0], c.image_size // c.patch_size, c.patch_size
        y = self.heads[t](x_BSD[:, 1:])                                           # (B, g·g, P·P·out)
        y = y.view(B, g, g, P, P, spec.out).permute(0, 5, 1, 3, 2, 4)             # (B, out, g, P, g, P)
        return y.reshape(B, spec.out, g * P, g * P)

    def forward(self, images_BCHW: torch.Tensor) -> list:
        self._check_images(images_BCHW)
        M, B = len(self.tasks), images_BCHW.shape[0]
        if not self.task_conditioned:
            x_BSD = self.features(images_BCHW)
            return [self.head(t, x_BSD) for t in range(M)]
        # Task-conditioned backbone: the M copies of the batch go through as one (M·B) batch.
        task_MB = torch.arange(M, device=images_BCHW.device).repeat_interleave(B)
        x_MBSD = self.features(images_BCHW.repeat(M, 1, 1, 1), task_MB)
        return [self.head(t, x_MBSD[t * B:(t + 1) * B]) for t in range(M)]

    def forward_task(self, images_BCHW: torch.Tensor, t: int) -> torch.Tensor:
        """Task `t`'s output alone (one backbone pass conditioned on `t`)."""
        self._check_images(images_BCHW)
        check_int("t", t, min=0, max=len(self.tasks) - 1)
        task_B = None
        if self.task_conditioned:
            task_B = torch.full((images_BCHW.shape[0],), t, dtype=torch.long, device=images_BCHW.device)
        return self.head(t, self.features(images_BCHW, task_B))

    def losses(self, outputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> list:
        """Each task's loss: classes (B,) for classify, (B, H, W) for segment, (B, out, H, W) for regress."""
        if len(outputs) != len(self.tasks) or len(targets) != len(self.tasks):
            raise ValueError(f"outputs and targets must hold one entry per task ({len(self.tasks)}), "
                             f"got {len(outputs)} and {len(targets)}")
        out = []
        for spec, y, target in zip(self.tasks, outputs, targets):
            if spec.kind == "regress":
                out.append(F.mse_loss(y.float(), target.float()))
            else:
                out.append(F.cross_entropy(y.float(), target))
        return out


def _routed_layers(model: MultiTaskViT):
    """(name, layer) of every task-routed layer: MoE MLPs and MoA attention."""
    for i, b in enumerate(model.blocks):
        if b.task_attn:
            yield f"blocks.{i}.attn", b.attn
        if b.is_moe:
            yield f"blocks.{i}.mlp", b.mlp


@torch.no_grad()
def task_expert_counts(model: MultiTaskViT, images_NCHW: torch.Tensor, *, batch_size: int = 256) -> dict:
    """``{layer name: (M, E) int64}``: (token, expert) pairs each task routes to each expert of
    every routed layer over `images_NCHW`, in eval mode (one backbone pass per task)."""
    check_instance("model", model, MultiTaskViT)
    check_int("batch_size", batch_size, min=1)
    was_training = model.training
    model.eval()
    layers = list(_routed_layers(model))
    counts = {name: torch.zeros(len(model.tasks), layer.num_experts, dtype=torch.long) for name, layer in layers}
    try:
        for t in range(len(model.tasks)):
            for s in range(0, images_NCHW.shape[0], batch_size):
                model.forward_task(images_NCHW[s:s + batch_size], t)
                for name, layer in layers:
                    counts[name][t] += layer.last_stats.tokens_per_expert.cpu().long()
    finally:
        model.train(was_training)
    return counts


def _kept_experts(counts_E: Optional[torch.Tensor], allowed_E: torch.Tensor, top: Optional[int],
                  threshold: float) -> list:
    if counts_E is None:
        return [int(e) for e in torch.nonzero(allowed_E).flatten()]
    share = counts_E.double() / max(int(counts_E.sum()), 1)
    order = torch.argsort(-share, stable=True)
    keep = [int(e) for e in order if share[e] > threshold]
    if top is not None:
        keep = keep[:top]
    return sorted(keep)


def extract_task_submodel(model: MultiTaskViT, task: int, counts: Optional[dict] = None, *,
                          top: Optional[int] = None, threshold: float = 0.0) -> MultiTaskViT:
    """The single-task network of `task`: each routed layer keeps only the experts it uses.

    counts: `task_expert_counts` on calibration images; kept are the experts whose share of the
        task's pairs exceeds `threshold` (default: every expert used), at most the `top` most
        used. None: the experts the task may use at all (M³ViT's window; every expert without one).

    The result is a `MultiTaskViT` with one task (its head and routers), whose outputs equal
    ``model.forward_task(images, task)`` for every token whose chosen experts are all kept
    (exactly so on the calibration images with the default threshold). K becomes the number
    kept where fewer than K are kept.
    """
    check_instance("model", model, MultiTaskViT)
    check_int("task", task, min=0, max=len(model.tasks) - 1)
    check_int("top", top, min=1, allow_none=True)
    check_number("threshold", threshold, min=0, max=1, max_open=True)
    if not model.task_routed:
        raise ValueError(f"extract_task_submodel needs a task-routed model (routing='task'), got "
                         f"routing={model.config.routing!r}")
    # The layers' last aux_loss may hold a graph, which deepcopy refuses: copy it detached.
    memo = {id(m.aux_loss): m.aux_loss.detach() for m in model.modules()
            if isinstance(getattr(m, "aux_loss", None), torch.Tensor)}
    sub = copy.deepcopy(model, memo)
    kept = {}
    for name, layer in _routed_layers(sub):
        if isinstance(layer, MoE) and not isinstance(layer.router, TaskTokenRouter):
            raise ValueError(f"{name} routes without the task ({type(layer.router).__name__}); only task "
                             f"routers can be cut per task")
        router = layer.router
        allowed_E = router.task_experts[task].cpu() if isinstance(router, TaskTokenRouter) else \
            torch.ones(layer.num_experts, dtype=torch.bool)
        ids = _kept_experts(None if counts is None else counts[name][task], allowed_E, top, threshold)
        if not ids:
            raise ValueError(f"task {task} routes nothing to {name} (counts all zero); pass counts of its data")
        kept[name] = ids
        block = sub.blocks[int(name.split(".")[1])]
        if name.endswith(".attn"):
            block.attn = layer.subset(ids, [task])
        else:
            idx = torch.tensor(ids)
            bank = slice_expert_rows(layer.experts, layer.num_experts, idx)
            bank.num_experts = len(ids)
            block.mlp = MoE(d_model=layer.d_model, num_experts=len(ids), router=router.subset(ids, [task]),
                            experts=bank, aux_loss_coef=layer.aux_loss_coef, z_loss_coef=layer.z_loss_coef,
                            backend=layer.backend)
    sub.tasks = (model.tasks[task],)
    sub.heads = nn.ModuleList([sub.heads[task]])
    if sub.task_embed is not None:
        sub.task_embed = nn.Parameter(sub.task_embed.data[task:task + 1].clone())
    sub.kept_experts = kept
    return sub


def multitask_active_params(model: MultiTaskViT) -> dict:
    """``total`` parameters, and ``active``: those one token of one task uses (its head, its
    task's embedding and routers, K/E of each MoE bank, the queries of every head expert — MoA projects them
    all — and K/E of their output projections)."""
    check_instance("model", model, MultiTaskViT)
    total = sum(p.numel() for p in model.parameters())
    inactive = sum(p.numel() for h in list(model.heads)[1:] for p in h.parameters())
    M = len(model.tasks)
    if model.task_embed is not None:
        inactive += model.task_embed.numel() * (M - 1) // M
    for b in model.blocks:
        if b.is_moe:
            bank = sum(p.numel() for p in b.mlp.experts.parameters())
            inactive += bank - bank * b.mlp.top_k // b.mlp.num_experts
            if isinstance(b.mlp.router, TaskTokenRouter):
                inactive += b.mlp.router.weight.numel() * (M - 1) // M
        if b.task_attn:
            o = b.attn.o_proj.numel()
            inactive += o - o * b.attn.top_k // b.attn.num_experts
            inactive += b.attn.router.weight.numel() * (M - 1) // M
    return {"total": total, "active": total - inactive}
