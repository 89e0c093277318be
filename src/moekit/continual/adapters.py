"""MoE adapters on a frozen backbone with task routers and a distribution-discriminative auto-selector.

Legend: B batch, T rows routed (tokens, or examples when a block reads (B, D)), D model dim,
F adapter hidden dim, E adapter experts per block, K experts per row, M tasks so far.

Method (METHODS.md C3; Yu, Zhuge, Zhang, Hu, Wang, Lu & He 2024, "Boosting Continual Learning of
Vision-Language Models via Mixture-of-Experts Adapters", CVPR):

- **Frozen backbone** ``stem → blocks → head`` (any modules; CLIP's image tower in the paper).
  Its parameters never train and it stays in eval mode.
- **Static adapter pool**: each block l gets E bottleneck adapters ``D → F → D`` (an
  `moekit.experts.MLPExperts` bank, up-projection initialised like the library's experts,
  down-projection zero, so every adapter starts as 0) added in parallel to the block:
  ``h_{l+1} = block_l(h_l) + Σ_e g^t_{l,e}(h_l) · A_{l,e}(h_l)``.
- **Task routers**: `add_task` gives task t one router per block, ``g^t = softmax(TopK(h W^t_l))``
  (softmax over the K largest logits = the top-K softmax probabilities renormalised;
  `moekit.layers.lora.soft_gate`). Older routers are frozen.
- **Incremental activate-freeze**: after training task t, `finish_task` measures on its training
  inputs the share of the gate mass each expert of each block received; experts whose share is at
  least ``freeze_share`` (default 1/E: an even share or more) are *activated* by task t and frozen
  for every later task. The paper freezes the experts earlier tasks activated so that later tasks
  can use them but not change them; with this rule an expert an earlier task used only in passing
  stays trainable (documented, measured by the project). Frozen experts are rows of the stacked
  bank, so freezing is a gradient hook that zeroes their rows: an optimizer whose update is 0 for a
  zero gradient and zero state (a fresh Adam / SGD without weight decay) leaves them bit-identical.
  `copy.deepcopy` keeps the frozen sets but not the hooks; call `refreeze` on the copy.
- **Distribution-Discriminative Auto-Selector** (`DistributionSelector`): one under-complete
  auto-encoder per task (`moekit.models.ExpertGate`'s) over the frozen backbone's output for that
  task's training inputs. The rule for the threshold: ``τ_t`` = the ``quantile`` (default 0.95)
  of auto-encoder t's reconstruction errors on task t's own training features, so a fraction
  ``1 − quantile`` of task t's training inputs would be called out-of-distribution. An input x goes
  to ``t* = argmin_t er_t(x)`` (Expert Gate's rule); it is in-distribution iff ``er_{t*}(x) ≤ τ_{t*}``,
  and then takes the adapter path with task t*'s routers; otherwise it gets the frozen backbone's
  output, bit for bit (`auto_forward`). The paper uses one threshold for all tasks [R]; per-task
  quantiles make the rule free of the error scale of each auto-encoder.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from moekit.experts import MLPExperts
from moekit.layers.lora import soft_gate
from moekit.models.expert_gate import ExpertGate
from moekit.optim import UpdateStep, build_optimizer
from moekit.validate import check_instance, check_int, check_number, check_tensor

__all__ = ["MoEAdapters", "DistributionSelector", "auto_forward", "train_adapter_task"]


class MoEAdapters(nn.Module):
    """A frozen backbone with a static pool of adapter experts per block and one router set per task.

    Args:
        blocks: the backbone's blocks, each ``(..., D) → (..., D)``; frozen in place.
        d_model: D.
        num_experts: E adapters per block. top_k: K of each task router.
        d_adapter: F, the adapters' bottleneck width.
        stem, head: the backbone's modules before the first and after the last block (frozen;
            default identity). ``forward`` returns what ``head`` returns.
        freeze_share: the activate-freeze threshold on an expert's share of a task's gate mass
            (default ``1 / E``).
        activation: of the adapters' hidden layer.
    """

    def __init__(self, blocks: Sequence[nn.Module], *, d_model: int, num_experts: int = 8, top_k: int = 2,
                 d_adapter: int = 16, stem: Optional[nn.Module] = None, head: Optional[nn.Module] = None,
                 freeze_share: Optional[float] = None, activation: str = "gelu"):
        super().__init__()
        blocks = list(blocks)
        if not blocks:
            raise ValueError("blocks must hold at least one module, got none")
        for i, b in enumerate(blocks):
            check_instance(f"blocks[{i}]", b, nn.Module)
        self.d_model = check_int("d_model", d_model, min=1)
        self.num_experts = check_int("num_experts", num_experts, min=1)
        self.top_k = check_int("top_k", top_k, min=1, max=num_experts)
        check_int("d_adapter", d_adapter, min=1)
        self.freeze_share = check_number("freeze_share", 1 / num_experts if freeze_share is None
                                         else freeze_share, min=0, max=1, min_open=True)
        self.stem = nn.Identity() if stem is None else check_instance("stem", stem, nn.Module)
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Identity() if head is None else check_instance("head", head, nn.Module)
        for m in (self.stem, self.blocks, self.head):
            m.requires_grad_(False).eval()
        self.adapters = nn.ModuleList()
        for _ in blocks:
            bank = MLPExperts(num_experts, d_model, d_adapter, activation=activation)
            nn.init.zeros_(bank.down_proj)          # every adapter adds 0 until it trains
            self.adapters.append(bank)
        self.routers = nn.ModuleList()               # routers[t][l]: task t's router of block l
        self.frozen: list[set[int]] = [set() for _ in blocks]
        self.task_usage: list[torch.Tensor] = []     # (L, E) gate-mass share per finished task
        self.refreeze()

    # -- tasks and freezing ------------------------------------------------------------------------

    @property
    def num_tasks(self) -> int:
        return len(self.routers)

    def refreeze(self) -> None:
        """(Re-)install the gradient hooks that zero the frozen experts' rows (after a deep copy)."""
        for l, bank in enumerate(self.adapters):
            for p in (bank.up_proj, bank.down_proj):
                p.register_hook(lambda g, l=l: self._mask_grad(g, l))

    def _mask_grad(self, grad: torch.Tensor, l: int) -> torch.Tensor:
        if not self.frozen[l]:
            return grad
        keep_E = torch.ones(self.num_experts, dtype=grad.dtype, device=grad.device)
        keep_E[sorted(self.frozen[l])] = 0
        return grad * keep_E.view(-1, *([1] * (grad.dim() - 1)))

    def add_task(self) -> int:
        """A new task: freeze every older router, add one fresh router per block; returns the task id.
        Call `finish_task` after training each task, before the next `add_task`."""
        if len(self.task_usage) != self.num_tasks:
            raise ValueError(f"task {self.num_tasks - 1} is not finished: call finish_task(x_train) before "
                             f"add_task (finished {len(self.task_usage)} of {self.num_tasks})")
        self.routers.requires_grad_(False)
        routers = nn.ModuleList(nn.Linear(self.d_model, self.num_experts, bias=False) for _ in self.blocks)
        for r in routers:
            nn.init.normal_(r.weight, std=self.d_model ** -0.5)
        p = next(self.adapters.parameters())
        self.routers.append(routers.to(device=p.device, dtype=p.dtype))
        return self.num_tasks - 1

    @torch.no_grad()
    def finish_task(self, x: torch.Tensor, *, batch_size: int = 1024) -> list[tuple[int, ...]]:
        """Activate-freeze after training the latest task on inputs `x`: the share of the task's gate
        mass each expert got in each block (stored in ``task_usage``); experts with share ≥
        ``freeze_share`` are frozen from now on. Returns, per block, the experts this task activated."""
        t = self.num_tasks - 1
        if t < 0 or len(self.task_usage) != t:
            raise ValueError(f"finish_task needs a task started by add_task and not yet finished "
                             f"({self.num_tasks} started, {len(self.task_usage)} finished)")
        check_int("batch_size", batch_size, min=1)
        mass_LE = torch.zeros(len(self.blocks), self.num_experts, dtype=torch.float64)
        was = self.training
        self.eval()
        for xb in x.split(batch_size):
            self.forward(xb, t, _gate_mass=mass_LE)
        self.train(was)
        share_LE = mass_LE / mass_LE.sum(-1, keepdim=True)
        self.task_usage.append(share_LE.float())
        used = []
        for l in range(len(self.blocks)):
            ids = tuple((share_LE[l] >= self.freeze_share).nonzero().squeeze(1).tolist())
            self.frozen[l] |= set(ids)
            used.append(ids)
        return used

    def trainable_parameters(self) -> int:
        """Parameter entries the current task can change: its routers and the unfrozen experts."""
        n = sum(p.numel() for p in self.routers[-1].parameters()) if self.num_tasks else 0
        for l, bank in enumerate(self.adapters):
            per_expert = (bank.up_proj.numel() + bank.down_proj.numel()) // self.num_experts
            n += per_expert * (self.num_experts - len(self.frozen[l]))
        return n

    def train(self, mode: bool = True):
        super().train(mode)
        for m in (self.stem, self.blocks, self.head):      # the backbone never leaves eval mode
            m.eval()
        return self

    # -- forward ----------------------------------------------------------------------------------

    def gates(self, h: torch.Tensor, task_id: int, block: int) -> torch.Tensor:
        """(T, E) float32 gates of task `task_id`'s router of block `block` on rows ``h`` (..., D)."""
        h_TD = h.reshape(-1, self.d_model)
        return soft_gate(F.linear(h_TD.float(), self.routers[task_id][block].weight.float()), self.top_k)

    def adapter(self, h: torch.Tensor, task_id: int, block: int, gates_TE: Optional[torch.Tensor] = None
                ) -> torch.Tensor:
        """``Σ_e g_e A_e(h)`` (..., D): each expert runs only on the rows that selected it."""
        h_TD = h.reshape(-1, self.d_model)
        if gates_TE is None:
            gates_TE = self.gates(h, task_id, block)
        bank = self.adapters[block]
        y_TD = torch.zeros_like(h_TD)
        for e in range(self.num_experts):
            rows = gates_TE[:, e].nonzero().squeeze(1)
            if rows.numel():
                y_TD = y_TD.index_add(0, rows, gates_TE[rows, e, None].to(h_TD.dtype)
                                      * bank.expert_forward(e, h_TD[rows]))
        return y_TD.reshape(h.shape)

    def adapter_reference(self, h: torch.Tensor, task_id: int, block: int) -> torch.Tensor:
        """The dense reference of `adapter`: every expert on every row, ``Σ_e g_e A_e(h)``."""
        h_TD = h.reshape(-1, self.d_model)
        gates_TE = self.gates(h, task_id, block).to(h_TD.dtype)
        bank = self.adapters[block]
        y_TED = torch.stack([bank.expert_forward(e, h_TD) for e in range(self.num_experts)], 1)
        return (gates_TE[..., None] * y_TED).sum(1).reshape(h.shape)

    def forward(self, x: torch.Tensor, task_id: Optional[int] = None, *, _gate_mass=None) -> torch.Tensor:
        """The backbone's output with task `task_id`'s adapters; ``task_id=None``: the frozen backbone
        alone (no adapter code runs, so its output is the untouched backbone's, bit for bit)."""
        check_tensor("x", x, floating=True)
        if task_id is not None:
            check_int("task_id", task_id, min=0, max=self.num_tasks - 1)
        h = self.stem(x)
        for l, block in enumerate(self.blocks):
            out = block(h)
            if task_id is not None:
                gates_TE = self.gates(h, task_id, l)
                if _gate_mass is not None:
                    _gate_mass[l] += gates_TE.double().sum(0).cpu()
                out = out + self.adapter(h, task_id, l, gates_TE)
            h = out
        return self.head(h)

    def forward_tasks(self, x: torch.Tensor, task_B: torch.Tensor) -> torch.Tensor:
        """Row b through task ``task_B[b]``'s adapters, or through the frozen backbone alone where
        ``task_B[b] < 0``."""
        return self._route_rows(x, task_B, self.forward(x))

    def _route_rows(self, x: torch.Tensor, task_B: torch.Tensor, frozen: torch.Tensor) -> torch.Tensor:
        check_tensor("task_B", task_B, shape=(x.shape[0],), integer=True)
        if not (task_B >= 0).any():
            return frozen
        out = frozen.clone()
        for t in task_B[task_B >= 0].unique().tolist():
            rows = (task_B == t).nonzero().squeeze(1)
            out[rows] = self.forward(x[rows], int(t))
        return out


