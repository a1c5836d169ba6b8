"""The typed contracts between DEQ layers, initial guesses and the training loop.

* [`DEQLayer`][deqlab.nn.DEQLayer]: what [`DEQLightningModule`][deqlab.lightning.DEQLightningModule] relies on to find and drive a
  DEQ layer (pretraining switches it to fixed depth, evaluation back to the solver). Any module, deqlab's
  or a researcher's, that has these members is driven the same way.
* [`GuessStrategy`][deqlab.nn.GuessStrategy]: what a DEQ layer calls on its ``init=`` object to get the initial
  state and the loss that trains it. [`InitialGuess`][deqlab.nn.InitialGuess] is the convenient base class that
  implements it; any object with the four members is accepted.
"""

from __future__ import annotations

from typing import Callable, ContextManager, Optional, Protocol, runtime_checkable

from torch import Tensor

from deqlab.state import State

__all__ = ["DEQLayer", "GuessStrategy"]


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


# ------------------------------------------------------------------------------------------------------
# The initial-guess contract
# ------------------------------------------------------------------------------------------------------


@runtime_checkable
class GuessStrategy(Protocol):
    """What a DEQ layer calls on its ``init=`` object: the initial state ``u0`` and the loss that trains it.

    Members (all four are called by the layer; [`InitialGuess`][deqlab.nn.InitialGuess] implements the last
    three as no-ops, so a subclass only writes ``forward``):
        __call__(x, f) -> u0: the initial state for the batch ``x``; ``f`` is the DEQ map ``z -> f(z, x)``
            for strategies that evaluate it. ``u0`` may carry gradients. An ``nn.Module``'s ``forward``
            provides it.
        start(u0) -> state: what the solver (or the fixed-depth unroll) starts from, e.g. ``u0.detach()``.
        skip_loss(u0, z_star) -> Tensor or None: the loss that trains the strategy, reported as
            ``solution.skip_loss`` (``None``: a zero scalar).
        observe(x, z_star): called after every forward, without gradient, with the detached fixed point.

    A structural type: a layer accepts any object with these members (``isinstance(obj, GuessStrategy)``
    checks that they exist); nothing needs to inherit from it. Make it an ``nn.Module`` when it has
    parameters or buffers, so they are registered with the layer, saved with it and moved by ``.to()``.

    Raises:
        TypeError: when instantiated (``GuessStrategy()``): a protocol describes strategies, it is not one.

    Example:
        An exponential moving average of past fixed points, written without deqlab's base class:

        >>> import torch
        >>> from torch import nn
        >>> from deqlab.nn import DEQ, GuessStrategy
        >>> from deqlab.solvers import DiscreteDEQSolver
        >>> class EMAGuess(nn.Module):
        ...     def __init__(self, width):
        ...         super().__init__()
        ...         self.register_buffer("mean", torch.zeros(width))
        ...     def forward(self, x, f):
        ...         return self.mean.expand(x.shape[0], -1).clone()
        ...     def start(self, u0):
        ...         return u0
        ...     def skip_loss(self, u0, z_star):
        ...         return None
        ...     def observe(self, x, z_star):
        ...         self.mean.mul_(0.9).add_(0.1 * z_star.mean(0))
        >>> class Half(nn.Module):
        ...     def forward(self, z, x):
        ...         return 0.5 * z + x
        >>> isinstance(EMAGuess(3), GuessStrategy), isinstance(nn.Linear(3, 3), GuessStrategy)
        (True, False)
        >>> deq = DEQ(Half(), DiscreteDEQSolver("anderson", mode="abs_norm", abstol_termination=1e-6),
        ...           init=EMAGuess(3))
        >>> _ = deq(torch.ones(2, 3))
        >>> [round(v, 4) for v in deq.init.mean.tolist()]   # 0.1 * z* = 0.1 * 2x
        [0.2, 0.2, 0.2]
    """

    def __call__(self, x: Tensor, f: Callable[[State], State]) -> State:
        """The initial state ``u0`` for the batch ``x`` (``f``: the DEQ map ``z -> f(z, x)``)."""
        ...

    def start(self, u0: State) -> State:
        """The state the solve starts from."""
        ...

    def skip_loss(self, u0: State, z_star: State) -> Optional[Tensor]:
        """The loss that trains the strategy, or ``None``."""
        ...

    def observe(self, x: Tensor, z_star: State) -> None:
        """Called after each forward with the detached fixed point."""
        ...
