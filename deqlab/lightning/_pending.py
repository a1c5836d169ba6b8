"""The training step between its forward and its optimizer step, as the callbacks that act after the backward
see it.

Why an object of its own: `DEQLightningModule`'s training step knows the step's solution records and holds
its training logs back until the batch is judged; the callbacks that run after ``loss.backward()``
(`NonFiniteGuard` judges the batch, `BackwardStats` reads the backward's NFE) need both. The module puts one
`PendingStep` on ``pl_module.pending_step`` per training step; that attribute is the whole interface, so a
callback works unchanged on any ``LightningModule`` (without the attribute it judges loss and gradients only).
"""

from __future__ import annotations

from typing import Callable, List, Optional

from deqlab.lightning._stats import StepRecord
from deqlab.nn.solution import DeepEquilibriumSolution

__all__ = ["PendingStep"]


class PendingStep:
    """One training step's record, solution records and held-back logs, until its batch is judged.

    Args:
        record: the step's [`StepRecord`][deqlab.lightning.StepRecord]; the callbacks fill its backward part
            and ``skipped``.
        solutions: the step's DEQ solution records (the backward fills their ``backward_nfe``).
        stand_in: the forward ran on a zero-filled copy of a non-finite input (`NonFiniteGuard.stand_in`), so
            its solver statistics describe the copy, not the data.
        awaits_verdict: whether something will judge the batch (a `NonFiniteGuard` is attached).
            ``False``: logs given to `when_trained` are written at once.

    Examples:
        >>> from deqlab.lightning._pending import PendingStep
        >>> from deqlab.lightning._stats import StepRecord
        >>> step = PendingStep(StepRecord("train", 0, 1.0, None, None, {}, None), [], awaits_verdict=True)
        >>> step.when_trained(lambda: print("logged"))
        >>> step.verdict(trained=True)
        logged
    """

    __slots__ = ("record", "solutions", "stand_in", "_held", "_trained")

    def __init__(
        self,
        record: StepRecord,
        solutions: List[DeepEquilibriumSolution],
        stand_in: bool = False,
        awaits_verdict: bool = False,
    ) -> None:
        self.record = record
        self.solutions = solutions
        self.stand_in = stand_in
        self._held: List[Callable[[], None]] = []
        self._trained: Optional[bool] = None if awaits_verdict else True

    def when_trained(self, emit: Callable[[], None]) -> None:
        """Run ``emit`` (a ``self.log`` call) once the batch is known to train: now if it was judged finite or
        nothing judges it, never if it was skipped, else when `verdict` says so."""
        if self._trained is None:
            self._held.append(emit)
        elif self._trained:
            emit()

    def verdict(self, trained: bool) -> None:
        """The batch's judgement (after its first backward; a later backward of the same step, under manual
        optimisation, changes nothing): write the held logs if it trains, drop them if it was skipped."""
        if self._trained is not None:
            return
        self._trained = trained
        held, self._held = self._held, []
        if trained:
            for emit in held:
                emit()
