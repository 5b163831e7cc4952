"""File formats prunelab writes and reads back: keep-masks and pruned weights (``masks``), and the
bitmask-compressed safetensors of a sparse model (``compressed``)."""
