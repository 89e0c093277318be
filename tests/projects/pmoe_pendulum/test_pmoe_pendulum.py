"""projects/pmoe_pendulum: argument checks and the --quick path."""
import math

import pytest

from projects.pmoe_pendulum.run import main


def test_quick_run():
    pytest.importorskip("gymnasium")
    res = main(["--quick", "--workers", "1"])
    assert set(res) == {"gaussian", "pmoe_4"}
    assert all(-2000 < r["auc"] <= 0 and math.isfinite(r["final"]) for r in res.values())   # Pendulum returns ≤ 0


def test_one_expert_is_refused():
    with pytest.raises(SystemExit):
        main(["--quick", "--experts", "1"])
