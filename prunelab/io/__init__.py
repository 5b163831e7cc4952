"""File formats prunelab writes and reads back: keep-masks and pruned weights (``masks``), the
bitmask-compressed safetensors of a sparse model (``compressed``), sharded checkpoints written and
read shard by shard (``shards``), and the staging names every cache write goes through (``staging``)."""
