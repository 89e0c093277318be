"""MetaWorld MT10 (Yu et al. 2019, pip ``metaworld``) through gymnasium's vector API.

``gymnasium.make_vec("Meta-World/MT10", use_one_hot=True)`` gives one Sawyer-arm environment per
task (10 sub-environments, task ids 0–9 in the order of `MT10_TASKS`); each observation is the
39-feature MetaWorld state followed by the task's one-hot (49 features), actions are 4 numbers in
[−1, 1], episodes last 500 steps, and ``info["success"]`` says whether the task's goal is met.
Every reset draws one of the task's 50 goal positions. MuJoCo simulates headless (no rendering
is asked for). The descriptions are CARE's metadata, paraphrasing MetaWorld's task names.
"""
from __future__ import annotations

MT10_TASKS = ("reach-v3", "push-v3", "pick-place-v3", "door-open-v3", "drawer-open-v3", "drawer-close-v3",
              "button-press-topdown-v3", "peg-insert-side-v3", "window-open-v3", "window-close-v3")
DESCRIPTIONS = {
    "reach-v3": "reach a goal position with the gripper",
    "push-v3": "push the puck to a goal position",
    "pick-place-v3": "pick up the puck and place it at a goal position",
    "door-open-v3": "open a door with a revolving joint",
    "drawer-open-v3": "open a drawer by pulling its handle",
    "drawer-close-v3": "close a drawer by pushing it",
    "button-press-topdown-v3": "press a button from the top",
    "peg-insert-side-v3": "insert a peg sideways into a hole",
    "window-open-v3": "push and open a sliding window",
    "window-close-v3": "push and close a sliding window",
}
STATE_DIM, NUM_TASKS, ACTION_DIM = 39, 10, 4
OBS_DIM = STATE_DIM + NUM_TASKS


def make_mt10(seed: int):
    """The MT10 vector env (sync, next-step autoreset as moekit's loops expect), seeded."""
    import gymnasium as gym
    import metaworld  # noqa: F401  (registers the Meta-World/ environments)

    return gym.make_vec("Meta-World/MT10", vector_strategy="sync", seed=seed, use_one_hot=True,
                        autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP)


def descriptions() -> list[str]:
    return [DESCRIPTIONS[t] for t in MT10_TASKS]
