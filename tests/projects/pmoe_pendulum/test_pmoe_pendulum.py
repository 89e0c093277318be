"""projects/pmoe_pendulum: argument checks and the --quick path."""
import math

import pytest

from projects.pmoe_pendulum.run import main, mean_std


def test_mean_std():
    assert mean_std([1.0, 3.0]) == (2.0, math.sqrt(2.0)) and mean_std([4.0]) == (4.0, 0.0)


def test_quick_run():
    pytest.importorskip("gymnasium")
    res = main(["--quick", "--workers", "1"])
    assert set(res) == {"gaussian", "pmoe_4"}
    assert all(-2000 < r["auc"] <= 0 and math.isfinite(r["final"]) for r in res.values())   # Pendulum returns ≤ 0


def test_one_expert_is_refused():
    with pytest.raises(SystemExit):
        main(["--quick", "--experts", "1"])
