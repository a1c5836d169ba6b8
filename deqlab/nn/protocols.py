"""The typed contracts between DEQ layers, initial guesses and the training loop.

* [`DEQLayer`][deqlab.nn.DEQLayer]: what [`DEQLightningModule`][deqlab.lightning.DEQLightningModule] relies on to find and drive a
  DEQ layer (pretraining switches it to fixed depth, evaluation back to the solver). Any module, deqlab's
  or a researcher's, that has these members is driven the same way.
"""
from __future__ import annotations

from typing import ContextManager, Protocol, runtime_checkable

__all__ = ["DEQLayer"]


@runtime_checkable
class DEQLayer(Protocol):
    """A module whose forward returns ``(z_star, DeepEquilibriumSolution)``.

    Members:
        fixed_depth: ``0`` solves for the fixed point; ``d > 0`` runs ``d`` unrolled applications of
            the map with ordinary backprop (the paper's pretraining). Settable.
        fixed_depth_mode(depth): a context manager that sets ``fixed_depth`` and restores it on exit.
        jacobian_regularization: whether the forward computes the Hutchinson Jacobian term
            (``solution.jacobian_loss``). Read-only for the trainer: ``jacobian_loss_weight > 0`` on a
            model none of whose layers says ``True`` stops ``fit`` (the term would silently be 0).

    The record of a solve comes back from ``forward`` (``z_star, solution = layer(x)``), not as a member:
    a member would hold the last batch's record (and its graph) after the step, and would be shared by
    every call of a layer used twice in one forward. A layer that wraps another DEQ layer is one DEQ layer
    to the trainer: it drives the inner one from its own ``fixed_depth_mode`` and reports its flag.

    It is a structural type: check a module against it with ``isinstance``; nothing needs to inherit from it.

    Raises:
        TypeError: when instantiated (``DEQLayer()``): a protocol describes layers, it is not one.

    Example:
        >>> from torch import nn
        >>> from deqlab.nn import DEQ, DEQLayer
        >>> from deqlab.solvers import DiscreteDEQSolver
        >>> class Half(nn.Module):
        ...     def forward(self, z, x):
        ...         return 0.5 * z + x
        >>> isinstance(DEQ(Half(), DiscreteDEQSolver("anderson")), DEQLayer)
        True
        >>> isinstance(nn.Linear(2, 2), DEQLayer)   # no fixed_depth / fixed_depth_mode
        False
    """

    fixed_depth: int
    jacobian_regularization: bool

    def fixed_depth_mode(self, depth: int) -> ContextManager:
        """A context manager that runs the layer as ``depth`` unrolled applications of its map, then
        restores the previous mode."""
        ...
