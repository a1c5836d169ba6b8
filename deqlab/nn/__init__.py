"""DEQ layers, implicit differentiation and building blocks (pure torch; never imports Lightning).

torchdyn is imported lazily by [`MultiScaleNeuralODE`][deqlab.nn.MultiScaleNeuralODE] only when it runs.
"""

from deqlab.nn.adapters import CallableSolver
from deqlab.nn.deq import (
    DEQ,
    DeepEquilibriumNetwork,
    MultiScaleDeepEquilibriumNetwork,
    MultiScaleMap,
    MultiScaleSkipDeepEquilibriumNetwork,
    SkipDeepEquilibriumNetwork,
    SkipDEQ,
)
from deqlab.nn.implicit import (
    BackwardMode,
    BackwardResult,
    EquilibriumProblem,
    ImplicitBackward,
    JacobianFreeBackward,
    Linearization,
    NeumannPhantomGradient,
    PhantomGradient,
)
from deqlab.nn.init import FunctionGuess, InitialGuess, MapGuess, ShortcutGuess, ZeroGuess
from deqlab.nn.layers import (
    DenseDEQBlock,
    Downsample,
    EquilibriumStateful,
    PostFuse,
    ResidualBlock,
    SpectralNorm,
    Upsample,
    VariationalHiddenDropout,
    WeightNorm,
    apply_norm,
)
from deqlab.nn.neural_ode import MultiScaleNeuralODE
from deqlab.nn.protocols import DEQLayer, GuessStrategy
from deqlab.nn.regularization import jacobian_frobenius_estimate
from deqlab.nn.reversible import ReversibleBackward
from deqlab.nn.solution import DeepEquilibriumSolution
from deqlab.nn.spectral import PowerIteration, power_iteration, spectral_radius
from deqlab.nn.trajectory import correction_weights, fixed_point_correction_loss

__all__ = [
    "DeepEquilibriumNetwork",
    "DEQ",
    "SkipDeepEquilibriumNetwork",
    "SkipDEQ",
    "MultiScaleMap",
    "MultiScaleDeepEquilibriumNetwork",
    "MultiScaleSkipDeepEquilibriumNetwork",
    "MultiScaleNeuralODE",
    "DeepEquilibriumSolution",
    "DEQLayer",
    "GuessStrategy",
    "InitialGuess",
    "ZeroGuess",
    "ShortcutGuess",
    "MapGuess",
    "FunctionGuess",
    "CallableSolver",
    "BackwardMode",
    "BackwardResult",
    "EquilibriumProblem",
    "Linearization",
    "ImplicitBackward",
    "JacobianFreeBackward",
    "PhantomGradient",
    "ReversibleBackward",
    "NeumannPhantomGradient",
    "jacobian_frobenius_estimate",
    "spectral_radius",
    "power_iteration",
    "PowerIteration",
    "fixed_point_correction_loss",
    "correction_weights",
    "EquilibriumStateful",
    "WeightNorm",
    "SpectralNorm",
    "apply_norm",
    "VariationalHiddenDropout",
    "DenseDEQBlock",
    "ResidualBlock",
    "Downsample",
    "Upsample",
    "PostFuse",
]
