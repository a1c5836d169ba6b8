"""One residual vocabulary: ``abs_residual`` and ``rel_residual`` by name, the stopping test's own objective
and its tolerance on the record, and the old name ``residual`` warning (issue 17)."""

import warnings

import pytest
import torch
from torch import nn

from deqlab.nn import DEQ
from deqlab.solvers import ContinuousDEQSolver, ConvergenceWarning, DiscreteDEQSolver

F64 = torch.float64


def _f(z):
    return 0.5 * z + 1.0


@pytest.mark.parametrize(
    "mode, which", [("rel_norm", "rel"), ("rel_deq_default", "rel"), ("abs_norm", "abs"), ("abs_deq_best", "abs")]
)
def test_the_objective_is_named_with_its_tolerance(mode, which):
    for solver in (
        DiscreteDEQSolver("anderson", mode=mode, abstol_termination=1e-6, reltol_termination=1e-6),
        ContinuousDEQSolver(
            "tsit5",
            mode=mode,
            abstol_termination=1e-6,
            reltol_termination=1e-6,
            ode_abstol=1e-8,
            ode_reltol=1e-8,
            max_steps=400,
        ),
    ):
        res = solver(_f, torch.zeros(3, 4, dtype=F64))
        z, fz = res.z, _f(res.z)
        abs_res = torch.linalg.vector_norm(fz - z, dim=1)
        torch.testing.assert_close(res.abs_residual, abs_res)
        torch.testing.assert_close(res.rel_residual, abs_res / torch.linalg.vector_norm(fz, dim=1), rtol=1e-6, atol=0)
        expected = res.rel_residual if which == "rel" else res.abs_residual
        torch.testing.assert_close(res.objective, expected)
        assert res.objective_name.startswith("relative residual" if which == "rel" else "absolute residual")
        assert res.tolerance == 1e-6 and bool((res.objective <= res.tolerance).all())


def test_the_old_name_residual_warns_and_reads_the_absolute_one():
    res = DiscreteDEQSolver("anderson")(_f, torch.zeros(2, 3, dtype=F64))
    with pytest.warns(DeprecationWarning, match=r"\.residual is deprecated; use \.abs_residual"):
        old = res.residual
    assert old is res.abs_residual

    class Half(nn.Module):
        def forward(self, z, x):
            return 0.5 * z + x

    _, sol = DEQ(Half(), DiscreteDEQSolver("anderson", mode="rel_norm"))(torch.ones(2, 3))
    with pytest.warns(DeprecationWarning, match="abs_residual"):
        assert sol.residual is sol.abs_residual
    fz = 0.5 * sol.z_star + 1.0
    torch.testing.assert_close(sol.rel_residual, sol.abs_residual / torch.linalg.vector_norm(fz, dim=1))


def test_the_warning_names_the_objective_and_its_tolerance():
    class Slow(nn.Module):
        def forward(self, z, x):
            return 0.999 * z + x

    layer = DEQ(Slow(), DiscreteDEQSolver("fixed_point", mode="rel_norm", reltol_termination=1e-4, max_steps=3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layer(torch.ones(2, 3))
    text = " ".join(str(w.message) for w in caught if issubclass(w.category, ConvergenceWarning))
    assert "max relative residual ||f(z) - z|| / ||f(z)||" in text and "tolerance 0.0001" in text, text


def test_convergence_warnings_point_at_the_users_line():
    # a layer's forward runs inside nn.Module.__call__ and its backward inside autograd: the warnings used to
    # point at torch/nn/modules/module.py
    class Stuck(nn.Module):
        def forward(self, z, x):
            return 1.0 * z + x

    layer = DEQ(Stuck(), DiscreteDEQSolver("fixed_point", max_steps=3))
    x = torch.ones(2, 3, requires_grad=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        z, _ = layer(x)
        z.sum().backward()
    where = {(w.filename, w.lineno) for w in caught if issubclass(w.category, ConvergenceWarning)}
    assert where and all(f == __file__ for f, _ in where), where
