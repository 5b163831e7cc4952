"""Pruning: layer-wise engine, masks, allocation and methods."""
