"""FixedPointLinearSolver states the budget that governs it: taken from a DiscreteDEQSolver's own cap,
given explicitly (and enforced) otherwise, refused when unknown; per-sample exit is refused up front."""

import pytest
import torch

from deqlab.solvers import ContinuousDEQSolver, DiscreteDEQSolver, FixedPointLinearSolver, TerminationCondition

M = torch.tensor([[0.99, 0.5], [0.0, 0.99]], dtype=torch.float64)  # slow contraction: budgets bind


def _solve(lin):
    return lin.solve(lambda v: v - v @ M.T, torch.tensor([[1.0, 1.0], [2.0, -1.0]], dtype=torch.float64))


@pytest.mark.parametrize("max_steps", [1, 5, 20])
def test_default_budget_of_a_discrete_solver_is_what_it_spends(max_steps):
    lin = FixedPointLinearSolver(
        DiscreteDEQSolver("fixed_point", mode="abs_norm", abstol_termination=1e-14, max_steps=max_steps)
    )
    out = _solve(lin)
    assert lin.max_steps == max_steps + 2 and out.matvecs == lin.max_steps  # reported = spent at the cap
    assert not out.all_converged


@pytest.mark.parametrize("budget", [1, 2, 7])
def test_explicit_budget_governs(budget):
    solver = DiscreteDEQSolver("anderson", mode="abs_norm", abstol_termination=1e-14, max_steps=100)
    lin = FixedPointLinearSolver(solver, max_steps=budget)
    out = _solve(lin)
    assert lin.max_steps == budget and out.matvecs == budget
    r = torch.tensor([[1.0, 1.0], [2.0, -1.0]], dtype=torch.float64) - (out.x - out.x @ M.T)
    torch.testing.assert_close(out.residual, r.norm(dim=1) / torch.tensor([2.0, 5.0]).sqrt().double())


def test_explicit_budget_makes_a_continuous_solver_usable():
    lin = FixedPointLinearSolver(ContinuousDEQSolver("tsit5", max_steps=5), max_steps=12)
    assert _solve(lin).matvecs <= 12


def test_unknown_budget_raises_instead_of_guessing():
    class Picard:  # a protocol solver without any step cap attribute
        termination = TerminationCondition("abs_norm", abstol=1e-8)

        def __call__(self, f, z0):
            return DiscreteDEQSolver("fixed_point", termination=self.termination, max_steps=10)(f, z0)

    with pytest.raises(ValueError, match="pass max_steps=N"):
        FixedPointLinearSolver(Picard())
    with pytest.raises(ValueError, match="pass max_steps=N"):
        FixedPointLinearSolver(ContinuousDEQSolver("tsit5"))  # its max_steps counts ODE steps, not products
    assert FixedPointLinearSolver(Picard(), max_steps=11).max_steps == 11
    with pytest.raises(ValueError, match="int >= 1"):
        FixedPointLinearSolver(Picard(), max_steps=0)


def test_per_sample_exit_is_refused_at_construction():
    with pytest.raises(ValueError, match="per-sample exit is not supported for linear .adjoint. solves"):
        FixedPointLinearSolver(DiscreteDEQSolver("anderson", per_sample_exit=True))
