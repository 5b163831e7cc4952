"""prunelab's Hydra plugins (``hydra_plugins`` is Hydra's namespace package for them)."""
