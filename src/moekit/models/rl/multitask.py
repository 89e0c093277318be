"""Task-conditioned mixtures of encoders for multi-task RL: MOORE (RL3), CARE (RL4), and the
hard task routing of RL5's MoE layers.

Legend: B samples, D torso width, F expert hidden dim, E experts (encoders), L tasks,
W width of the hashed metadata embedding.

- MOORE (Hendawy, Peters & D'Eramo, ICLR 2024, "Multi-Task Reinforcement Learning with Mixture
  of Orthogonal Experts"): E experts map the state to E vectors; Gram–Schmidt turns them into an
  orthonormal set ``V_s`` (E × D, rows orthonormal, per state); a task encoder gives weights
  ``w_c`` (E,) — a linear map of the task's one-hot, i.e. one learned row per task, no softmax,
  as in the official code — and the representation is ``tanh(w_cᵀ V_s)`` (the official code's
  only activation after mixing). `OrthogonalExperts`.
- CARE (Sodhani, Zhang & Pineau, ICML 2021, "Multi-Task Reinforcement Learning with
  Context-based Representations"): E encoders; attention weights ``α = softmax(W z_c)`` over them
  come from an embedding ``z_c`` of the task's metadata (a text description); the weighted
  mixture is joined with ``z_c`` and fed to the heads. CARE embeds the descriptions with a
  pretrained language model; here the embedding is `hashed_bag_of_words` (a fixed, deterministic
  signed bag of hashed words; no model to download), followed by a learned projection, as CARE
  learns an MLP over its frozen embeddings. `ContextMixtureEncoders`.
- RL5 hard task routing (Willi, Obando-Ceron, Foerster, Dziugaite & Castro 2024, "Mixture of
  Experts in a Mixture of RL settings"): every sample of task t goes to expert t with gate 1.
  `hard_task_moe` builds a `moekit.MoE` whose router is moekit's `HashRouter` with the identity
  table (task id → expert), called with ``token_ids=task_B``.

In both encoder mixtures the experts are one `moekit.experts.MLPExperts` bank (D → F → D per
expert) applied to every sample — each expert sees the whole batch, so there is no routing —
after the agent's shared input projection (observation → D). The official MOORE code uses E
full encoders (small CNNs on MiniGrid); sharing the first linear map is this library's choice.
"""
from __future__ import annotations

import re
import zlib
from dataclasses import replace
from typing import Sequence

import torch
from torch import nn

from moekit.experts import MLPExperts
from moekit.layers.config import MoEConfig
from moekit.layers.moe import MoE
from moekit.validate import check_choice, check_int, check_tensor

__all__ = ["gram_schmidt", "gram_schmidt_reference", "OrthogonalExperts", "hashed_bag_of_words",
           "ContextMixtureEncoders", "MultiTaskObsEncoder", "OBS_ENCODERS", "hard_task_moe"]


# ---------------------------------------------------------------------------------------------
# Gram–Schmidt
def gram_schmidt(v_BED: torch.Tensor, *, eps: float = 1e-8) -> torch.Tensor:
    """Orthonormalise the E rows of each sample's (E, D) matrix → ``u_BED`` with ``u uᵀ = I``.

    Modified Gram–Schmidt (each row minus its projections on the rows already done, one at a
    time — numerically steadier than the classical form of the official MOORE code, same result
    in exact arithmetic), vectorised over B; differentiable. Needs E ≤ D. Row norms are clamped
    at `eps` (a zero residual — a row dependent on the earlier ones — stays a zero row instead of
    becoming NaN). `gram_schmidt_reference` is
    the per-sample loop it equals.
    """
    check_tensor("v", v_BED, ndim=3, floating=True)
    B, E, D = v_BED.shape
    if E > D:
        raise ValueError(f"Gram–Schmidt needs at most D={D} vectors of width D, got E={E}")
    rows = []
    for e in range(E):
        w_BD = v_BED[:, e]
        for u_BD in rows:
            w_BD = w_BD - (w_BD * u_BD).sum(-1, keepdim=True) * u_BD
        rows.append(w_BD / w_BD.norm(dim=-1, keepdim=True).clamp_min(eps))
    return torch.stack(rows, dim=1)                                          # (B, E, D)


def gram_schmidt_reference(v_BED: torch.Tensor, *, eps: float = 1e-8) -> torch.Tensor:
    """The reference of `gram_schmidt`: one sample and one pair of rows at a time."""
    out = []
    for v_ED in v_BED:
        basis = []
        for v_D in v_ED:
            w_D = v_D
            for u_D in basis:
                w_D = w_D - torch.dot(w_D, u_D) * u_D
            basis.append(w_D / torch.clamp(torch.linalg.vector_norm(w_D), min=eps))
        out.append(torch.stack(basis))
    return torch.stack(out)


def _all_experts(bank: MLPExperts, h_BD: torch.Tensor) -> torch.Tensor:
    """Every expert of `bank` on every row → ``(B, E, D)``."""
    B, D = h_BD.shape
    E = bank.num_experts
    y_ND = bank(h_BD.repeat(E, 1), torch.full((E,), B, dtype=torch.long))      # expert-major rows
    return y_ND.reshape(E, B, D).transpose(0, 1)


