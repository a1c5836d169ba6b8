"""Registry of named solvers, result records, and the import-weight promise of deqlab.solvers."""

import subprocess
import sys

import pytest
import torch

import deqlab.solvers as solvers
from deqlab.solvers import (
    Anderson,
    ContinuousDEQSolver,
    DiscreteDEQSolver,
    FixedPointAlgorithm,
    SolverResult,
    SolverStatus,
    available_solvers,
    get_solver,
    register_solver,
)
from deqlab.solvers import registry as registry_module

F64 = torch.float64


@pytest.fixture
def scratch_name():
    name = "test_solvers_registry_scratch"
    yield name
    registry_module._REGISTRY.pop(name, None)


def test_importing_solvers_does_not_import_lightning():
    code = (
        "import deqlab.solvers, sys; "
        "assert 'pytorch_lightning' not in sys.modules, 'pytorch_lightning imported'; "
        "assert 'lightning' not in sys.modules, 'lightning imported'; "
        "assert 'torchdyn' not in sys.modules, 'torchdyn imported eagerly'"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_public_api_is_exported():
    for name in solvers.__all__:
        assert hasattr(solvers, name), name


@pytest.mark.parametrize(
    "name,kind,algo",
    [
        ("fixed_point", DiscreteDEQSolver, "fixed_point"),
        ("anderson", DiscreteDEQSolver, "anderson"),
        ("broyden", DiscreteDEQSolver, "broyden"),
        ("lbroyden", DiscreteDEQSolver, "lbroyden"),
        ("newton_krylov", DiscreteDEQSolver, "newton_krylov"),
        ("continuous", ContinuousDEQSolver, "tsit5"),
        ("continuous_tsit5", ContinuousDEQSolver, "tsit5"),
        ("continuous_dopri5", ContinuousDEQSolver, "dopri5"),
        ("continuous_euler", ContinuousDEQSolver, "euler"),
        ("continuous_rk4", ContinuousDEQSolver, "rk4"),
    ],
)
def test_builtin_names(name, kind, algo):
    s = get_solver(name, max_steps=7)
    assert isinstance(s, kind) and s.max_steps == 7
    assert (s.algorithm.name if kind is DiscreteDEQSolver else s.ode_solver) == algo
    assert name in available_solvers()


def test_options_reach_the_algorithm_and_the_termination():
    s = get_solver("anderson", memory=2, mixing=0.5, mode="abs_norm", abstol_termination=1e-7, norm="rms")
    assert isinstance(s.algorithm, Anderson) and s.algorithm.memory == 2 and s.algorithm.mixing == 0.5
    assert s.termination.mode == "abs_norm" and s.termination.abstol == 1e-7 and s.termination.norm == "rms"
    c = get_solver("continuous", abstol=1e-5, reltol=1e-4)
    # continuous termination tolerances default to the ODE tolerances
    assert c.termination.abstol == 1e-5 and c.termination.reltol == 1e-4


def test_register_a_custom_solver(scratch_name):
    calls = []

    def factory(scale=0.5):
        def solve(f, z0):
            calls.append(scale)
            return DiscreteDEQSolver("fixed_point", mode="abs_norm", abstol_termination=1e-10)(f, z0)

        return solve

    register_solver(scratch_name, factory)
    assert scratch_name in available_solvers()
    res = get_solver(scratch_name, scale=0.25)(lambda z: 0.5 * z + 1, torch.zeros(2, 2, dtype=F64))
    assert calls == [0.25]
    torch.testing.assert_close(res.z, torch.full((2, 2), 2.0, dtype=F64), rtol=0, atol=1e-9)
    with pytest.raises(ValueError, match="already registered"):
        register_solver(scratch_name, factory)
    register_solver(scratch_name, lambda: "replaced", overwrite=True)
    assert get_solver(scratch_name) == "replaced"
    register_solver(scratch_name, factory, overwrite=True)
    with pytest.raises(TypeError, match="scale"):  # the error lists the factory's parameters
        get_solver(scratch_name, bogus=1)
    with pytest.raises(TypeError):
        register_solver("x", "not callable")
    with pytest.raises(ValueError):
        register_solver("", factory)


def test_algorithm_object_and_custom_algorithm():
    # An algorithm object can be passed directly; options then belong on the object.
    s = DiscreteDEQSolver(Anderson(memory=2), mode="abs_norm", abstol_termination=1e-10)
    assert s.algorithm.memory == 2
    with pytest.raises(TypeError):
        DiscreteDEQSolver(Anderson(), memory=3)

    class HalfStep(FixedPointAlgorithm):
        """z <- (z + f(z)) / 2, written against the public strategy interface."""

        name = "half"

        def step(self, state, z, fz, g, F):
            z_new = z + 0.5 * g
            return z_new, F(z_new), state

    res = DiscreteDEQSolver(HalfStep(), mode="abs_norm", abstol_termination=1e-10, max_steps=200)(
        lambda z: 0.5 * z + 1, torch.zeros(1, 3, dtype=F64)
    )
    assert res.all_converged
    torch.testing.assert_close(res.z, torch.full((1, 3), 2.0, dtype=F64), rtol=0, atol=1e-9)
    # (z + f(z)) / 2 contracts by 0.75: ||du_k|| = sqrt(3) 0.75^k
    k = 0
    while 3**0.5 * 0.75**k > 1e-10:
        k += 1
    assert res.steps == k and res.nfe == k + 1


def test_result_record():
    res = DiscreteDEQSolver("fixed_point", mode="abs_norm", abstol_termination=1e-3)(
        lambda z: 0.5 * z, torch.ones(2, 4, dtype=F64)
    )
    assert isinstance(res, SolverResult)
    assert res.status == "converged" and str(res.status.value) == "converged"  # a str enum
    assert res.all_converged
    stats = res.stats()
    assert set(stats) == {
        "nfe",
        "steps",
        "abs_residual_mean",
        "abs_residual_max",
        "rel_residual_mean",
        "rel_residual_max",
        "converged_fraction",
        "stalled_fraction",
    }
    assert stats["abs_residual_max"] == float(res.abs_residual.max()) <= 1e-3  # the one absolute measure
    assert stats["converged_fraction"] == 1.0 and stats["stalled_fraction"] == 0.0 and stats["nfe"] == res.nfe
    # rel_residual = ||f(z) - z|| / ||f(z)||: here f(z) = z/2, so |du| = |f(z)| and the ratio is 1.
    torch.testing.assert_close(res.rel_residual, torch.ones(2, dtype=F64))
    assert res.trace.shape == (res.steps + 1, 2)
    assert res.t is None
    no_trace = DiscreteDEQSolver("fixed_point", keep_trace=False)(lambda z: 0.5 * z, torch.ones(2, 4, dtype=F64))
    assert no_trace.trace is None
    assert SolverStatus("max_steps") is SolverStatus.MAX_STEPS
    assert "DiscreteDEQSolver" in repr(DiscreteDEQSolver("anderson"))
    assert "ContinuousDEQSolver" in repr(ContinuousDEQSolver())


def test_reversible_is_registered():
    from deqlab.solvers import ReversibleSolver

    s = get_solver("reversible", beta=0.5, max_steps=7)
    assert isinstance(s, ReversibleSolver) and s.beta == 0.5 and s.max_steps == 7
    assert "reversible" in available_solvers()
    with pytest.raises(TypeError, match="beta"):  # an unknown option lists the valid ones
        get_solver("reversible", bta=0.5)
