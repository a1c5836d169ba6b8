"""deqlab: Deep Equilibrium Networks (DEQ, Skip DEQ, Skip Reg. DEQ, continuous DEQ) for PyTorch.

``import deqlab`` never imports Lightning: the Lightning integration (``DEQLightningModule`` and the data
modules) is loaded on first attribute access, so solver and layer users do not pay its ~5 s import.
"""

from importlib import import_module
from typing import Any

from deqlab.nn import (
    DEQ,
    BackwardMode,
    DeepEquilibriumNetwork,
    DeepEquilibriumSolution,
    GuessStrategy,
    ImplicitBackward,
    InitialGuess,
    JacobianFreeBackward,
    MapGuess,
    MultiScaleDeepEquilibriumNetwork,
    MultiScaleNeuralODE,
    MultiScaleSkipDeepEquilibriumNetwork,
    NeumannPhantomGradient,
    PhantomGradient,
    ShortcutGuess,
    SkipDeepEquilibriumNetwork,
    SkipDEQ,
    ZeroGuess,
)
from deqlab.solvers import (
    GMRES,
    ContinuousDEQSolver,
    ConvergenceWarning,
    DiscreteDEQSolver,
    SolverError,
    SolverResult,
    SolverStatus,
    get_solver,
    register_solver,
)

__version__ = "0.1.0"

# name -> module that defines it; imported on first access (these modules import pytorch_lightning).
_LAZY = {
    "DEQLightningModule": "deqlab.lightning",
    "DEQTrainingConfig": "deqlab.lightning",
    "StepRecord": "deqlab.lightning",
    "NFEHistogram": "deqlab.lightning",
    "ConvergenceFigure": "deqlab.lightning",
    "DEQClassifier": "deqlab.zoo",
    "DigitsDEQ": "deqlab.zoo",
    "MNISTDenseDEQ": "deqlab.zoo",
    "DigitsDataModule": "deqlab.data",
    "MNISTDataModule": "deqlab.data",
    "SVHNDataModule": "deqlab.data",
    "CIFAR10DataModule": "deqlab.data",
    "ImageNetDataModule": "deqlab.data",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'deqlab' has no attribute {name!r}")


__all__ = [
    "BackwardMode",
    "ContinuousDEQSolver",
    "ConvergenceWarning",
    "DEQ",
    "DeepEquilibriumNetwork",
    "DeepEquilibriumSolution",
    "DiscreteDEQSolver",
    "GMRES",
    "ImplicitBackward",
    "InitialGuess",
    "GuessStrategy",
    "MapGuess",
    "ShortcutGuess",
    "ZeroGuess",
    "JacobianFreeBackward",
    "MultiScaleDeepEquilibriumNetwork",
    "MultiScaleNeuralODE",
    "MultiScaleSkipDeepEquilibriumNetwork",
    "PhantomGradient",
    "NeumannPhantomGradient",
    "SkipDEQ",
    "SkipDeepEquilibriumNetwork",
    "SolverError",
    "SolverResult",
    "SolverStatus",
    "get_solver",
    "register_solver",
    *_LAZY,
]