class OrthogonalExperts(nn.Module):
    """MOORE's mixture of orthogonal experts: ``(h_BD, task_B) → tanh(w_{task}ᵀ GS(experts(h)))``.

    ``basis(h_BD)`` gives the orthonormal ``V_s`` (B, E, D); ``task_weight`` (L, E) holds each
    task's ``w_c`` (the official task encoder is a bias-free linear map of the one-hot task).
    With E = 1 the output is ``tanh(w_c · f(h) / ‖f(h)‖)``: a normalised single encoder.
    The rows of ``V_s`` are orthonormal whenever the E expert outputs of the state are linearly
    independent (a dependent one leaves a zero row, see `gram_schmidt`).
    """

    def __init__(self, *, d_model: int, num_experts: int, num_tasks: int, d_hidden: int,
                 activation: str = "relu"):
        super().__init__()
        check_int("d_model", d_model, min=1)
        check_int("num_experts", num_experts, min=1, max=d_model)
        check_int("num_tasks", num_tasks, min=1)
        check_int("d_hidden", d_hidden, min=1)
        self.num_experts, self.num_tasks = num_experts, num_tasks
        self.experts = MLPExperts(num_experts, d_model, d_hidden, activation=activation, bias=True)
        # nn.Linear's bias init instead of the bank's zeros: with zero biases a ReLU expert whose
        # hidden units are all off outputs exactly 0, which has no direction to orthonormalise.
        for b, fan_in in ((self.experts.up_bias, d_model), (self.experts.down_bias, d_hidden)):
            nn.init.uniform_(b, -fan_in ** -0.5, fan_in ** -0.5)
        self.task_weight = nn.Parameter(torch.empty(num_tasks, num_experts))
        # nn.Linear's default init of the official task encoder (fan_in = L one-hot inputs).
        nn.init.uniform_(self.task_weight, -num_tasks ** -0.5, num_tasks ** -0.5)

    def basis(self, h_BD: torch.Tensor) -> torch.Tensor:
        return gram_schmidt(_all_experts(self.experts, h_BD))

    def forward(self, h_BD: torch.Tensor, task_B: torch.Tensor) -> torch.Tensor:
        u_BED = self.basis(h_BD)
        w_BE = self.task_weight[task_B]
        return torch.tanh(torch.einsum("be,bed->bd", w_BE, u_BED))


# ---------------------------------------------------------------------------------------------
# CARE
def hashed_bag_of_words(texts: Sequence[str], dim: int = 64) -> torch.Tensor:
    """``(L, dim)`` fixed embedding of each text: a signed bag of hashed words, unit L2 norm.

    Words are lower-cased runs of letters and digits; word w adds ``±1`` to bucket
    ``crc32(w) mod dim``, the sign taken from another bit of the hash (the hashing trick of
    Weinberger et al. 2009). CRC-32 is fixed across processes and platforms (unlike Python's
    salted ``hash``), so the same description always gives the same vector. A text without
    words gives the zero vector.
    """
    check_int("dim", dim, min=1)
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise TypeError(f"texts must be a sequence of str (one description per task), got {texts!r}")
    out = torch.zeros(len(texts), dim)
    for i, text in enumerate(texts):
        for word in re.findall(r"[a-z0-9]+", text.lower()):
            h = zlib.crc32(word.encode())
            out[i, h % dim] += 1.0 if (h >> 31) & 1 else -1.0
    return out / out.norm(dim=-1, keepdim=True).clamp_min(1e-12)


class ContextMixtureEncoders(nn.Module):
    """CARE's context-based mixture of encoders: ``(h_BD, task_B) → proj([Σ_e α_e f_e(h), z_c])``.

    ``z_c = tanh(C m_c)`` is a learned projection (D) of the task's fixed metadata embedding
    ``m_c`` (a buffer); ``α = softmax(W z_c)`` (E,) weighs the encoders; the mixture and ``z_c``
    are concatenated and projected back to D. The weights depend on the metadata alone:
    tasks with the same description share them. ``mixture_weights(task_B)`` gives α (B, E).
    """

    def __init__(self, *, d_model: int, num_experts: int, metadata_LW: torch.Tensor, d_hidden: int,
                 activation: str = "relu"):
        super().__init__()
        check_int("d_model", d_model, min=1)
        check_int("num_experts", num_experts, min=1)
        check_int("d_hidden", d_hidden, min=1)
        check_tensor("metadata", metadata_LW, ndim=2, floating=True)
        self.num_experts, self.num_tasks = num_experts, metadata_LW.shape[0]
        self.register_buffer("metadata_LW", metadata_LW.detach().clone())
        self.context = nn.Linear(metadata_LW.shape[1], d_model)
        self.attention = nn.Linear(d_model, num_experts)
        self.experts = MLPExperts(num_experts, d_model, d_hidden, activation=activation, bias=True)
        self.out = nn.Linear(2 * d_model, d_model)

    def context_embedding(self, task_B: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.context(self.metadata_LW[task_B]))                  # (B, D)

    def mixture_weights(self, task_B: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.attention(self.context_embedding(task_B)), dim=-1)    # (B, E)

    def forward(self, h_BD: torch.Tensor, task_B: torch.Tensor) -> torch.Tensor:
        z_BD = self.context_embedding(task_B)
        alpha_BE = torch.softmax(self.attention(z_BD), dim=-1)
        mix_BD = torch.einsum("be,bed->bd", alpha_BE, _all_experts(self.experts, h_BD))
        return torch.tanh(self.out(torch.cat([mix_BD, z_BD], dim=-1)))


