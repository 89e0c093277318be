"""projects/softmoe_dqn_minatar: the method grid and the --quick path."""

import pytest

from projects.softmoe_dqn_minatar.run import METHODS, QUICK_METHODS, main


def test_method_grid_scales_dense_width_and_soft_moe_experts():
    dense = {m: c.width_mult for m, c in METHODS.items() if c.head == "dense"}
    soft = {m: c.num_experts for m, c in METHODS.items() if c.head == "soft_moe"}
    assert sorted(dense.values()) == [1, 2, 4, 8] and sorted(soft.values()) == [1, 2, 4, 8]
    assert all(c.slots_per_expert is None for c in METHODS.values())      # total slots = tokens
    assert METHODS["top1moe_8"].head == "moe" and METHODS["top1moe_8"].top_k == 1
    assert set(QUICK_METHODS) <= set(METHODS)


def test_quick_run_of_one_method():
    pytest.importorskip("gymnasium")
    pytest.importorskip("minatar")
    res = main(["--quick", "--workers", "1", "--methods", "dense_x1"])
    assert set(res) == {"dense_x1"} and res["dense_x1"]["final"] >= 0 and res["dense_x1"]["params"] > 0


def test_unknown_method_is_refused():
    with pytest.raises(SystemExit):
        main(["--quick", "--workers", "1", "--methods", "lstm"])
