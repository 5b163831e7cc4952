"""Sparsity targets step by step: the closed forms the schedules follow.

- cubic (Zhu & Gupta 2017): s_t = s_f + (s_0 - s_f)(1 - t/n)^3, fast at first, gentle at the end;
- linear: s_t = s_0 + (s_f - s_0) t/n;
- constant fraction: s_t = 1 - (1 - s_f)^(t/n), the same share of the surviving weights each step
  (with s_0 = 0; the lottery rounds are this rule with a fixed rate);
- lottery rounds: s_r = 1 - (1 - p)^r after round r of pruning a fraction p of the survivors.
"""

from __future__ import annotations

KNOWN_RULES = ("cubic", "linear", "constant_fraction")


def _check(s0: float, sf: float, steps: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r} must be a positive integer")
    if not 0.0 <= s0 <= sf < 1.0:
        raise ValueError(f"need 0 <= initial sparsity ({s0}) <= final sparsity ({sf}) < 1")


def targets(rule: str, s0: float, sf: float, steps: int) -> list[float]:
    """Targets after steps 1..n (the last is ``sf``)."""
    _check(s0, sf, steps)
    if rule == "cubic":
        return [sf + (s0 - sf) * (1.0 - t / steps) ** 3 for t in range(1, steps + 1)]
    if rule == "linear":
        return [s0 + (sf - s0) * t / steps for t in range(1, steps + 1)]
    if rule == "constant_fraction":
        if s0 != 0.0:
            raise ValueError("the constant-fraction rule starts from a dense model (initial sparsity 0)")
        return [1.0 - (1.0 - sf) ** (t / steps) for t in range(1, steps + 1)]
    raise ValueError(f"rule={rule!r} is not known; allowed: {', '.join(KNOWN_RULES)}")


def lottery(rate: float, rounds: int) -> list[float]:
    """Sparsity after each of ``rounds`` rounds that prune ``rate`` of the surviving weights."""
    if not 0.0 < rate < 1.0:
        raise ValueError(f"rate={rate} must lie in (0, 1)")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds={rounds!r} must be a positive integer")
    return [1.0 - (1.0 - rate) ** r for r in range(1, rounds + 1)]
