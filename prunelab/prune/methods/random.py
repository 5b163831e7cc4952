"""Random pruning: a seeded random keep-mask, the control every method must beat."""

from __future__ import annotations

import torch

from prunelab.prune.masks import build_mask
from prunelab.prune.methods.base import InputStats, PruneResult, PruningMethod
from prunelab.prune.pattern import Pattern


class RandomPruning(PruningMethod):
    """Uniformly random scores, exact counts (per matrix; N:M: per group).

    One generator seeded with ``seed`` lives as long as the method object, so successive calls
    draw different masks (q_proj and o_proj of the same shape do not get the same one) and a new
    object with the same seed, called in the same order, reproduces them all. Scores are drawn on
    the CPU, so the masks do not depend on the device.
    """

    name = "random"

    def __init__(self, seed: int = 0):
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"method.params.seed={seed!r} must be an integer")
        super().__init__(seed=seed)
        self.generator = torch.Generator(device="cpu").manual_seed(seed)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state().tolist()}

    def load_state_dict(self, state: dict) -> None:
        if "generator" in state:
            self.generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))

    @torch.no_grad()
    def prune(self, weight: torch.Tensor, stats: InputStats | None, sparsity: float, pattern: Pattern,
              frozen: torch.Tensor | None = None) -> PruneResult:
        scores = torch.rand(weight.shape, generator=self.generator, dtype=torch.float32)
        frozen = None if frozen is None else frozen.cpu()
        mask = build_mask(scores, sparsity, pattern, per_row=False, frozen=frozen).to(weight.device)
        return PruneResult(weight=weight.masked_fill(~mask, 0), mask=mask)
