"""Hash routing (Roller, Sukhbaatar, Szlam & Weston 2021, "Hash Layers For Large Sparse Models")
— METHODS.md G8.

Legend: T tokens, D model dim, E experts, V vocabulary size.

Each token goes to expert ``h(token_id)``, a fixed function chosen before training, with gate 1.
The router has no parameters and ignores the hidden state: routing is context-independent.

- ``vocab_size=None``: ``h`` is a seeded universal hash ``((a·id + b) mod P) mod E``
  (P = 2³¹ − 1, a and b drawn from ``seed``), so any id works.
- ``vocab_size=V``: a random table ``(V,)`` drawn from ``seed`` (the paper's "random hash"),
  kept as a buffer so it is saved with the model. `fit_balanced` replaces it with the paper's
  "balanced hash": ids sorted by corpus frequency, each given to the currently least-loaded
  expert, which equalises the expected load.
"""
from __future__ import annotations

from typing import Optional

import torch

from moekit.routing.base import Router, Routing, check_no_top_k
from moekit.routing.pairs import check_token_input, no_drops
from moekit.validate import check_int

__all__ = ["HashRouter", "balanced_hash_table"]

_PRIME = 2_147_483_647      # 2^31 − 1; products a·id stay inside int64 for ids < 2^32


def balanced_hash_table(counts_V: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(V,) expert per id: greedy least-loaded assignment in order of descending frequency."""
    if counts_V.dim() != 1:
        raise ValueError(f"counts must be 1-D (V,), got shape {tuple(counts_V.shape)}")
    counts = counts_V.double().cpu()
    order = torch.argsort(counts, descending=True, stable=True)
    load = [0.0] * num_experts
    table = torch.empty(counts.numel(), dtype=torch.long)
    for i in order.tolist():
        e = min(range(num_experts), key=lambda j: (load[j], j))
        table[i] = e
        load[e] += float(counts[i])
    return table.to(counts_V.device)


class HashRouter(Router):
    """Route by a fixed hash of the token id; gate 1; no parameters.

    ``top_k`` is not used (one hash, one expert); an explicit ``top_k`` other than its own count is refused.
    """

    default_balance_loss = "none"

    def __init__(self, d_model: int, num_experts: int, top_k: Optional[int] = None, *,
                 vocab_size: Optional[int] = None, seed: int = 0):
        check_no_top_k("hash", top_k, 1)
        super().__init__(d_model, num_experts, None)
        check_int("vocab_size", vocab_size, min=1, allow_none=True)
        check_int("seed", seed)
        self.vocab_size, self.seed = vocab_size, int(seed)
        # Drawn on the CPU generator's device whatever the default device is (e.g. meta).
        g = torch.Generator().manual_seed(self.seed)
        self._a = int(torch.randint(1, _PRIME, (1,), generator=g, device="cpu"))
        self._b = int(torch.randint(0, _PRIME, (1,), generator=g, device="cpu"))
        table = None if vocab_size is None else torch.randint(0, num_experts, (vocab_size,), generator=g, device="cpu")
        self.register_buffer("table", table)

    @torch.no_grad()
    def fit_balanced(self, counts_V: torch.Tensor) -> None:
        """Replace the table by the frequency-balanced assignment for corpus counts (V,)."""
        if self.table is None:
            raise ValueError("fit_balanced needs a table: build the router with vocab_size=V")
        if counts_V.shape != self.table.shape:
            raise ValueError(f"counts must have shape ({self.vocab_size},), got {tuple(counts_V.shape)}")
        self.table.copy_(balanced_hash_table(counts_V, self.num_experts))

    def expert_of(self, token_ids_T: torch.Tensor) -> torch.Tensor:
        """(T,) expert of each token id."""
        ids = check_token_input("token_ids", token_ids_T, token_ids_T.shape[0], self.vocab_size)
        if self.table is not None:
            return self.table[ids]
        if ids.numel() and int(ids.max()) >= 2 ** 32:
            raise ValueError(f"token ids must be < 2**32 for the universal hash, got max {int(ids.max())}")
        return ((ids * self._a + self._b) % _PRIME) % self.num_experts

    def forward(self, x_TD, *, mask=None, token_ids=None) -> Routing:
        self.check_input(x_TD, mask)
        T = x_TD.shape[0]
        ids = check_token_input("token_ids", token_ids, T, self.vocab_size)
        topk_ids_T1 = self.expert_of(ids.to(x_TD.device)).unsqueeze(-1)
        expert_T = topk_ids_T1[:, 0]
        token_T = torch.arange(T, device=x_TD.device)
        if mask is not None:
            token_T, expert_T = token_T[mask], expert_T[mask]
        weights = torch.ones(token_T.numel(), dtype=torch.float32, device=x_TD.device)
        return Routing(token_ids=token_T, expert_ids=expert_T, weights=weights, logits=None,
                       dropped=no_drops(x_TD.device), num_experts=self.num_experts,
                       topk_ids=topk_ids_T1)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, vocab_size={self.vocab_size}, seed={self.seed}"
