"""MNIST conv: the discrete solver stops by ``rel_deq_best`` (the paper's ``rel_norm`` is its continuous
solver's; with it L-Broyden returned diverged iterates as z* and the vanilla model stayed at chance), the
continuous one by ``rel_norm``; ``mode=`` alone sets both."""

from __future__ import annotations

import pytest

from deqlab.models import build_model


@pytest.mark.parametrize("solver, mode", [("discrete", "rel_deq_best"), ("continuous", "rel_norm")])
def test_each_solver_kind_has_its_mode(solver, mode):
    model = build_model("mnist", "conv", model_type="vanilla", solver=solver)
    assert model.deq.solver.termination.mode == mode


def test_mode_override_applies_to_both_and_discrete_mode_to_one():
    assert (
        build_model(
            "mnist", "conv", model_type="vanilla", solver="discrete", mode="abs_norm"
        ).deq.solver.termination.mode
        == "abs_norm"
    )
    assert (
        build_model(
            "mnist", "conv", model_type="vanilla", solver="discrete", discrete_mode="rel_norm"
        ).deq.solver.termination.mode
        == "rel_norm"
    )
    assert (
        build_model(
            "mnist", "conv", model_type="vanilla", solver="continuous", discrete_mode="abs_norm"
        ).deq.solver.termination.mode
        == "rel_norm"
    )
