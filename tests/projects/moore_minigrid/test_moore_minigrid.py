"""projects/moore_minigrid: the per-task summaries by hand, the torsos' parameter budget, the env
builder, and the --quick paths (multi-task and continual) on one method each."""
import math

import numpy as np
import pytest

from projects.moore_minigrid.run import METHODS, build_agent, main, mean_std

pytest.importorskip("gymnasium")


def test_mean_std_leaves_out_nan():
    # (the per-task window test moved to tests/test_rl.py with the code: moekit.models.rl.late_return(task=))
    assert mean_std([1.0, math.nan, 3.0]) == (2.0, math.sqrt(2.0))
    assert all(math.isnan(v) for v in mean_std([math.nan]))


def test_torsos_have_comparable_parameter_counts():
    tasks = ("MiniGrid-Empty-Random-5x5-v0", "MiniGrid-LavaGapS5-v0", "MiniGrid-DoorKey-5x5-v0")
    counts = {m: sum(p.numel() for p in build_agent(m, tasks).parameters()) for m in METHODS}
    assert abs(counts["shared"] - counts["moore"]) / counts["moore"] < 0.05
    assert max(counts.values()) < 1.6 * min(counts.values())      # hard routing: 3 experts, one per task


def test_task_envs_give_flat_views_and_task_ids():
    pytest.importorskip("minigrid")
    from projects.moore_minigrid.data import OBS_DIM, TASK_SETS, descriptions, make_task_envs
    envs = make_task_envs(TASK_SETS["MT3"], 2)
    obs, _ = envs.reset(seed=0)
    assert obs.shape == (6, OBS_DIM) and obs.dtype == np.float32 and 0 <= obs.min() and obs.max() <= 1.0
    assert envs.task_ids.tolist() == [0, 0, 1, 1, 2, 2] and envs.action_counts == [7, 7, 7]
    assert len(set(descriptions(TASK_SETS["MT3"]))) == 3
    with pytest.raises(ValueError, match="task names"):
        make_task_envs(["MiniGrid-Nope-v0"], 1)


def test_quick_multitask_run_of_one_method():
    pytest.importorskip("minigrid")
    res = main(["--quick", "--workers", "1", "--methods", "moore"])
    assert set(res) == {"moore"} and res["moore"]["params"] > 0 and res["moore"]["wall"][0] > 0


def test_quick_continual_run_of_one_method():
    pytest.importorskip("minigrid")
    res = main(["--quick", "--continual", "--workers", "1", "--methods", "shared", "--steps", "900",
                "--num-envs", "1", "--eval-episodes", "1"])
    s = res["shared"]
    assert s["R"].shape == (3, 3) and ((0 <= s["R"]) & (s["R"] <= 1)).all()
    assert not math.isnan(s["forgetting"][0]) and not math.isnan(s["transfer"][0])


def test_unknown_method_is_refused():
    with pytest.raises(SystemExit):
        main(["--quick", "--workers", "1", "--methods", "lstm"])
