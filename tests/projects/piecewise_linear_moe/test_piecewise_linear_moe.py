"""R3 (piecewise-linear regression): the data, the two gradient losses against the library's
HME likelihood, the partition metrics, and --quick."""
import math

import torch

from moekit.layers import HierarchicalMoE
from projects.piecewise_linear_moe import run as R
from projects.piecewise_linear_moe.data import BREAKPOINTS, NOISE, SLOPES_1D, make_data
from projects.piecewise_linear_moe.methods import gate_breakpoints, gd_loss, leaf_purity


def test_data_regimes_and_noise():
    d = make_data(20000, 1, generator=torch.Generator().manual_seed(0))
    a, b = torch.tensor(SLOPES_1D, dtype=torch.float64)[d.regime].unbind(-1)
    resid = d.y[:, 0] - (a * d.x[:, 0] + b)
    assert abs(float(resid.std()) - NOISE) < 2e-3
    edges = torch.tensor([-1.0, *BREAKPOINTS, 1.0], dtype=torch.float64)
    for r in range(4):
        xs = d.x[d.regime == r, 0]
        assert float(xs.min()) >= edges[r] and float(xs.max()) <= edges[r + 1]
    q = make_data(1000, 2, generator=torch.Generator().manual_seed(1))
    assert torch.equal(q.regime, (q.x[:, 0] > 0).long() * 2 + (q.x[:, 1] > 0).long())


def test_competitive_loss_is_the_unit_variance_mixture_nll_and_cooperative_is_the_mse():
    torch.manual_seed(0)
    m = HierarchicalMoE(d_model=1, d_out=1, branching=(4, 1)).double()       # log_var = 0: σ² = 1
    d = make_data(200, 1, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(gd_loss(m, d.x, d.y, "competitive", sigma=1.0) + 0.5 * math.log(2 * math.pi),
                               m.nll(d.x, d.y))
    torch.testing.assert_close(gd_loss(m, d.x, d.y, "cooperative"), (m(d.x) - d.y).square().mean())


def test_breakpoints_and_purity_of_a_known_gate():
    m = HierarchicalMoE(d_model=1, d_out=1, branching=(4, 1)).double()
    with torch.no_grad():                          # logits a_i x + b_i switch at −0.5, 0, 0.5
        m.top_gate.copy_(torch.tensor([[-30.0, 0.0], [-10.0, 10.0], [10.0, 10.0], [30.0, 0.0]]))
    got = torch.tensor(gate_breakpoints(m), dtype=torch.float64)
    torch.testing.assert_close(got, torch.tensor(BREAKPOINTS, dtype=torch.float64), atol=1e-3, rtol=0)
    d = make_data(1000, 1, generator=torch.Generator().manual_seed(3))
    assert leaf_purity(m.leaf_assignment(d.x), d.regime, 4) == 1.0
    merged = m.leaf_assignment(d.x).clamp(max=2)                            # regimes 2 and 3 share a leaf
    smaller = min(int((d.regime == 2).sum()), int((d.regime == 3).sum()))    # only one of them keeps it
    assert leaf_purity(merged, d.regime, 4) == (1000 - smaller) / 1000


def test_quick_run():
    out = R.main(["--quick"])
    assert out["em_max_decrease"] <= 1e-8                                     # EM never lowers the likelihood
    one = out["summary"]["1"]
    assert one["em_hme"]["mse"][0] < one["linear"]["mse"][0]
    assert set(one) == set(R.METHODS)
