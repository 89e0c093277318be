"""R5 (sigmoid vs softmax gating): the estimator's gates are the library's routers, the losses
vanish at the truth, least squares recovers the regression function, and --quick runs."""
import math

import torch

from moekit.routing import build_router
from projects.gating_sample_efficiency import run as R
from projects.gating_sample_efficiency.model import (
    Atoms,
    expert_error,
    fit_least_squares,
    function_error,
    gates,
    sample,
    true_atoms,
    voronoi_loss,
)


def _atoms(k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Atoms(*(torch.randn(k, dtype=torch.float64, generator=g) for _ in range(4)))


def test_closed_form_gates_equal_the_library_routers():
    atoms = _atoms()
    x = torch.linspace(-1, 1, 41, dtype=torch.float64)
    x2 = torch.stack([x, torch.ones_like(x)], 1)                     # (x, 1): the router's bias column
    w = torch.stack([atoms.beta1, atoms.beta0], 1)
    for gate, name, kw in (("sigmoid", "sigmoid", dict(renorm=False, bias_update_rate=0.0)),
                           ("softmax", "topk", dict(norm="raw"))):
        r = build_router(name, d_model=2, num_experts=3, top_k=3, **kw).double().eval()
        with torch.no_grad():
            r.weight.copy_(w)
            routing = r(x2)
        dense = torch.zeros(41, 3, dtype=torch.float64)
        dense[routing.token_ids, routing.expert_ids] = routing.weights.to(torch.float64)
        torch.testing.assert_close(dense, gates(x, atoms, gate), atol=1e-6, rtol=1e-6)


def test_losses_vanish_at_the_truth_and_grow_away_from_it():
    for gate in ("sigmoid", "softmax"):
        true = true_atoms(gate)
        assert voronoi_loss(true, true, gate) == 0.0 and expert_error(true, true) == 0.0
        assert function_error(true, true, gate, "gelu") == 0.0
        moved = Atoms(true.beta1 + 0.1, true.beta0, true.a, true.b)
        assert 0 < voronoi_loss(moved, true, gate) and function_error(moved, true, gate, "gelu") > 0


def test_voronoi_exponent_two_in_an_over_fitted_cell():
    true = true_atoms("sigmoid")
    eps = 1e-2
    rows = torch.cat([true.stack(), true.stack()[:1]])
    rows[0, 2] += eps
    rows[2, 2] -= eps                                                 # two atoms in cell 0, each eps away
    got = voronoi_loss(Atoms.from_rows(rows), true, "sigmoid")
    assert math.isclose(got, 2 * eps ** 2, rel_tol=1e-9)
    one = true.stack().clone()
    one[0, 2] += eps                                                  # one atom in the cell: exponent 1
    assert math.isclose(voronoi_loss(Atoms.from_rows(one), true, "sigmoid"), eps, rel_tol=1e-9)


def test_least_squares_recovers_the_regression_function():
    for gate in ("sigmoid", "softmax"):
        g = torch.Generator().manual_seed(3)
        x, y = sample(3000, gate, "gelu", generator=g)
        fit = fit_least_squares(x, y, 3, gate, "gelu", restarts=1, init_scale=0.1, generator=g, max_iter=100)
        assert fit.k == 3
        if gate == "softmax":
            assert float(fit.beta1[-1]) == 0.0 and float(fit.beta0[-1]) == 0.0
        assert function_error(fit, true_atoms(gate), gate, "gelu") < 0.02       # noise std 0.1, n = 3000


def test_loglog_slope_of_a_power_law():
    ns = [100, 1000, 10000]
    vals = [[3 * n ** -0.5 * f for f in (0.9, 1.1)] for n in ns]
    assert abs(R.loglog_slope(ns, vals) + 0.5) < 1e-9
    lo, hi = R.bootstrap_interval(ns, vals, reps=50)
    assert lo <= -0.5 + 1e-9 and hi >= -0.5 - 1e-9


def test_quick_run():
    out = R.main(["--quick"])
    s = out["summary"]
    assert set(s) == {f"{g}/gelu/{m}" for g in ("sigmoid", "softmax") for m in R.METRICS}
    assert all(math.isfinite(v["slope"]) for v in s.values())
    assert s["sigmoid/gelu/function"]["slope"] < 0 and s["softmax/gelu/function"]["slope"] < 0
