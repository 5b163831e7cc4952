"""prunelab: prune large language models and track the experiments."""

__version__ = "0.1.0"
