"""Multi-task PPO on MiniGrid with MOORE, CARE and task-routed MoE torsos (METHODS.md RL3–RL5)."""
