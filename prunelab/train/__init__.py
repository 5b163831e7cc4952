"""Training a (pruned) model: masked full fine-tuning and LoRA, on text that is never evaluation text.

``train`` knows nothing of pruning methods: it receives keep-masks (parameter name → bool tensor)
and guarantees that a pruned weight stays exactly zero through every step (``masks.py``).
"""