# ---------------------------------------------------------------------------------------------
# Observations that carry the task's one-hot (MetaWorld's ``use_one_hot``)
OBS_ENCODERS = ("shared", "moore", "care")


class MultiTaskObsEncoder(nn.Module):
    """``obs_BO → (B, D)`` for observations whose last L features are the task's one-hot (as
    MetaWorld's multi-task benchmarks give them with ``use_one_hot=True``): the state part is
    projected to D, then

    - ``"shared"``: the task embedding is added and a dense MLP (hidden ``E · F``) with tanh
      follows — the shared multi-task network of the MOORE and CARE papers' baselines;
    - ``"moore"``: `OrthogonalExperts` (E experts of hidden F, task weights from the one-hot);
    - ``"care"``: `ContextMixtureEncoders` (E encoders, attention from `hashed_bag_of_words` of
      ``task_metadata``, one description per task).

    The task id is the argmax of the one-hot part. ``out_dim`` = D. Used as the encoder of the
    SAC actor and critics (`moekit.models.rl.MixtureGaussianPolicy`, `moekit.models.rl.TwinQ`).
    """

    def __init__(self, kind: str, *, obs_dim: int, num_tasks: int, d_model: int = 64, num_experts: int = 4,
                 d_hidden: int = 64, task_metadata: Sequence[str] | None = None, metadata_dim: int = 32):
        super().__init__()
        self.kind = check_choice("kind", kind, OBS_ENCODERS)
        self.num_tasks = check_int("num_tasks", num_tasks, min=1)
        check_int("obs_dim", obs_dim, min=num_tasks + 1)
        self.out_dim = D = check_int("d_model", d_model, min=1)
        E, Fh = check_int("num_experts", num_experts, min=1), check_int("d_hidden", d_hidden, min=1)
        self.obs_dim = obs_dim
        self.embed = nn.Linear(obs_dim - num_tasks, D)
        if kind == "shared":
            self.task_embed = nn.Embedding(num_tasks, D)
            self.mixture = nn.Sequential(nn.ReLU(), nn.Linear(D, E * Fh), nn.ReLU(), nn.Linear(E * Fh, D), nn.Tanh())
        elif kind == "moore":
            self.mixture = OrthogonalExperts(d_model=D, num_experts=E, num_tasks=num_tasks, d_hidden=Fh)
        else:
            if task_metadata is None or len(task_metadata) != num_tasks:
                raise ValueError(f"the care encoder needs task_metadata: one description (str) per task "
                                 f"({num_tasks}), got {task_metadata!r}")
            self.mixture = ContextMixtureEncoders(d_model=D, num_experts=E, d_hidden=Fh,
                                                  metadata_LW=hashed_bag_of_words(task_metadata, metadata_dim))

    def split(self, obs_BO: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(state_BS, task_B)``: the observation without its one-hot, and the task ids."""
        check_tensor("obs", obs_BO, ndim=2, floating=True)
        if obs_BO.shape[1] != self.obs_dim:
            raise ValueError(f"obs must have shape (B, {self.obs_dim}), got {tuple(obs_BO.shape)}")
        L = self.num_tasks
        return obs_BO[:, :-L], obs_BO[:, -L:].argmax(-1)

    def forward(self, obs_BO: torch.Tensor) -> torch.Tensor:
        state_BS, task_B = self.split(obs_BO)
        h_BD = self.embed(state_BS)
        if self.kind == "shared":
            return self.mixture(h_BD + self.task_embed(task_B))
        return self.mixture(h_BD, task_B)


# ---------------------------------------------------------------------------------------------
# RL5 hard task routing
def hard_task_moe(config: MoEConfig, *, d_model: int, num_tasks: int) -> MoE:
    """A `moekit.MoE` (``config``'s experts) that sends every sample of task t to expert t, gate 1.

    The router is `moekit.routing.HashRouter` with the identity table; call the layer as
    ``moe(x_BD, token_ids=task_B)``. Needs ``num_experts >= num_tasks`` (experts beyond the
    tasks stay unused); ``top_k`` and ``router`` of `config` are replaced.
    """
    check_int("num_tasks", num_tasks, min=1)
    if config.num_experts < num_tasks:
        raise ValueError(f"hard task routing gives each task its own expert: need num_experts >= "
                         f"num_tasks={num_tasks}, got num_experts={config.num_experts}")
    moe = replace(config, router="hash", top_k=None, router_kwargs={"vocab_size": num_tasks}).build(d_model)
    moe.router.table.copy_(torch.arange(num_tasks))
    return moe
