"""The typed experiment spec: what a model and its training are, as plain values, below every builder.

Why a spec: ``deqlab.models``, the zoo, the ``deqlab`` CLI's YAML and ``paper_repro`` describe the same
things (which model type, which solver and tolerances, which backward, which training settings). Each of
them reads these types instead of its own strings and keyword sets, so a setting has one name, one default
and one route from the command line to the solver. Lightning-free and torch-light: importing it builds
nothing.

* `DEQTrainingConfig` (and its partial form `DEQTrainingSettings`): optimisation, loss weights,
  pretraining, the non-finite policy and logging.
* `ModelKind` (`model_kind`): ``vanilla``, ``skip``, ``skip_reg`` and ``neural_ode`` as values, parsed in
  one place; every other module asks a kind what it is instead of comparing strings.
* `SolverSpec` and `BackwardSpec`: the forward solve and the implicit backward (built by
  `deqlab.models.build_solver` / `deqlab.models.build_backward`, the one builder of each).
* The architectures' own configs (`deqlab.models.mdeq.MDEQConfig`, `deqlab.models.mnist.DenseConfig`) hold
  the paper's defaults of each experiment once, and give their `SolverSpec` / `BackwardSpec`.
"""

from deqlab.spec.kinds import MODEL_TYPES, ModelKind, ModelType, model_kind
from deqlab.spec.solve import ODE_SOLVERS, PAPER_TOL, SOLVER_KINDS, BackwardSpec, ODESolverName, SolverKind, SolverSpec
from deqlab.spec.training import (
    DEQTrainingConfig,
    DEQTrainingSettings,
    NonFinitePolicy,
    OptimizerName,
    SchedulerName,
    TrainingArg,
)

__all__ = [
    "BackwardSpec",
    "DEQTrainingConfig",
    "DEQTrainingSettings",
    "MODEL_TYPES",
    "ModelKind",
    "ModelType",
    "NonFinitePolicy",
    "ODESolverName",
    "ODE_SOLVERS",
    "OptimizerName",
    "PAPER_TOL",
    "SOLVER_KINDS",
    "SchedulerName",
    "SolverKind",
    "SolverSpec",
    "TrainingArg",
    "model_kind",
]
