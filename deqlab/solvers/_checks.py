"""Option checks shared by every solver: a bad option is a ``ValueError`` that names it and its range."""

from __future__ import annotations

import math
from typing import Any, Callable, TypeVar, cast

_Init = TypeVar("_Init", bound=Callable[..., None])


def check_number(
    owner: str,
    name: str,
    value: object,
    *,
    low: float,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """A finite real option in a range, else ``ValueError`` naming the option and the range."""
    if (
        not isinstance(value, (int, float))
        or isinstance(value, bool)
        or not math.isfinite(value)
        or not (value > low if low_open else value >= low)
        or not (value < high if high_open else value <= high)
    ):
        lo, hi = ("(" if low_open else "[") + f"{low:g}", f"{high:g}" + (")" if high_open or high == math.inf else "]")
        raise ValueError(f"{owner}: {name} must be a finite number in {lo}, {hi}, got {value!r}")
    return float(value)


def check_int(owner: str, name: str, value: object, *, low: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{owner}: {name} must be an int >= {low}, got {value!r}")
    return int(value)


def unknown_keyword(owner: str, name: str, valid: "list[str]", *, hint: str = "") -> TypeError:
    """The ``TypeError`` for a keyword ``owner`` does not take: names the closest valid one (did you mean) and
    every valid one, so a typo costs no lookup. ``hint`` adds a sentence (e.g. where a setting lives)."""
    import difflib

    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
    mean = f" (did you mean {close[0]!r}?)" if close else ""
    extra = f" {hint}" if hint else ""
    return TypeError(f"{owner} got an unexpected keyword argument {name!r}{mean}.{extra} Valid: {', '.join(valid)}")


def checked_keywords(init: _Init) -> _Init:
    """Decorate a constructor so an unknown keyword raises `unknown_keyword` (did you mean, every valid
    name) instead of Python's bare ``unexpected keyword argument``. The signature seen by ``inspect`` (and
    so by LightningCLI) is the constructor's own."""
    import functools
    import inspect

    params = inspect.signature(init).parameters
    valid = [p for p in params if p != "self"]
    owner = init.__qualname__.split(".")[0]

    @functools.wraps(init)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> None:
        for name in kwargs:
            if name not in params:
                raise unknown_keyword(
                    owner,
                    name,
                    valid,
                    hint=(
                        "A solver has two tolerances: abstol_termination and reltol_termination (or "
                        "termination=TerminationCondition(...)); the continuous solver also ode_abstol / ode_reltol."
                        if "tol" in name
                        else ""
                    ),
                )
        init(self, *args, **kwargs)

    return cast(_Init, wrapper)  # functools.wraps keeps the signature the type states
