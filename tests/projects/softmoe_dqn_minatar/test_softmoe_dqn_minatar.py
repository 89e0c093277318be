"""projects/softmoe_dqn_minatar: the method grid, the curve summary, and the --quick path."""
import math

import pytest

from projects.softmoe_dqn_minatar.run import METHODS, QUICK_METHODS, curve, main, mean_std


def test_method_grid_scales_dense_width_and_soft_moe_experts():
    dense = {m: c.width_mult for m, c in METHODS.items() if c.head == "dense"}
    soft = {m: c.num_experts for m, c in METHODS.items() if c.head == "soft_moe"}
    assert sorted(dense.values()) == [1, 2, 4, 8] and sorted(soft.values()) == [1, 2, 4, 8]
    assert all(c.slots_per_expert is None for c in METHODS.values())      # total slots = tokens
    assert METHODS["top1moe_8"].head == "moe" and METHODS["top1moe_8"].top_k == 1
    assert set(QUICK_METHODS) <= set(METHODS)


def test_curve_bins_episodes_by_the_step_they_finished():
    episodes = [(10, 0, 1.0), (50, 0, 3.0), (51, 0, 5.0), (60, 0, 7.0)]
    out = curve(episodes, steps=100, bins=4)
    assert out[:3] == [1.0, 3.0, 6.0] and math.isnan(out[3])
    assert mean_std([1.0, 3.0]) == (2.0, math.sqrt(2.0))


def test_quick_run_of_one_method():
    pytest.importorskip("gymnasium")
    pytest.importorskip("minatar")
    res = main(["--quick", "--workers", "1", "--methods", "dense_x1"])
    assert set(res) == {"dense_x1"} and res["dense_x1"]["final"] >= 0 and res["dense_x1"]["params"] > 0


def test_unknown_method_is_refused():
    with pytest.raises(SystemExit):
        main(["--quick", "--workers", "1", "--methods", "lstm"])