class DistributionSelector(nn.Module):
    """DDAS: one under-complete auto-encoder per task over backbone features, with a per-task
    reconstruction-error threshold (see the module docstring for the rule).

    d_in: the feature width; d_hidden: the auto-encoders' width (< d_in); quantile: of the task's
    own training errors that sets its threshold; epochs, lr, batch_size, seed: `ExpertGate`'s.
    """

    def __init__(self, d_in: int, *, d_hidden: int = 32, quantile: float = 0.95, epochs: int = 5, lr: float = 1e-3,
                 batch_size: int = 128, seed: int = 0):
        super().__init__()
        self.quantile = check_number("quantile", quantile, min=0, max=1, min_open=True)
        self.gate = ExpertGate(d_in, d_hidden=d_hidden, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed)
        self.register_buffer("thresholds", torch.zeros(0))

    @property
    def num_tasks(self) -> int:
        return self.gate.num_tasks

    def add_task(self, features_ND: torch.Tensor) -> int:
        """Train task m's auto-encoder on its training features, set ``τ_m``; returns m."""
        m = self.gate.add_task(features_ND)
        er_N = self.gate.reconstruction_errors(features_ND)[:, m]
        tau = torch.quantile(er_N.double(), self.quantile).to(self.thresholds.dtype)
        self.thresholds = torch.cat([self.thresholds, tau.reshape(1).to(self.thresholds.device)])
        return m

    @torch.no_grad()
    def select(self, features_BD: torch.Tensor) -> torch.Tensor:
        """(B,) long: ``argmin_t er_t`` for in-distribution rows, −1 for out-of-distribution ones."""
        er_BM = self.gate.reconstruction_errors(features_BD)
        er_B, task_B = er_BM.min(-1)
        ood_B = er_B > self.thresholds.to(er_B)[task_B]
        return task_B.masked_fill(ood_B, -1)


