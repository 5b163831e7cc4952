"""Pruning: layer-wise engine (with its layer conveyor and input statistics), masks, allocation and methods."""
