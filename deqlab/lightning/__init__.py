"""PyTorch Lightning integration: the DEQ training module, TensorBoard callbacks and the ``deqlab`` CLI.

The names below are imported on first use: ``from deqlab.lightning import DEQLightningModule`` imports
Lightning. The training settings it takes live below it, in the Lightning-free spec
(`deqlab.spec.DEQTrainingConfig`), so the paper models (`deqlab.models`) can name their fields. ``import deqlab``
alone never imports Lightning. Nothing here imports the model zoo (``deqlab.zoo``) or the paper networks:
the arrows run from the models to this package, never back.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the static view (type checkers, the API reference); at run time see __getattr__
    from deqlab.lightning._stats import StepRecord
    from deqlab.lightning.callbacks import ConvergenceFigure, NFEHistogram
    from deqlab.lightning.hparams import HParamsTab
    from deqlab.lightning.layers import find_deq_layers
    from deqlab.lightning.module import DEQLightningModule
    from deqlab.lightning.nonfinite import NonFiniteBatchError, NonFiniteBatchWarning, NonFiniteGuard
    from deqlab.lightning.policies import PolicyWarning
    from deqlab.lightning.pretraining import PretrainingSchedule
    from deqlab.lightning.resume import CheckpointIntegrity, ExactResume, ResumeWarning
    from deqlab.lightning.solver_stats import BackwardStats
    from deqlab.lightning.timing import PhaseTiming

__all__ = [
    "BackwardStats",
    "CheckpointIntegrity",
    "ConvergenceFigure",
    "DEQLightningModule",
    "ExactResume",
    "HParamsTab",
    "NFEHistogram",
    "NonFiniteBatchError",
    "NonFiniteBatchWarning",
    "NonFiniteGuard",
    "PhaseTiming",
    "PolicyWarning",
    "PretrainingSchedule",
    "ResumeWarning",
    "StepRecord",
    "find_deq_layers",
]

_HOME = {
    "BackwardStats": "deqlab.lightning.solver_stats",
    "CheckpointIntegrity": "deqlab.lightning.resume",
    "ConvergenceFigure": "deqlab.lightning.callbacks",
    "DEQLightningModule": "deqlab.lightning.module",
    "ExactResume": "deqlab.lightning.resume",
    "HParamsTab": "deqlab.lightning.hparams",
    "NFEHistogram": "deqlab.lightning.callbacks",
    "NonFiniteBatchError": "deqlab.lightning.nonfinite",
    "NonFiniteBatchWarning": "deqlab.lightning.nonfinite",
    "NonFiniteGuard": "deqlab.lightning.nonfinite",
    "PhaseTiming": "deqlab.lightning.timing",
    "PolicyWarning": "deqlab.lightning.policies",
    "PretrainingSchedule": "deqlab.lightning.pretraining",
    "ResumeWarning": "deqlab.lightning.resume",
    "StepRecord": "deqlab.lightning._stats",
    "find_deq_layers": "deqlab.lightning.layers",
}


#: names that moved out of this package (each warns ``DeprecationWarning`` naming its new home)
_MOVED = {"DEQTrainingConfig": ("deqlab.spec", "DEQTrainingConfig")}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        from deqlab._compat import moved_attribute

        return moved_attribute(__name__, name, _MOVED)
    home = _HOME.get(name)
    if home is None:
        if name.startswith("__"):
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        try:  # a submodule (deqlab.lightning.module, ...) not imported yet
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list:
    return sorted(set(globals()) | set(__all__))
