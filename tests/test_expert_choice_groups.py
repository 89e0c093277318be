"""Expert choice per group (METHODS.md G5): the batched selection over full groups equals the
group-by-group reference, on random scores, on tied scores and through the whole router."""
import pytest
import torch

from moekit.routing import ExpertChoiceRouter


@pytest.mark.parametrize("E,S,G,c", [(4, 16, 7, 0.25), (4, 16, 5, 1.0), (3, 5, 9, 0.7), (5, 1, 4, 1.0),
                                     (4, 97, 1, 2.0), (2, 8, 3, 2.0)])
def test_full_groups_fast_path_equals_the_reference(E, S, G, c):
    r = ExpertChoiceRouter(6, E, capacity_factor=c, group_size=S)
    g = torch.Generator().manual_seed(E * 1000 + S * 10 + G)
    for scores_ET in (torch.rand(E, S * G, generator=g),
                      torch.randint(0, 3, (E, S * G), generator=g).float() / 3):     # many ties
        fast = r.select_full_groups(scores_ET, S)
        ref = r.select_by_group_reference(scores_ET, S)
        assert torch.equal(fast, ref)
        assert fast.view(E, G, S).sum(-1).eq(r.tokens_per_expert_for(S)).all()


def test_router_routes_alike_on_both_paths():
    """With a mask the router takes the group-by-group loop; with an all-true mask its routing
    equals the fast path's (pairs, weights and per-expert counts)."""
    torch.manual_seed(0)
    r = ExpertChoiceRouter(8, 4, capacity_factor=0.5, group_size=16).train()
    x = torch.randn(16 * 6, 8)
    fast = r(x)
    mask = torch.ones(16 * 6, dtype=torch.bool)
    slow = r(x, mask=mask)                          # an all-true mask: the loop, same decisions
    for a, b in ((fast.token_ids, slow.token_ids), (fast.expert_ids, slow.expert_ids)):
        assert torch.equal(a, b)
    torch.testing.assert_close(fast.weights, slow.weights)
    assert fast.tokens_per_expert().tolist() == [2 * 6] * 4
