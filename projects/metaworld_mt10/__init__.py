"""MetaWorld MT10 with multi-task SAC: MOORE, CARE and a shared network (METHODS.md RL3, RL4)."""
