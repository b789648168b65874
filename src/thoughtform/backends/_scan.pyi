"""Types of the compiled pass over a decode step's logits (``_scan.c``)."""

from typing import Any

def scan(x: Any, k: int, out: Any) -> tuple[float, float, float, int]:
    """``(max, sum exp(x - max), sum exp(x - max) * (x - max), count)``: ``out[:count]`` the
    ``k`` most likely ids, most likely first (``out`` None: the sums only)."""

def kernel() -> str:
    """``avx2`` or ``plain``: the code path chosen at import."""
