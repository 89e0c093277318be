"""Meta-DMoE: domain experts distilled into a student by test-time adaptation, meta-learned.

Legend: B batch, X input features, D feature dim, E domain experts, C classes, S support
(unlabeled) examples, Q query (labelled) examples, H attention heads.

Zhong, Chi, Gu, Wang, Yu & Tang (2022), "Meta-DMoE: Adapting to Domain Shift by Meta-Distillation
from Mixture-of-Experts", NeurIPS (METHODS.md M3):

- **Teachers**: one feature extractor per source domain ``f_e: (B, X) → (B, D)``, trained on
  that domain alone, then frozen (``requires_grad`` off, eval mode, never in an optimizer).
- **Aggregator** (`ExpertAggregator`): a transformer over the E expert features of each input,
  ``tokens (B, E, D) → L × [pre-norm self-attention + MLP] → mean over the experts → (B, D)``.
  Choice of this module: no positional or expert embeddings, so every layer is equivariant to the
  order of the experts and the mean makes the output **invariant to it** (tested). An expert can be
  masked out (meta-training leaves out the expert of the episode's own domain, as the paper does,
  so the student learns to adapt to a domain no expert knows — the test-time situation).
- **Inner loop** (no labels): the student's feature extractor ``φ`` takes `inner_steps` SGD steps
  on ``‖g_φ(x_S) − agg(f_1(x_S), …, f_E(x_S))‖²`` (mean squared error) over an unlabeled support
  batch; the student's classifier is not adapted.
- **Outer loop**: the adapted student classifies a labelled query batch of the same domain;
  cross-entropy back-propagates (through the inner step, second order unless `first_order`,
  which is what gives the aggregator a gradient) into the student's initialisation, its
  classifier and the aggregator.
- **Test time**: a few unlabeled target inputs → `adapt` → predict with the adapted student.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from moekit.optim import UpdateStep, build_optimizer
from moekit.validate import check_bool, check_instance, check_int, check_number, check_tensor

__all__ = ["ExpertAggregator", "MetaDMoE", "meta_train_dmoe"]


class _AttentionBlock(nn.Module):
    """Pre-norm ``h + MHA(LN(h))`` then ``h + MLP(LN(h))`` over the expert axis, no positions."""

    def __init__(self, d_model: int, num_heads: int, d_hidden: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv, self.proj = nn.Linear(d_model, 3 * d_model), nn.Linear(d_model, d_model)
        self.fc1, self.fc2 = nn.Linear(d_model, d_hidden), nn.Linear(d_hidden, d_model)

    def forward(self, h_BED: torch.Tensor, keep_E: Optional[torch.Tensor]) -> torch.Tensor:
        B, E, D = h_BED.shape
        q, k, v = self.qkv(self.norm1(h_BED)).view(B, E, 3, self.num_heads, D // self.num_heads).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))             # (B, H, E, D/H)
        mask = None if keep_E is None else keep_E.view(1, 1, 1, E)   # masked experts are never attended to
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        h_BED = h_BED + self.proj(a.transpose(1, 2).reshape(B, E, D))
        return h_BED + self.fc2(F.gelu(self.fc1(self.norm2(h_BED))))


class ExpertAggregator(nn.Module):
    """Transformer over the experts' features of each input: ``(B, E, D) → (B, D)``, invariant to the
    order of the experts (no positional embedding, mean pooling over the kept experts)."""

    def __init__(self, d_model: int, *, num_heads: int = 4, num_layers: int = 1, d_hidden: Optional[int] = None):
        super().__init__()
        check_int("d_model", d_model, min=1)
        check_int("num_heads", num_heads, min=1)
        if d_model % num_heads:
            raise ValueError(f"d_model must be divisible by num_heads={num_heads}, got {d_model}")
        check_int("num_layers", num_layers, min=1)
        d_hidden = check_int("d_hidden", 2 * d_model if d_hidden is None else d_hidden, min=1)
        self.d_model = d_model
        self.layers = nn.ModuleList(_AttentionBlock(d_model, num_heads, d_hidden) for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, feats_BED: torch.Tensor, keep_E: Optional[torch.Tensor] = None) -> torch.Tensor:
        check_tensor("feats_BED", feats_BED, shape=(None, None, self.d_model), floating=True)
        E = feats_BED.shape[1]
        if keep_E is not None:
            check_tensor("keep_E", keep_E, shape=(E,), dtype=torch.bool)
            if not keep_E.any():
                raise ValueError("keep_E must keep at least one expert, got none")
        h_BED = feats_BED
        for layer in self.layers:
            h_BED = layer(h_BED, keep_E)
        h_BED = self.norm(h_BED)
        if keep_E is None:
            pooled_BD = h_BED.mean(1)
        else:
            pooled_BD = h_BED[:, keep_E].mean(1)
        return self.out(pooled_BD)


class MetaDMoE(nn.Module):
    """Frozen domain experts, a transformer aggregator and a student adapted by distillation.

    Args:
        experts: E feature extractors ``(B, X) → (B, D)``, one per source domain; frozen here.
        student: the student's feature extractor ``(B, X) → (B, D)`` (adapted in the inner loop).
        classifier: the student's head ``(B, D) → (B, C)`` (meta-learned, not adapted).
        d_model: D. num_heads, num_layers: the aggregator's.
        inner_lr, inner_steps: the inner loop's SGD step and number of steps.
        first_order: drop the second-order terms (then the aggregator gets no meta-gradient).
    """

    def __init__(self, experts: Sequence[nn.Module], student: nn.Module, classifier: nn.Module, *, d_model: int,
                 num_heads: int = 4, num_layers: int = 1, inner_lr: float = 0.1, inner_steps: int = 1,
                 first_order: bool = False):
        super().__init__()
        experts = list(experts)
        if not experts:
            raise ValueError("experts must hold at least one domain expert, got none")
        for i, e in enumerate(experts):
            check_instance(f"experts[{i}]", e, nn.Module)
        self.experts = nn.ModuleList(experts).requires_grad_(False).eval()
        self.student = check_instance("student", student, nn.Module)
        self.classifier = check_instance("classifier", classifier, nn.Module)
        self.aggregator = ExpertAggregator(d_model, num_heads=num_heads, num_layers=num_layers)
        self.inner_lr = check_number("inner_lr", inner_lr, min=0)
        self.inner_steps = check_int("inner_steps", inner_steps, min=0)
        self.first_order = check_bool("first_order", first_order)

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def train(self, mode: bool = True):
        super().train(mode)
        self.experts.eval()                  # teachers never leave eval mode
        return self

    def _keep(self, exclude: Optional[int], device) -> Optional[torch.Tensor]:
        if exclude is None:
            return None
        check_int("exclude", exclude, min=0, max=self.num_experts - 1)
        if self.num_experts == 1:
            raise ValueError("cannot exclude the only expert")
        keep_E = torch.ones(self.num_experts, dtype=torch.bool, device=device)
        keep_E[exclude] = False
        return keep_E

    def expert_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, E, D) the frozen experts' features (no gradient)."""
        with torch.no_grad():
            return torch.stack([e(x) for e in self.experts], 1)

    def teacher_signal(self, x: torch.Tensor, exclude: Optional[int] = None) -> torch.Tensor:
        """(B, D) the aggregated supervision for inputs x (expert `exclude` masked out)."""
        return self.aggregator(self.expert_features(x), self._keep(exclude, x.device))

    def adapt(self, x_support: torch.Tensor, *, exclude: Optional[int] = None,
              create_graph: Optional[bool] = None) -> dict:
        """The student's feature-extractor parameters after the inner loop on the **unlabeled**
        support inputs: `inner_steps` SGD steps on ``MSE(student(x_S), aggregator(experts(x_S)))``.
        create_graph: keep the graph for the meta-gradient (default: during training, unless
        `first_order`)."""
        check_tensor("x_support", x_support, floating=True)
        if create_graph is None:
            create_graph = self.training and not self.first_order
        target_SD = self.teacher_signal(x_support, exclude)
        params = dict(self.student.named_parameters())
        for _ in range(self.inner_steps):
            with torch.enable_grad():
                loss = F.mse_loss(functional_call(self.student, params, (x_support,)), target_SD)
                grads = torch.autograd.grad(loss, list(params.values()), create_graph=create_graph,
                                            allow_unused=True)
            params = {k: p if g is None else p - self.inner_lr * g for (k, p), g in zip(params.items(), grads)}
        return params

    def logits(self, x: torch.Tensor, params: Optional[dict] = None) -> torch.Tensor:
        """(B, C) the student's logits, with adapted feature-extractor `params` if given."""
        feats = self.student(x) if params is None else functional_call(self.student, params, (x,))
        return self.classifier(feats)

    def meta_loss(self, x_support: torch.Tensor, x_query: torch.Tensor, y_query: torch.Tensor, *,
                  exclude: Optional[int] = None) -> torch.Tensor:
        """Query cross-entropy of the student adapted on the unlabeled support inputs."""
        check_tensor("y_query", y_query, shape=(x_query.shape[0],), integer=True)
        return F.cross_entropy(self.logits(x_query, self.adapt(x_support, exclude=exclude)), y_query)

    def adapt_and_predict(self, x_support: torch.Tensor, x: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Test time: adapt on the unlabeled `x_support`, return the logits of `x` (default: the support)."""
        params = {k: v.detach() for k, v in self.adapt(x_support, create_graph=False).items()}
        with torch.no_grad():
            return self.logits(x_support if x is None else x, params)


def meta_train_dmoe(model: MetaDMoE, sample_episode: Callable[[], tuple], *, steps: int, lr: float = 1e-3,
                    grad_clip: float = 1.0) -> list[float]:
    """Meta-train the aggregator, the student's initialisation and its classifier.

    ``sample_episode() -> (x_support, x_query, y_query, exclude)``: an unlabeled support batch and a
    labelled query batch of one source domain, and the index of that domain's expert (masked out of
    the aggregator) or None. Adam with a cosine decay to 0 (`moekit.optim.UpdateStep`); the experts
    are not in the optimizer and stay frozen. Returns the per-step query losses."""
    check_instance("model", model, MetaDMoE)
    steps = check_int("steps", steps, min=1)
    lr = check_number("lr", lr, min=0, min_open=True)
    learned = nn.ModuleList([model.student, model.classifier, model.aggregator])
    update = UpdateStep(learned, build_optimizer(learned, name="adam", lr=lr), lr=lr, total_steps=steps,
                        schedule="cosine", grad_clip=grad_clip)
    model.train()
    losses = []
    for _ in range(steps):
        x_s, x_q, y_q, exclude = sample_episode()
        losses.append(update(model.meta_loss(x_s, x_q, y_q, exclude=exclude))["loss"])
    model.eval()
    return losses
