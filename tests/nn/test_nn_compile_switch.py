"""``DeepEquilibriumNetwork(compile=...)``: the one switch that hands ``compile=`` down to the forward solver,
and the solver-spec route (``SolverSpec.compile`` / ``compile_solver`` of the paper configs) that sets it
on the solvers the model builders make."""

from __future__ import annotations

import warnings

import pytest
import torch

from deqlab.models import build_model
from deqlab.nn import DEQ, DenseDEQBlock, ZeroGuess
from deqlab.solvers import ContinuousDEQSolver, DiscreteDEQSolver, ReversibleSolver
from deqlab.solvers.compiled import CompileFallbackWarning, compile_available
from deqlab.spec import SolverSpec

pytestmark = [
    pytest.mark.skipif(not compile_available(), reason="torch.compile is not available"),
    pytest.mark.usefixtures("fresh_dynamo"),
]


def _layer(solver, **kw):
    torch.manual_seed(0)
    return DEQ(DenseDEQBlock(8, injection_dim=4).double(), solver, init=ZeroGuess(shape=(8,)), **kw)


@pytest.mark.parametrize(
    "solver",
    [
        DiscreteDEQSolver("anderson", mode="rel_norm", reltol_termination=1e-8, max_steps=60),
        ContinuousDEQSolver("tsit5", mode="rel_norm", reltol_termination=1e-7, ode_abstol=1e-8, ode_reltol=1e-8),
    ],
)
def test_the_layer_switch_compiles_the_forward_and_changes_nothing_else(solver):
    from torch._dynamo.testing import CompileCounter

    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    eager_layer = _layer(solver)
    z_e, sol_e = eager_layer(x)
    z_e.square().sum().backward()
    g_e, x.grad = x.grad.clone(), None

    counter = CompileCounter()
    layer = _layer(solver, compile=counter)
    z_c, sol_c = layer(x)
    z_c.square().sum().backward()
    # the forward solve's step and the backward's Arnoldi steps (step 0, then a symbolic step) ran compiled
    frames = counter.frame_count
    assert frames in (2, 3)
    assert layer._backward_mode().linear_solver(1e-3).compile is counter and layer.backward.compile is False
    assert solver.compile is False  # the caller's solver is untouched
    assert sol_c.nfe == sol_e.nfe and sol_c.solver_result.status == sol_e.solver_result.status
    torch.testing.assert_close(z_c, z_e, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, g_e, rtol=1e-10, atol=1e-12)  # the implicit backward as before
    z_c, _ = layer(x)
    z_c.sum().backward()
    assert counter.frame_count == frames  # the copies are made once and their graphs reused
    assert "compile=" in repr(layer)
    assert layer.compile.__func__ is torch.nn.Module.compile  # the switch does not shadow nn.Module.compile


def test_a_setting_changed_on_the_solver_after_the_first_forward_applies():
    # the layer solves with a copy of its solver: a stale copy would silently keep the old budget
    solver = DiscreteDEQSolver("anderson", mode="rel_norm", reltol_termination=1e-10, max_steps=60)
    layer = _layer(solver, compile="eager")
    x = torch.randn(3, 4, dtype=torch.float64)
    _, first = layer(x)
    assert first.nfe > 5
    solver.max_steps = 2
    with pytest.warns(Warning, match="did not converge"):
        _, second = layer(x)
    assert second.nfe <= 3 and second.solver_result.steps == 2


def test_a_solver_without_a_compiled_iteration_warns_once_and_solves():
    layer = _layer(ReversibleSolver(beta=0.5, max_steps=40), compile=True)
    from deqlab.nn import ReversibleBackward

    layer.backward = ReversibleBackward()
    x = torch.randn(3, 4, dtype=torch.float64)
    with pytest.warns(CompileFallbackWarning, match="ReversibleSolver has no compiled iteration"):
        layer(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompileFallbackWarning)
        layer(x)


def test_the_spec_route_builds_compiling_solvers():
    from deqlab.zoo import build_solver

    assert build_solver(SolverSpec(kind="continuous", compile=True)).compile is True
    assert build_solver("anderson", compile=True).compile is True
    assert build_solver("tsit5").compile is False
    net = build_model("mnist", "dense", model_type="vanilla", solver="continuous", compile_solver=True)
    assert net.deq.solver.compile is True and net.deq.backward.compile is True
    assert build_model("mnist", "dense", model_type="vanilla", solver="discrete").deq.backward.compile is False
    with pytest.raises(ValueError, match="compile must be True or False"):
        SolverSpec(compile="yes")


def test_implicit_backward_compiles_gmres_and_the_discrete_fixed_point_adjoints():
    from deqlab.nn import ImplicitBackward
    from deqlab.solvers import GMRES

    assert ImplicitBackward(compile="eager").linear_solver(1e-4).compile == "eager"
    inner = ImplicitBackward("anderson", compile="eager").linear_solver(1e-4).solver
    assert inner.compile == "eager" and inner.compile_map is False  # the VJPs stay outside the graph
    with pytest.raises(ValueError, match="applies to 'gmres', 'fixed_point'"):
        ImplicitBackward("newton_krylov", compile=True)
    with pytest.raises(ValueError, match="compile given together with a solver object"):
        ImplicitBackward(GMRES(), compile=True)


def test_the_paper_configs_pass_check_every_and_cuda_graphs_to_the_solver():
    from deqlab.models import build_model
    from deqlab.spec import SolverSpec
    from deqlab.zoo import build_solver

    spec = SolverSpec(kind="continuous", compile=True, check_every=4, cuda_graphs=True)
    solver = build_solver(spec)
    assert (solver.compile, solver.check_every, solver.cuda_graphs) == (True, 4, True)
    assert build_solver("anderson", check_every=3).check_every == 3
    assert build_solver("anderson").cuda_graphs is False
    net = build_model("mnist", "dense", model_type="vanilla", solver="discrete", solver_check_every=2, cuda_graphs=True)
    assert (net.deq.solver.check_every, net.deq.solver.cuda_graphs) == (2, True)
    with pytest.raises(ValueError, match="check_every must be an int >= 1"):
        SolverSpec(check_every=0)
    with pytest.raises(ValueError, match="cuda_graphs must be True or False"):
        SolverSpec(cuda_graphs=1)
