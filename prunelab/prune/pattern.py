"""Sparsity patterns: unstructured or N:M (N zeros in every group of M consecutive inputs)."""

from __future__ import annotations

import re
from dataclasses import dataclass

_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class Pattern:
    """A sparsity pattern.

    ``n == m == 0`` means unstructured. Otherwise every group of ``m`` consecutive weights along
    the input dimension of a row holds at least ``n`` zeros (the field's "2:4" = 2 zeros of 4).
    """

    n: int = 0
    m: int = 0

    @property
    def is_nm(self) -> bool:
        return self.m > 0

    @property
    def sparsity(self) -> float | None:
        """The sparsity an N:M pattern implies, or None when unstructured."""
        return self.n / self.m if self.is_nm else None

    @classmethod
    def parse(cls, text: str) -> "Pattern":
        """Parse ``"unstructured"`` or ``"N:M"``; raise ValueError saying what is accepted."""
        text = str(text)
        if text.strip().lower() == "unstructured":
            return cls()
        match = _NM.match(text)
        if not match:
            raise ValueError(
                f"pattern={text!r} is not understood: use 'unstructured' or 'N:M' such as 2:4 or 4:8"
            )
        n, m = int(match.group(1)), int(match.group(2))
        if not 0 < n < m:
            raise ValueError(f"pattern={text!r}: N:M needs 0 < N < M (e.g. 2:4, 4:8)")
        return cls(n, m)

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else "unstructured"
