"""projects/softmoe_dqn_minatar/diagnose.py: the routing statistics on hand-made frames."""
import math

import torch

from projects.softmoe_dqn_minatar.diagnose import routing_stats
from projects.softmoe_dqn_minatar.run import METHODS


def _frames():
    f = torch.zeros(8, 10, 10, 4, dtype=torch.bool)
    f[:, 0, 0, 0] = True                                  # one object in the corner of every frame
    f[torch.arange(8), torch.arange(8) + 1, 5, 1] = True  # and one that moves down the middle column
    return f


def test_uniform_routing_is_maximal_entropy_and_erases_the_spread():
    torch.manual_seed(0)
    qnet = METHODS["softmoe_4"].build(obs_shape=(10, 10, 4), num_actions=3)
    with torch.no_grad():
        qnet.penultimate.phi_DS.zero_()                   # all logits 0: every slot the plain token mean
    s = routing_stats(qnet, _frames())
    assert abs(s["entropy_share"] - 1.0) < 1e-6
    assert s["spread"] < 1e-10                            # every output token the same vector
    # object tokens: conv outputs that differ from the background's; the dispatch mass equals their share
    x = _frames().float().permute(0, 3, 1, 2)
    tok = torch.relu(qnet.conv(x)).permute(0, 2, 3, 1).reshape(8, 64, -1)
    share = float(((tok - torch.relu(qnet.conv.bias)).abs().amax(-1) > 1e-6).float().mean())
    assert math.isclose(s["object_share"], share) and math.isclose(s["object_mass"], share, rel_tol=1e-5)
    assert 0 < share < 0.5


def test_sharper_routing_lowers_the_entropy_and_keeps_the_spread():
    torch.manual_seed(0)
    qnet = METHODS["softmoe_4"].build(obs_shape=(10, 10, 4), num_actions=3)
    base = routing_stats(qnet, _frames())
    with torch.no_grad():
        qnet.penultimate.phi_DS.mul_(50)
    sharp = routing_stats(qnet, _frames())
    assert sharp["entropy_share"] < base["entropy_share"] and sharp["spread"] > 100 * base["spread"]
