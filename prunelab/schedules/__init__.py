"""Schedules: how pruning and training alternate over a run (one-shot, iterative, lottery tickets).

``sequences.py`` holds the closed forms of the sparsity targets; the drivers call the pruning engine
and the training loop, which know nothing of each other.
"""
