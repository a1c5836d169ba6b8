"""The paper's model types as values: the one place a ``model_type`` string is read.

Why values: "vanilla", "skip", "skip_reg" and "neural_ode" decide several independent things (which
initial guess, whether there is a skip loss, whether the model has an explicit prediction, whether it is
a DEQ at all). Comparing the string in every module that cares spread the meaning of each type over ten
places; a `ModelKind` states it once, and code asks ``kind.learns_guess`` instead of
``model_type in ("skip", "skip_reg")``.

Example:
    >>> from deqlab.spec import model_kind
    >>> skip = model_kind("skip")
    >>> skip.is_deq, skip.shortcut, skip.learns_guess, skip.explicit
    (True, True, True, True)
    >>> model_kind("neural_ode").is_deq
    False
    >>> model_kind("skipreg")
    Traceback (most recent call last):
    ...
    ValueError: model_type must be one of 'vanilla', 'skip', 'skip_reg', 'neural_ode', got 'skipreg' (did you mean 'skip_reg'?)
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Dict, Literal, Tuple, Union

__all__ = ["MODEL_TYPES", "ModelKind", "ModelType", "model_kind", "VANILLA", "SKIP", "SKIP_REG", "NEURAL_ODE"]

ModelType = Literal["vanilla", "skip", "skip_reg", "neural_ode"]


@dataclass(frozen=True)
class ModelKind:
    """What one model type of the paper is.

    Attributes:
        name: ``vanilla``, ``skip``, ``skip_reg`` or ``neural_ode`` (how configs and tables spell it).
        is_deq: solves for a fixed point (``False`` for the neural-ODE baseline, integrated on
            ``t ∈ [0, 1]``: it has no solver to choose, no fixed point to regularize).
        shortcut: the initial guess is a learned predictor ``u0 = g(x)`` (Skip DEQ).
        map_guess: the initial guess is one application of the map, ``u0 = f(0, x)`` (Skip Reg. DEQ).
        learns_guess: the guess is trained by the skip loss (λ_skip applies).
        explicit: ``u0`` alone is a prediction (the paper's explicit accuracy).
    """

    name: str
    is_deq: bool = True
    shortcut: bool = False
    map_guess: bool = False

    @property
    def learns_guess(self) -> bool:
        """``True`` for Skip and Skip Reg.: their ``u0`` carries information that the skip loss trains."""
        return self.shortcut or self.map_guess

    @property
    def explicit(self) -> bool:
        """``True`` when ``head(u0)`` is a prediction worth logging (Skip, Skip Reg.)."""
        return self.learns_guess

    def __str__(self) -> str:
        return self.name


VANILLA = ModelKind("vanilla")
SKIP = ModelKind("skip", shortcut=True)
SKIP_REG = ModelKind("skip_reg", map_guess=True)
NEURAL_ODE = ModelKind("neural_ode", is_deq=False)

_KINDS: Dict[str, ModelKind] = {k.name: k for k in (VANILLA, SKIP, SKIP_REG, NEURAL_ODE)}
#: every model type's name, in the paper's order
MODEL_TYPES: Tuple[str, ...] = tuple(_KINDS)


def model_kind(name: Union[str, ModelKind], *, deq_only: bool = False) -> ModelKind:
    """The `ModelKind` named ``name`` (a kind is returned as it is).

    Args:
        name: a model type name or a `ModelKind`.
        deq_only: refuse ``neural_ode`` (for builders of a DEQ layer). Default ``False``.

    Returns:
        The kind.

    Raises:
        ValueError: ``name`` is not a model type (the message lists them and suggests the closest), or
            is ``neural_ode`` with ``deq_only``.
    """
    kind = name if isinstance(name, ModelKind) else _KINDS.get(name)
    if kind is None:
        close = difflib.get_close_matches(str(name), MODEL_TYPES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"model_type must be one of {', '.join(map(repr, MODEL_TYPES))}, got {name!r}{hint}")
    if deq_only and not kind.is_deq:
        valid = ", ".join(repr(k) for k in MODEL_TYPES if _KINDS[k].is_deq)
        raise ValueError(f"model_type must be one of {valid} for a DEQ layer, got {kind.name!r}")
    return kind
