"""Random routing: each token goes to K distinct experts drawn uniformly, gate 1/K.

Legend: T tokens, E experts, K experts per token.

The no-learning baseline of routing studies (e.g. Roller et al. 2021 compare hash routing
with it; Zuo et al. 2022, THOR, route randomly too). The router has no parameters.
In training every forward draws fresh experts; in eval (METHODS.md contract 8: randomness off)
the draw comes from a generator reseeded with ``seed`` at each call, so the same input gives
the same routing (it depends on the token's position only).
"""
from __future__ import annotations

import torch

from moekit.routing.base import TokenChoiceRouter
from moekit.validate import check_int

__all__ = ["RandomRouter"]


class RandomRouter(TokenChoiceRouter):
    default_balance_loss = "none"

    def __init__(self, d_model: int, num_experts: int, top_k: int = 1, *, seed: int = 0,
                 capacity_factor=None, eval_capacity_factor="same", drop_policy: str = "position"):
        super().__init__(d_model, num_experts, top_k, capacity_factor=capacity_factor,
                         eval_capacity_factor=eval_capacity_factor, drop_policy=drop_policy)
        self.seed = check_int("seed", seed)

    def set_capacity(self, capacity_factor, eval_capacity_factor="same", drop_policy: str = "position") -> None:
        if drop_policy == "reroute":
            raise ValueError("random routing has no preference order to re-route by; use 'position'")
        super().set_capacity(capacity_factor, eval_capacity_factor, drop_policy)

    def draw(self, num_tokens: int, device) -> torch.Tensor:
        """(T, K) distinct uniform experts per token (the first K of a random permutation)."""
        if self.training:
            u_TE = torch.rand(num_tokens, self.num_experts, device=device)
        else:
            g = torch.Generator(device="cpu").manual_seed(self.seed)
            u_TE = torch.rand(num_tokens, self.num_experts, generator=g).to(device)
        return u_TE.argsort(dim=-1)[:, : self.top_k]

    def forward(self, x_TD, *, mask=None):
        self.check_input(x_TD, mask)
        topk_ids_TK = self.draw(x_TD.shape[0], x_TD.device)
        weights_TK = torch.full(topk_ids_TK.shape, 1.0 / self.top_k, device=x_TD.device)
        return self.build_routing(None, None, topk_ids_TK, weights_TK, mask)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, seed={self.seed}"