@torch.no_grad()
def auto_forward(model: MoEAdapters, selector: DistributionSelector, x: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(output, task_B): the selector reads the frozen backbone's output; in-distribution rows take
    the adapter path of their task, out-of-distribution rows (task −1) keep the frozen output."""
    check_instance("model", model, MoEAdapters)
    check_instance("selector", selector, DistributionSelector)
    if selector.num_tasks > model.num_tasks:
        raise ValueError(f"the selector has {selector.num_tasks} tasks but the model only {model.num_tasks}")
    frozen = model(x)
    task_B = selector.select(frozen.reshape(x.shape[0], -1))
    return model._route_rows(x, task_B, frozen), task_B


def train_adapter_task(model: MoEAdapters, head: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int,
                       batch_size: int, lr: float, seed: int = 0) -> list[float]:
    """Train the latest task of `model` (its routers and the unfrozen experts) with a task head:
    cross-entropy of ``head(model(x, t))`` against `y` (labels in the head's output space). A fresh
    Adam at a constant lr without weight decay (`moekit.optim`), so frozen experts and older routers
    stay bit-identical; shuffled epochs from `seed`. Returns the per-step losses."""
    check_instance("model", model, MoEAdapters)
    check_instance("head", head, nn.Module)
    if model.num_tasks == 0 or len(model.task_usage) == model.num_tasks:
        raise ValueError("train_adapter_task needs a task started by add_task and not yet finished")
    check_tensor("x", x, floating=True)
    check_tensor("y", y, shape=(x.shape[0],), integer=True)
    epochs = check_int("epochs", epochs, min=1)
    batch_size = check_int("batch_size", batch_size, min=1)
    lr = check_number("lr", lr, min=0, min_open=True)
    t = model.num_tasks - 1
    both = nn.ModuleList([model, head])
    update = UpdateStep(both, build_optimizer(both, name="adam", lr=lr), lr=lr,
                        total_steps=epochs * -(-len(y) // batch_size), schedule="constant")
    gen = torch.Generator().manual_seed(seed)
    both.train()
    losses = []
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=gen).split(batch_size):
            idx = idx.to(x.device)
            losses.append(update(F.cross_entropy(head(model(x[idx], t)), y[idx]))["loss"])
    return losses
