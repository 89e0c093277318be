"""Distilling a sparse MoE language model into a dense one (Switch Transformer §5) — METHODS.md T9.

Legend: T tokens (leading dims flattened), V vocabulary, D model dim, E experts, K experts per
token, F routed expert hidden, G the student's dense hidden (K·F + shared hidden).

Fedus, Zoph & Shazeer (2021), "Switch Transformers", §5: a dense student trained on a mix of the
ground-truth labels and the MoE teacher's probabilities (teacher weight 0.25), initialised with
the teacher's non-expert weights, kept about 30 % of the sparse model's quality gain over a
dense baseline of the student's size.

- `distillation_loss`: ``(1 − α)·CE(y, q_S) + α·τ²·H(p_T^τ, q_S^τ)``, a pure function.
- `dense_student_from_moe`: the teacher's dense twin (same active parameters per token) with
  every non-expert weight copied; each MoE FFN becomes a dense FFN (``ffn_init``).
- `distill`: the training loop. Its update is `moekit.optim`'s, the one the LM trainer makes
  (AdamW over `param_groups`, linear warmup then cosine, global-norm clipping, MoE balancing
  loss and bias updates), so a student and a baseline trained by the trainer are compared like
  for like; a test checks the two agree step for step.
- `teacher_kl`: the mean KL(p_T ‖ p_S) per token, the distance distillation closes.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from moekit.experts.glu import GLUExperts
from moekit.experts.mlp import MLPExperts
from moekit.layers.moe import MoE, aux_loss
from moekit.layers.protocol import MoELayer
from moekit.models.transformer import TransformerLM
from moekit.optim import UpdateStep, build_optimizer
from moekit.validate import check_int, check_number, check_probability

__all__ = ["distillation_loss", "dense_student_from_moe", "distill", "teacher_kl", "FFN_INITS"]

FFN_INITS = ("random", "mean", "top")


def _check_coefs(alpha, temperature, ignore_index=-100) -> None:
    check_int("ignore_index", ignore_index)
    check_number("alpha", alpha, min=0, max=1)          # the teacher's weight
    check_number("temperature", temperature, min=0, min_open=True)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: Optional[torch.Tensor], labels: torch.Tensor,
                      *, alpha: float = 0.25, temperature: float = 1.0, ignore_index: int = -100) -> torch.Tensor:
    """Knowledge-distillation loss (Hinton, Vinyals & Dean 2015; Switch Transformer §5), a float32 scalar::

        L = (1 − α) · mean_t CE(y_t, softmax(s_t))  +  α · τ² · mean_t H(softmax(t_t / τ), softmax(s_t / τ))

    with ``H(p, q) = −Σ_v p_v log q_v`` and both means over the positions whose label is not
    `ignore_index` (0 when every position is ignored, rather than NaN).

    The soft term is the cross-entropy against the teacher's probabilities, not the KL:
    ``H(p, q) = KL(p ‖ q) + H(p)`` and ``H(p)`` does not depend on the student, so the gradients
    are identical, and at τ = 1 the whole loss is exactly the cross-entropy against the mixed
    target ``(1 − α)·onehot(y) + α·p_T`` — Switch's "mix of ground-truth labels and teacher
    probabilities". The value therefore keeps the teacher's entropy (use `teacher_kl` to see
    the distance itself). The τ² factor undoes the 1/τ² by which softening scales the soft
    term's gradient (Hinton et al. 2015), so α keeps its meaning at any τ. The teacher's
    logits are constants (detached).

    Args:
        student_logits: (..., V).
        teacher_logits: (..., V), the student's shape; may be None only when ``alpha == 0``.
        labels: (...) integer ids, the logits' shape without the last dim.
        alpha: the teacher's weight α in [0, 1] (Switch: 0.25); α = 0 is plain cross-entropy.
        temperature: τ > 0, softens both distributions in the soft term.
        ignore_index: label of positions left out of both terms (padding).
    """
    _check_coefs(alpha, temperature, ignore_index)
    if not isinstance(student_logits, torch.Tensor) or student_logits.dim() < 1 \
            or not student_logits.is_floating_point():
        raise ValueError(f"student_logits must be a floating (..., V) tensor, got "
                         f"{getattr(student_logits, 'dtype', type(student_logits).__name__)} "
                         f"{tuple(getattr(student_logits, 'shape', ()))}")
    shape = tuple(student_logits.shape)
    if teacher_logits is None:
        if alpha > 0:
            raise ValueError(f"teacher_logits may be None only with alpha=0, got alpha={alpha}")
    elif tuple(teacher_logits.shape) != shape:
        raise ValueError(f"teacher_logits must have the student's shape {shape}, got {tuple(teacher_logits.shape)}")
    if tuple(labels.shape) != shape[:-1]:
        raise ValueError(f"labels must have shape {shape[:-1]} (the logits without their last dim), "
                         f"got {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer class ids, got {labels.dtype}")

    V = shape[-1]
    s_TV = student_logits.reshape(-1, V).float()
    y_T = labels.reshape(-1).long()
    valid_T = y_T != ignore_index
    n_valid = valid_T.sum().clamp_min(1)          # stays on the device: no host sync
    loss = s_TV.new_zeros(())
    if alpha < 1:
        hard = F.cross_entropy(s_TV, y_T, ignore_index=ignore_index, reduction="sum") / n_valid
        loss = loss + (1.0 - alpha) * hard
    if alpha > 0:
        t_TV = teacher_logits.detach().reshape(-1, V).float()
        p_TV = torch.softmax(t_TV / temperature, dim=-1)
        logq_TV = torch.log_softmax(s_TV / temperature, dim=-1)
        # xlogy-style: a teacher probability of exactly 0 contributes 0 even where log q = -inf.
        soft_T = -torch.where(p_TV > 0, p_TV * logq_TV, torch.zeros_like(logq_TV)).sum(-1)
        soft = torch.where(valid_T, soft_T, torch.zeros_like(soft_T)).sum() / n_valid
        loss = loss + alpha * temperature ** 2 * soft
    return loss


# ---------------------------------------------------------------------------------------------
# The student.

def _routed_bank(moe: MoE):
    bank = moe.experts
    if not isinstance(bank, (GLUExperts, MLPExperts)):
        raise ValueError(f"only stacked GLU/MLP expert banks become a dense FFN, got {type(bank).__name__}")
    return bank


def _dense_hidden(moe: MoE) -> int:
    """G = K·F + the shared experts' hidden: the dense FFN doing the MoE layer's active work."""
    shared = 0 if moe.shared_experts is None else moe.shared_experts.ffn.down_proj.weight.shape[1]
    return moe.top_k * _routed_bank(moe).d_hidden + shared


def _slices(bank, experts: list[list[int]], glu: bool):
    """Per slice k: the mean over experts[k] of (gate_FD, up_FD, down_DF); gate None for MLP."""
    F_ = bank.d_hidden
    out = []
    for group in experts:
        idx = torch.tensor(group, device=bank.down_proj.device)
        down_DF = bank.down_proj[idx].mean(0)
        if glu:
            w_2FD = bank.gate_up_proj[idx].mean(0)
            out.append((w_2FD[:F_], w_2FD[F_:], down_DF))
        else:
            out.append((None, bank.up_proj[idx].mean(0), down_DF))
    return out


def _fill_dense(ffn: nn.Module, moe: MoE, ffn_init: str, counts_E: Optional[torch.Tensor]) -> None:
    """Write the MoE layer's weights into the dense FFN: units [0, K·F) routed, [K·F, G) shared."""
    bank, K = _routed_bank(moe), moe.top_k
    glu = isinstance(bank, GLUExperts)
    if glu != ffn.glu:
        raise ValueError(f"the teacher's experts are {type(bank).__name__} but the student's FFN is "
                         f"{'GLU' if ffn.glu else 'MLP'} (config.ffn={ffn.expert!r})")
    G, KF = ffn.down_proj.weight.shape[1], K * bank.d_hidden
    w_in = ffn.gate_up_proj.weight if glu else ffn.up_proj.weight      # (2G, D) gate rows first, or (G, D)
    down_DG = ffn.down_proj.weight
    if ffn_init != "random":
        if getattr(bank, "up_bias", None) is not None:
            raise ValueError("experts with biases cannot be copied into a bias-free DenseFFN; use ffn_init='random'")
        E = bank.num_experts
        if ffn_init == "mean":
            groups = [[e for e in range(E) if e % K == k] for k in range(K)]
        else:
            order = torch.sort(counts_E.detach().cpu().float(), descending=True, stable=True).indices
            groups = [[int(e)] for e in order[:K]]
        parts = _slices(bank, groups, glu)
        # Each slice's output projection is scaled by 1/K: the K slices compute the uniform
        # mixture of their experts, as the MoE does when its K combine weights are equal.
        down_DG[:, :KF] = torch.cat([d for _, _, d in parts], 1) / K
        if glu:
            w_in[:KF] = torch.cat([g for g, _, _ in parts], 0)
            w_in[G:G + KF] = torch.cat([u for _, u, _ in parts], 0)
        else:
            w_in[:KF] = torch.cat([u for _, u, _ in parts], 0)
    if moe.shared_experts is not None:
        sh = moe.shared_experts
        if sh.gate is not None:
            raise ValueError("shared experts with a sigmoid gate (Qwen-MoE) have no dense equivalent")
        if sh.ffn.glu != glu:
            raise ValueError("shared and routed experts must both be GLU or both MLP")
        Fs = G - KF
        down_DG[:, KF:] = sh.ffn.down_proj.weight
        if glu:
            w_in[KF:G] = sh.ffn.gate_up_proj.weight[:Fs]
            w_in[G + KF:] = sh.ffn.gate_up_proj.weight[Fs:]
        else:
            w_in[KF:] = sh.ffn.up_proj.weight


