"""Learning-compression (LC) algorithm and its C steps (seed 002)."""
