"""Failed solves are never silent: rate-limited [`ConvergenceWarning`][deqlab.solvers.ConvergenceWarning] for a DEQ layer.

Why rate-limited: early in training a DEQ routinely hits its step budget on every batch; a warning per
step would bury the log, and no warning at all would hide a model that never converges. A layer therefore
warns on the first unconverged forward (or backward) solve, then again when the count of failures reaches
10, 100, 1000, ... — each message says how many of how many solves failed so far, so the fraction is never
lost. The policy is per layer: ``on_unconverged="warn"`` (default), ``"ignore"``, or ``"raise"``
([`SolverError`][deqlab.solvers.SolverError] at the first failure). The standard ``warnings`` filters apply too
(``warnings.simplefilter("error", ConvergenceWarning)``).
"""

from __future__ import annotations

import threading
import warnings
from typing import Any, Callable, Dict, Literal, Optional

from deqlab.solvers.result import ConvergenceWarning, SolverError

__all__ = ["ConvergenceReporter", "UnconvergedPolicy"]

UnconvergedPolicy = Literal["warn", "ignore", "raise"]
_POLICIES = ("warn", "ignore", "raise")
# one lock for every reporter: counting is rare and tiny, and a lock attribute would make layers
# impossible to deepcopy or pickle
_LOCK = threading.Lock()


def check_policy(owner: str, policy: str) -> str:
    if policy not in _POLICIES:
        raise ValueError(f"{owner}: on_unconverged must be one of {', '.join(map(repr, _POLICIES))}, got {policy!r}")
    return policy


def user_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning point at the user's line: the first frame, outwards from the
    caller of `warnings.warn`, that is neither deqlab's nor torch's (a layer's forward runs inside
    ``nn.Module.__call__``, and a backward inside autograd, so a fixed level pointed at
    ``torch/nn/modules/module.py``). Frames of deqlab's and torch's packages and of Lightning are skipped.
    A function that passes the level on to a helper which calls `warnings.warn` itself (``warn_renamed``)
    adds 1 for the helper's frame. Where no frame is the user's (a CUDA backward on autograd's own thread),
    the level is 2.
    """
    import os
    import sys
    from types import FrameType

    import torch

    modules = [sys.modules["deqlab"], torch]
    modules += [sys.modules[name] for name in ("pytorch_lightning", "lightning") if name in sys.modules]
    files = [getattr(m, "__file__", None) for m in modules]
    skip = tuple(os.path.dirname(os.path.abspath(f)) + os.sep for f in files if f)
    frame: Optional[FrameType] = sys._getframe(1)
    level = 1  # warnings.warn(stacklevel=1) is the function calling warnings.warn: this one's caller
    while frame is not None:
        filename = os.path.abspath(frame.f_code.co_filename)
        if not filename.startswith(skip) and not frame.f_code.co_filename.startswith("<frozen"):
            return level
        frame = frame.f_back
        level += 1
    return 2


def _is_power_of_ten(n: int) -> bool:
    while n % 10 == 0 and n > 1:
        n //= 10
    return n == 1


class ConvergenceReporter:
    """Counts solves and failures per kind (``"forward"``, ``"backward"``) and reports failures by policy.

    Attributes:
        policy: ``"warn"``, ``"ignore"`` or ``"raise"``.
        solves: solves per kind, since construction (readable for logging).
        failures: unconverged solves per kind, since construction (readable for logging).
    """

    def __init__(self, owner: str, policy: UnconvergedPolicy = "warn"):
        self.owner = owner
        self.policy = check_policy(owner, policy)
        self.solves: Dict[str, int] = {"forward": 0, "backward": 0}
        self.failures: Dict[str, int] = {"forward": 0, "backward": 0}

    def record(
        self,
        kind: str,
        converged: bool,
        describe: Callable[[], str],
        *,
        result: Any = None,
        policy: Optional[str] = None,
        stacklevel: int = 3,
    ) -> None:
        """Count one solve; when it did not converge, warn (rate-limited), raise or stay quiet."""
        with _LOCK:
            self.solves[kind] = self.solves.get(kind, 0) + 1
            if converged:
                return
            self.failures[kind] = n = self.failures.get(kind, 0) + 1
            m = self.solves[kind]
        policy = self.policy if policy is None else policy
        if policy == "ignore":
            return
        message = (
            f"{self.owner}: the {kind} solve did not converge ({describe()}); {n} of {m} {kind} solves "
            f"of this layer unconverged so far"
        )
        if policy == "raise":
            raise SolverError(message, result)
        if _is_power_of_ten(n):
            # (``stacklevel`` is kept for callers; the warning points at the user's own line)
            warnings.warn(
                f"{message}. Warned at the 1st, 10th, 100th, ... failure; pass on_unconverged='ignore' "
                f"to the layer to silence this, or 'raise' to stop at the first one",
                ConvergenceWarning,
                stacklevel=user_stacklevel(),
            )
