"""The typed contracts between DEQ layers, initial guesses and the training loop.

* :class:`DEQLayer`: what :class:`~deqlab.lightning.DEQLightningModule` relies on to find and drive a
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
    """

    fixed_depth: int

    def fixed_depth_mode(self, depth: int) -> ContextManager:
        ...
