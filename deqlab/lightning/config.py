"""Old home of the training settings, now `deqlab.spec.training`: each name here warns
``DeprecationWarning`` naming its new place (``from deqlab.spec import DEQTrainingConfig``)."""

from __future__ import annotations

from typing import Any

_MOVED = {
    name: ("deqlab.spec.training", name)
    for name in ("DEQTrainingConfig", "DEQTrainingSettings", "NonFinitePolicy", "TrainingArg")
}


def __getattr__(name: str) -> Any:
    from deqlab._compat import moved_attribute

    return moved_attribute(__name__, name, _MOVED)
