"""Branch-Train-MiX against Branch-Train-Merge, sparse upcycling and dense at matched compute, on three text domains."""