def dense_student_from_moe(teacher: TransformerLM, *, ffn_init: str = "random",
                           usage: Optional[dict] = None, seed: int = 0) -> TransformerLM:
    """A dense `TransformerLM` holding every non-expert weight of the MoE `teacher` (Switch §5).

    The student is the teacher's dense twin: each MoE layer becomes a dense FFN of hidden
    ``G = K·F + S·F_s`` (its K routed experts plus its shared experts: the same active matmul
    work per token, `moekit.models.dense_twin`), read from the layers themselves so an upcycled
    teacher works too. Embeddings, attention, norms, the output head and the teacher's dense
    FFN layers are copied exactly (new tensors); the shared experts fill the last ``S·F_s``
    hidden units of their dense FFN. The student config holds one FFN width, so a teacher that
    mixes dense and MoE layers works only where both widths agree (else a ValueError names them).
    The routed part, units ``[0, K·F)``, by `ffn_init`:

    - ``"random"`` (Switch §5, which copies only non-expert weights): the fresh initialisation
      of a `TransformerLM` (seeded by `seed`).
    - ``"mean"``: slice k is the parameter mean of experts ``{e : e mod K = k}``, its output
      projection scaled by 1/K. For an MoE sparsely upcycled from a dense model (every expert
      a copy of one FFN) this inverts the upcycling; for experts trained from independent
      initialisations a parameter mean is no meaningful function.
    - ``"top"``: the K experts that received the most tokens in `usage`, one per slice, output
      projections scaled by 1/K (the uniform mixture of the busiest experts).

    Args:
        teacher: a `TransformerLM` with at least one `moekit.MoE` feed-forward layer.
        usage: for ``"top"``: ``{layer name: (E,) token counts}`` as returned by
            `moekit.recipes.expert_usage` (names like ``"blocks.1.ffn"``).
        seed: seeds the student's fresh initialisation (global RNG state is restored).

    Returns the student on the teacher's device and dtype, in the teacher's train/eval mode;
    `moekit.moe_layers(student)` is empty.
    """
    if not isinstance(teacher, TransformerLM):
        raise TypeError(f"teacher must be a moekit TransformerLM, got {type(teacher).__name__}")
    if ffn_init not in FFN_INITS:
        raise ValueError(f"ffn_init must be one of {FFN_INITS}, got {ffn_init!r}")
    moe_ids = [i for i, b in enumerate(teacher.blocks) if isinstance(b.ffn, MoE)]
    if not moe_ids:
        raise ValueError("the teacher has no MoE layer to distil (every block's FFN is dense)")
    if len(moe_ids) != len([m for m in teacher.modules() if isinstance(m, MoELayer)]):
        raise ValueError("the teacher has MoE-like layers outside its blocks' feed-forwards")
    hidden = {i: _dense_hidden(teacher.blocks[i].ffn) for i in moe_ids}
    if len(set(hidden.values())) != 1:
        raise ValueError(f"the MoE layers' active hidden sizes differ ({hidden}); the student keeps one ffn_hidden")
    G = hidden[moe_ids[0]]
    dense = {i: b.ffn.down_proj.weight.shape[1] for i, b in enumerate(teacher.blocks) if i not in hidden}
    if any(h != G for h in dense.values()):
        raise ValueError(f"the student needs one FFN size: MoE layers are active-equivalent to hidden {G} but "
                         f"the dense layers have hidden sizes {dense}")
    names = [f"blocks.{i}.ffn" for i in moe_ids]
    counts = {}
    if ffn_init == "top":
        if usage is None:
            raise ValueError("ffn_init='top' needs usage={layer name: (E,) counts} (moekit.recipes.expert_usage)")
        missing = [n for n in names if n not in usage]
        if missing:
            raise ValueError(f"usage has no counts for MoE layer(s) {missing}; got keys {sorted(usage)}")
        for i, n in zip(moe_ids, names):
            E = teacher.blocks[i].ffn.num_experts
            if tuple(usage[n].shape) != (E,):
                raise ValueError(f"usage[{n!r}] must have shape ({E},), got {tuple(usage[n].shape)}")
            counts[i] = usage[n]
    elif usage is not None:
        raise ValueError(f"usage is only read by ffn_init='top', got ffn_init={ffn_init!r}")

    config = dataclasses.replace(teacher.config, moe_layers="none", ffn_hidden=G)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        student = TransformerLM(config)
    ref = teacher.embed.weight
    student = student.to(device=ref.device, dtype=ref.dtype)

    replaced = tuple(n + "." for n in names)
    t_sd = teacher.state_dict()
    new_sd = {}
    for k, v in student.state_dict().items():
        if k.startswith(replaced):
            new_sd[k] = v
            continue
        if k not in t_sd or t_sd[k].shape != v.shape:
            raise ValueError(f"teacher tensor {k!r} missing or shaped "
                             f"{tuple(t_sd[k].shape) if k in t_sd else None}, student expects {tuple(v.shape)}")
        new_sd[k] = t_sd[k]
    student.load_state_dict(new_sd)               # copies into the student's own tensors
    with torch.no_grad():
        for i in moe_ids:
            _fill_dense(student.blocks[i].ffn, teacher.blocks[i].ffn, ffn_init, counts.get(i))
    return student.train(teacher.training)


