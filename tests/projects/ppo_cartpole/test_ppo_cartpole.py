"""projects/ppo_cartpole: the learning-curve summary by hand, and the --quick path on one method."""
import math

import pytest

from projects.ppo_cartpole.run import METHODS, curve, main, mean_std


def test_curve_bins_episodes_by_the_step_they_finished():
    episodes = [(10, 0, 1.0), (50, 0, 3.0), (51, 0, 5.0), (60, 0, 7.0)]     # (env step, task, return)
    out = curve(episodes, steps=100, bins=4)           # bins (0, 25], (25, 50], (50, 75], (75, 100]
    assert out[:3] == [1.0, 3.0, 6.0] and math.isnan(out[3])
    assert mean_std([1.0, 3.0]) == (2.0, math.sqrt(2.0)) and mean_std([4.0]) == (4.0, 0.0)


def test_dense_twin_has_the_moe_active_size():
    moe, dense = METHODS["moe"], METHODS["dense"]
    assert dense.torso == "dense" and dense.d_hidden == moe.moe.top_k * moe.d_hidden


def test_quick_run_of_one_method():
    pytest.importorskip("gymnasium")
    res = main(["--quick", "--workers", "1", "--methods", "dense"])
    assert set(res) == {"dense"} and res["dense"]["final"] > 0 and res["dense"]["final_std"] == 0.0


def test_unknown_method_is_refused():
    with pytest.raises(SystemExit):
        main(["--quick", "--workers", "1", "--methods", "lstm"])
