"""The one home of deqlab's old names: each still works, warns ``DeprecationWarning`` naming the new one,
and will go in a later release.

Why one module: a renamed option or attribute must stay usable for a while (old scripts, old configs) but
never *silently*, and never reachable two ways without saying which one is current. Every old spelling is
funnelled through a function here, so finding them all (to remove them later) is one ``grep`` for
``deqlab._compat``. A leaf module: it imports nothing from deqlab, so any layer may use it.

Example:
    >>> import warnings
    >>> from deqlab._compat import renamed
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     renamed("ContinuousDEQSolver", "ode_abstol", None, "abstol", 1e-4)
    0.0001
    >>> str(caught[0].message)
    'ContinuousDEQSolver: abstol= is deprecated; use ode_abstol= (the same setting)'
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any, Dict, Optional, Tuple, TypeVar, overload

__all__ = ["renamed", "deprecated", "warn_renamed", "moved_attribute", "renamed_field"]

T = TypeVar("T")


def warn_renamed(owner: str, old: str, new: str, *, stacklevel: int = 3, why: str = "the same setting") -> None:
    """Warn that ``owner``'s ``old`` is deprecated in favour of ``new`` (``DeprecationWarning``)."""
    warnings.warn(f"{owner}: {old} is deprecated; use {new} ({why})", DeprecationWarning, stacklevel=stacklevel)


@overload
def renamed(owner: str, new: str, new_value: Optional[T], old: str, old_value: Optional[T], default: T) -> T: ...


@overload
def renamed(
    owner: str, new: str, new_value: Optional[T], old: str, old_value: Optional[T], default: None = None
) -> Optional[T]: ...


def renamed(
    owner: str, new: str, new_value: Optional[T], old: str, old_value: Optional[T], default: Optional[T] = None
) -> Optional[T]:
    """An option given under its name ``new`` or its deprecated name ``old``.

    ``None`` means "not given": the value is ``new_value``, else ``old_value`` (with a
    ``DeprecationWarning`` naming ``new``), else ``default``. Giving both names is ambiguous and raises.

    Raises:
        ValueError: both ``new_value`` and ``old_value`` are given.
    """
    if new_value is not None and old_value is not None:
        raise ValueError(f"{owner}: {old}= is the old name of {new}=; they are the same setting, pass only {new}=")
    if new_value is not None:
        return new_value
    if old_value is None:
        return default
    warn_renamed(owner, f"{old}=", f"{new}=", stacklevel=4)
    return old_value


def deprecated(owner: str, old: str, new: str, value: T, *, why: str = "the same setting") -> T:
    """``value``, after warning that ``owner.old`` is deprecated in favour of ``new`` (for properties and
    module attributes that are read under an old name)."""
    warn_renamed(owner, old, new, stacklevel=4, why=why)
    return value


def moved_attribute(module: str, name: str, moves: Dict[str, Tuple[str, str]]) -> Any:
    """For a module's ``__getattr__``: the object an old name ``module.name`` now lives at (``moves[name]``:
    ``(new module, new name)``), after a ``DeprecationWarning`` naming the new place.

    Why by import path: an old name may point *up* the layers (``deqlab.lightning.cli.main`` is now
    ``deqlab.cli.main``, the console command above the Lightning layer); resolving it here, only when the old
    name is read, keeps the layers' static imports one-way.

    Raises:
        AttributeError: ``name`` is not an old name of ``module`` (Python's usual error for a missing name).
    """
    if name not in moves:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    new_module, new_name = moves[name]
    warn_renamed(module, name, f"{new_module}.{new_name}", stacklevel=3, why="moved")
    return getattr(importlib.import_module(new_module), new_name)


def renamed_field(old: str, new: str, *, why: str = "the same value") -> Any:
    """Class decorator for a dataclass whose field ``old`` was renamed ``new``: the constructor still takes
    ``old=`` and the attribute ``obj.old`` still reads (and sets) ``obj.new``, each with a
    ``DeprecationWarning`` naming ``new``.

    Example:
        >>> import warnings
        >>> from dataclasses import dataclass
        >>> from deqlab._compat import renamed_field
        >>> @renamed_field("residual", "abs_residual")
        ... @dataclass
        ... class Record:
        ...     abs_residual: float
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     r = Record(residual=0.5)
        ...     value = r.residual
        >>> value, r.abs_residual, str(caught[0].message)
        (0.5, 0.5, 'Record: residual= is deprecated; use abs_residual= (the same value)')
    """
    import functools

    def decorate(cls: Any) -> Any:
        init = cls.__init__

        @functools.wraps(init)
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            if old in kwargs:
                value = kwargs.pop(old)
                if new in kwargs:
                    raise TypeError(f"{cls.__name__}: {old}= is the old name of {new}=; pass only {new}=")
                warn_renamed(cls.__name__, f"{old}=", f"{new}=", stacklevel=3, why=why)
                kwargs[new] = value
            init(self, *args, **kwargs)

        def getter(self: Any) -> Any:
            warn_renamed(cls.__name__, f".{old}", f".{new}", stacklevel=3, why=why)
            return getattr(self, new)

        def setter(self: Any, value: Any) -> None:
            warn_renamed(cls.__name__, f".{old}", f".{new}", stacklevel=3, why=why)
            setattr(self, new, value)

        cls.__init__ = __init__
        setattr(cls, old, property(getter, setter, doc=f"Deprecated old name of `{new}`."))
        return cls

    return decorate
