"""Option checks shared by every solver: a bad option is a ``ValueError`` that names it and its range."""
from __future__ import annotations

import math
from typing import Optional, TypeVar

T = TypeVar("T")


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


def renamed(owner: str, new: str, new_value: Optional[T], old: str, old_value: Optional[T],
            default: Optional[T] = None) -> Optional[T]:
    """An option given under its name ``new`` or its old name ``old`` (kept so old code runs).

    The one helper for renamed options (``abstol`` → ``ode_abstol`` and the like): ``None`` means "not
    given", so the value is ``new_value``, else ``old_value``, else ``default``. Giving both names at once is
    ambiguous and raises ``ValueError`` naming both and the one to keep.
    """
    if new_value is not None and old_value is not None:
        raise ValueError(f"{owner}: {old}= is the old name of {new}=; they are the same setting, pass only {new}=")
    if new_value is not None:
        return new_value
    return default if old_value is None else old_value
