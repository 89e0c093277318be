"""MultiHash routing (Roller, Sukhbaatar, Szlam & Weston 2021, "Hash Layers For Large Sparse
Models") — METHODS.md G8.

Legend: T tokens, D model dim, H hashes (chunks per token), E experts, V vocabulary size.

The hidden vector of a token is split into H chunks of ``D / H``; chunk i goes to expert
``h_i(token_id)`` of its own independent hash, and the H outputs are concatenated. In the
`Routing` format a chunk is a row: with ``rows_are_chunks=True`` this router sends row r to
expert ``h_{r mod H}(id_r)`` with gate 1 — for rows ``t·H + i`` (chunk i of token t, the order
of ``x.view(T, H, D/H)``) that is hash i of token t. Without it (``MoE(router="multihash")`` on
whole tokens) every row uses the first hash: a plain hash router. `moekit.layers.MultiHashMoE`
does the split and the concatenation around a `moekit.MoE` of width ``D / H``.
No parameters; routing is a function of the token id only.

- ``vocab_size=None``: hash i is a seeded universal hash ``((a_i·id + b_i) mod P) mod E``;
- ``vocab_size=V``: H random tables ``(H, V)`` (a buffer, saved with the model).
With ``num_hashes=1`` it is `HashRouter`'s rule.
"""
from __future__ import annotations

from typing import Optional

import torch

from moekit.routing.base import Router, Routing, check_no_top_k
from moekit.routing.pairs import check_token_input, no_drops
from moekit.validate import check_bool, check_int

__all__ = ["MultiHashRouter"]

_PRIME = 2_147_483_647      # 2^31 − 1


class MultiHashRouter(Router):
    """H independent hashes of the token id, one per chunk row; gate 1; no parameters.

    rows_are_chunks: the input rows are chunk rows (row ``t·H + i`` is chunk i of token t) and
    ``token_ids`` has one id per row (the token's id repeated H times); `MultiHashMoE` builds
    it so. False (default): rows are whole tokens, all routed by hash 0.
    """

    default_balance_loss = "none"

    def __init__(self, d_model: int, num_experts: int, top_k: Optional[int] = None, *, num_hashes: int = 2,
                 vocab_size: Optional[int] = None, seed: int = 0, rows_are_chunks: bool = False):
        check_no_top_k("multihash", top_k, 1)
        super().__init__(d_model, num_experts, None)
        self.num_hashes = check_int("num_hashes", num_hashes, min=1)
        check_int("vocab_size", vocab_size, min=1, allow_none=True)
        check_int("seed", seed)
        self.vocab_size, self.seed = vocab_size, int(seed)
        self.rows_are_chunks = check_bool("rows_are_chunks", rows_are_chunks)
        g = torch.Generator().manual_seed(self.seed)
        self._a = torch.randint(1, _PRIME, (num_hashes,), generator=g, device="cpu").tolist()
        self._b = torch.randint(0, _PRIME, (num_hashes,), generator=g, device="cpu").tolist()
        table = None if vocab_size is None else \
            torch.randint(0, num_experts, (num_hashes, vocab_size), generator=g, device="cpu")
        self.register_buffer("table", table)

    def expert_of(self, token_ids_T: torch.Tensor, hash_index: int) -> torch.Tensor:
        """(T,) expert of each token id under hash `hash_index`."""
        check_int("hash_index", hash_index, min=0, max=self.num_hashes - 1)
        ids = check_token_input("token_ids", token_ids_T, token_ids_T.shape[0], self.vocab_size)
        if self.table is not None:
            return self.table[hash_index][ids.to(self.table.device)]
        if ids.numel() and int(ids.max()) >= 2 ** 32:
            raise ValueError(f"token ids must be < 2**32 for the universal hash, got max {int(ids.max())}")
        return ((ids * self._a[hash_index] + self._b[hash_index]) % _PRIME) % self.num_experts

    def forward(self, x_TD, *, mask=None, token_ids=None) -> Routing:
        self.check_input(x_TD, mask)
        R = x_TD.shape[0]
        H = self.num_hashes if self.rows_are_chunks else 1
        ids = check_token_input("token_ids", token_ids, R, self.vocab_size).to(x_TD.device)
        row_R = torch.arange(R, device=x_TD.device)
        expert_R = torch.zeros(R, dtype=torch.long, device=x_TD.device)
        for i in range(H):
            rows = row_R[i::H]
            expert_R[rows] = self.expert_of(ids[rows], i).to(x_TD.device)
        topk_ids_R1 = expert_R.unsqueeze(-1)
        if mask is not None:
            row_R, expert_R = row_R[mask], expert_R[mask]
        weights = torch.ones(row_R.numel(), dtype=torch.float32, device=x_TD.device)
        return Routing(token_ids=row_R, expert_ids=expert_R, weights=weights, logits=None,
                       dropped=no_drops(x_TD.device), num_experts=self.num_experts, topk_ids=topk_ids_R1)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, num_hashes={self.num_hashes}, vocab_size={self.vocab_size}, "
                f"seed={self.seed}, rows_are_chunks={self.rows_are_chunks}")
