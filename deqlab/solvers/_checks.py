"""Option checks shared by every solver: a bad option is a ``ValueError`` that names it and its range."""
from __future__ import annotations

import math


def check_number(owner: str, name: str, value: object, *, low: float, high: float = math.inf,
                 low_open: bool = False, high_open: bool = False) -> float:
    """A finite real option in a range, else ``ValueError`` naming the option and the range."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        lo, hi = ("(" if low_open else "[") + f"{low:g}", f"{high:g}" + (")" if high_open or high == math.inf else "]")
        raise ValueError(f"{owner}: {name} must be a finite number in {lo}, {hi}, got {value!r}")
    return float(value)


def check_int(owner: str, name: str, value: object, *, low: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{owner}: {name} must be an int >= {low}, got {value!r}")
    return int(value)
