"""MiniGrid tasks for multi-task PPO: gymnasium vector envs of flattened 7×7×3 egocentric views.

MiniGrid (Chevalier-Boisvert et al. 2023, pip ``minigrid``) gives each task the agent's partial
view, a 7×7 grid of (object, colour, state) integer triples, and 7 discrete actions; MOORE's
official code feeds this view (``ImgObsWrapper``) to small CNNs. Here it is flattened to 147
features and divided by 10 (object ids are below 11), so the agent's torsos are MLPs.
Rewards are MiniGrid's: ``1 − 0.9 · steps / max_steps`` on success, 0 otherwise.

Each task also has a one-sentence description, the metadata CARE's context encoder embeds
(CARE uses MetaWorld's task descriptions; these paraphrase MiniGrid's own docs).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from moekit.models.rl import MultiTaskVecEnv, make_gym_vec_env

# MOORE's official MT3 is LavaGapS7 / RedBlueDoors-6x6 / MemoryS11 (run_minigrid_ppo_mt.py), trained for
# 200 k steps per task; this machine affords ~20 k per task per run, so the default set takes
# smaller versions of tasks of that family that PPO learns at that budget.
TASK_SETS = {
    "MT3": ("MiniGrid-Empty-Random-5x5-v0", "MiniGrid-LavaGapS5-v0", "MiniGrid-DoorKey-5x5-v0"),
    "MT3-paper": ("MiniGrid-LavaGapS7-v0", "MiniGrid-RedBlueDoors-6x6-v0", "MiniGrid-MemoryS11-v0"),
}
DESCRIPTIONS = {
    "MiniGrid-Empty-Random-5x5-v0": "reach the green goal square in an empty room",
    "MiniGrid-LavaGapS5-v0": "cross the gap in the wall of lava to reach the green goal without touching lava",
    "MiniGrid-DoorKey-5x5-v0": "pick up the key, open the locked door and reach the green goal",
    "MiniGrid-LavaGapS7-v0": "cross the gap in the wall of lava to reach the green goal without touching lava",
    "MiniGrid-RedBlueDoors-6x6-v0": "open the red door first and then open the blue door",
    "MiniGrid-MemoryS11-v0": "remember the object at the start and go to the matching object at the end of the hallway",
    "MiniGrid-DistShift1-v0": "reach the green goal while avoiding the strip of lava",
}
NUM_ACTIONS = 7
OBS_DIM = 7 * 7 * 3


def flat_view(env):
    """``ImgObsWrapper`` then a flat float32 view scaled by 1/10 (a gymnasium observation wrapper)."""
    import gymnasium as gym
    from minigrid.wrappers import ImgObsWrapper

    env = ImgObsWrapper(env)
    space = gym.spaces.Box(0.0, 25.5, (OBS_DIM,), np.float32)
    return gym.wrappers.TransformObservation(env, lambda o: o.reshape(-1).astype(np.float32) / 10.0, space)


def make_task_envs(names: Sequence[str], num_envs: int) -> MultiTaskVecEnv:
    """One `gymnasium.vector.SyncVectorEnv` of `num_envs` copies per task, side by side (task ids 0..L−1)."""
    unknown = [n for n in names if n not in DESCRIPTIONS]
    if unknown:
        raise ValueError(f"task names must be among {sorted(DESCRIPTIONS)}, got {unknown}")
    return MultiTaskVecEnv([make_gym_vec_env(n, num_envs, vectorization_mode="sync", wrappers=[flat_view])
                            for n in names])


def descriptions(names: Sequence[str]) -> list[str]:
    return [DESCRIPTIONS[n] for n in names]