# ---------------------------------------------------------------------------------------------
# Training.

def _logits(out) -> torch.Tensor:
    """Logits from a model's output: a tensor, a tuple starting with it (moekit), or ``.logits``."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    return out.logits


def _batch_source(batches) -> Callable[[], tuple]:
    if callable(batches):
        return batches
    it = iter(batches)

    def nxt():
        try:
            return next(it)
        except StopIteration:
            raise ValueError("batches ran out before `steps` optimizer steps; pass more batches or a "
                             "callable such as BatchSampler.next_batch") from None
    return nxt


def distill(teacher: Optional[nn.Module], student: nn.Module, batches: Union[Callable, Iterable], *, steps: int,
            lr: float = 3e-3, alpha: float = 0.25, temperature: float = 1.0, ignore_index: int = -100,
            warmup_steps: int = 0, min_lr_ratio: float = 0.1, weight_decay: float = 0.1, beta1: float = 0.9,
            beta2: float = 0.95, eps: float = 1e-8, grad_clip: float = 1.0,
            callback: Optional[Callable[[int, float], None]] = None) -> list[float]:
    """Train `student` for `steps` optimizer steps on `distillation_loss` against `teacher`.

    The teacher runs in eval mode under ``torch.no_grad`` (its mode is restored afterwards); the
    student trains in train mode. Each step: ``distillation_loss + moekit.aux_loss(student)``
    (the balancing loss is 0 for a dense student), global-norm clipping, AdamW with the
    learning rate of linear warmup then cosine decay to ``min_lr_ratio · lr``, and the
    aux-loss-free bias update — one `moekit.optim.UpdateStep`, the LM trainer's step with one
    micro-batch, so ``distill(..., **dataclasses.asdict(run.optim))`` trains as ``moekit train``
    would, and with ``alpha=0`` (``teacher=None``) it is that trainer's plain training.

    Args:
        teacher: any model mapping ``x (B, S)`` to logits (a tensor, a tuple starting with them,
            or an object with ``.logits``); None only with ``alpha=0``.
        student: a model of the same interface, on the device the batches are moved to.
        batches: a callable returning ``(x_BS, y_BS, ...)`` (e.g. `BatchSampler.next_batch`) or
            an iterable of such tuples holding at least `steps` of them.
        steps, lr, warmup_steps, min_lr_ratio, weight_decay, beta1, beta2, eps, grad_clip: the
            optimizer (field names of `moekit.train.OptimConfig`; ``grad_clip=0``: no clipping).
        alpha, temperature, ignore_index: see `distillation_loss`.
        callback: called as ``callback(step, loss)`` after each step (1-based).

    Returns the loss of every step (distillation loss plus balancing loss). A non-finite loss
    or gradient norm raises `moekit.optim.NonFiniteError` (a FloatingPointError) before that
    step's update.
    """
    _check_coefs(alpha, temperature, ignore_index)
    check_int("steps", steps, min=1)
    check_number("lr", lr, min=0, min_open=True)
    check_int("warmup_steps", warmup_steps, min=0)
    check_probability("min_lr_ratio", min_lr_ratio)
    for name, v in (("weight_decay", weight_decay), ("grad_clip", grad_clip), ("eps", eps)):
        check_number(name, v, min=0)
    for name, v in (("beta1", beta1), ("beta2", beta2)):
        check_number(name, v, min=0, max=1, max_open=True)
    if teacher is None and alpha > 0:
        raise ValueError(f"teacher=None is only plain training (alpha=0), got alpha={alpha}")
    device = next(student.parameters()).device
    optimizer = build_optimizer(student, name="adamw", lr=lr, weight_decay=weight_decay, betas=(beta1, beta2),
                                eps=eps)
    update = UpdateStep(student, optimizer, lr=lr, total_steps=steps, warmup_steps=warmup_steps,
                        min_lr_ratio=min_lr_ratio, schedule="cosine", grad_clip=grad_clip)
    next_batch = _batch_source(batches)
    teacher_was_training = teacher.training if teacher is not None else False
    if teacher is not None:
        teacher.eval()
    student.train()
    losses = []
    try:
        for step in range(steps):
            x_BS, y_BS = (t.to(device, non_blocking=True) for t in next_batch()[:2])
            t_logits = None
            if teacher is not None and alpha > 0:
                with torch.no_grad():
                    t_logits = _logits(teacher(x_BS))
            loss = distillation_loss(_logits(student(x_BS)), t_logits, y_BS, alpha=alpha,
                                     temperature=temperature, ignore_index=ignore_index)
            value = update(loss + aux_loss(student).float())["loss"]
            losses.append(value)
            if callback is not None:
                callback(step + 1, value)
    finally:
        optimizer.zero_grad(set_to_none=True)
        if teacher is not None:
            teacher.train(teacher_was_training)
    return losses


@torch.no_grad()
def teacher_kl(teacher: nn.Module, student: nn.Module, batches: Iterable) -> float:
    """Mean ``KL(p_T ‖ p_S)`` per token (nats) over `batches` (tuples ``(x_BS, ...)`` or tensors),
    both models in eval mode (their modes are restored)."""
    modes = (teacher.training, student.training)
    teacher.eval()
    student.eval()
    device = next(student.parameters()).device
    total, n = 0.0, 0
    try:
        for batch in batches:
            x_BS = (batch[0] if isinstance(batch, (tuple, list)) else batch).to(device)
            logp_T = torch.log_softmax(_logits(teacher(x_BS)).float(), -1)
            logq_T = torch.log_softmax(_logits(student(x_BS)).float(), -1)
            total += float(F.kl_div(logq_T, logp_T, log_target=True, reduction="sum"))
            n += logp_T[..., 0].numel()
    finally:
        teacher.train(modes[0])
        student.train(modes[1])
    if n == 0:
        raise ValueError("teacher_kl needs at least one batch")
    return total / n
