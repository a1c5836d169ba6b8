"""Nonlinear contraction ``z = tanh(W z + U x)`` on dense, image and multiscale (list) states."""

import pytest
import torch

from deqlab_solvers_helpers import ADAPTIVE, CONTINUOUS, DISCRETE, TanhMap, continuous, discrete, flat, ode_tol, rel_err

from deqlab.solvers import DiscreteDEQSolver, SolverStatus

B = 3
STRUCTURES = {
    "dense": ([(6,)], False),
    "image": ([(2, 3, 3)], False),
    "multiscale": ([(2, 4, 4), (3, 2, 2)], True),
}
# Termination tolerance and the accuracy each dtype can then promise.
TOLS = {torch.float64: (1e-10, 1e-8), torch.float32: (1e-5, 1e-4)}


def _check_structure(z, z0):
    if isinstance(z0, list):
        assert isinstance(z, list) and len(z) == len(z0)
        for a, b in zip(z, z0):
            assert a.shape == b.shape and a.dtype == b.dtype
    else:
        assert torch.is_tensor(z) and z.shape == z0.shape and z.dtype == z0.dtype


def _check_fz(f, res, tol):
    # res.fz must be f at the returned iterate (it is reconstructed as z + du inside the solver).
    fz_true = flat(f(res.z))
    torch.testing.assert_close(flat(res.fz), fz_true, rtol=0, atol=tol)
    _check_structure(res.fz, res.z)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("structure", list(STRUCTURES))
@pytest.mark.parametrize("name", DISCRETE)
def test_discrete_tanh(name, structure, dtype):
    shapes, as_list = STRUCTURES[structure]
    f = TanhMap(B, shapes, as_list=as_list, dtype=dtype, generator=torch.Generator().manual_seed(3))
    ref = f.picard()
    tol, acc = TOLS[dtype]
    z0 = f.zeros()
    res = discrete(name, tol, max_steps=200)(f, z0)
    assert res.status is SolverStatus.CONVERGED, res
    _check_structure(res.z, z0)
    z = flat(res.z)
    # The fixed-point equation itself holds at the returned state ...
    true_res = torch.linalg.vector_norm(flat(f(res.z)) - z, dim=1)
    assert (true_res <= 2 * tol).all(), true_res
    # ... and it is the unique fixed point (contraction 0.7: error <= residual / 0.3).
    assert rel_err(z.double(), ref).max() <= acc
    _check_fz(f, res, 10 * tol if dtype == torch.float64 else 1e-5)


@pytest.mark.parametrize("structure", list(STRUCTURES))
@pytest.mark.parametrize("method", CONTINUOUS)
def test_continuous_tanh(method, structure):
    shapes, as_list = STRUCTURES[structure]
    f = TanhMap(B, shapes, as_list=as_list, generator=torch.Generator().manual_seed(3))
    ref = f.picard()
    z0 = f.zeros()
    res = continuous(method, tol=1e-7, ode_tol=ode_tol(method, 1e-9, 1e-7))(f, z0)
    assert res.status is SolverStatus.CONVERGED, res
    _check_structure(res.z, z0)
    z = flat(res.z)
    assert (torch.linalg.vector_norm(flat(f(res.z)) - z, dim=1) <= 2e-7).all()
    assert rel_err(z, ref).max() <= 1e-6
    _check_fz(f, res, 1e-9)


@pytest.mark.parametrize("method", ADAPTIVE)
def test_continuous_tanh_float32(method):
    f = TanhMap(B, [(2, 3, 3)], as_list=False, dtype=torch.float32, generator=torch.Generator().manual_seed(5))
    z0 = f.zeros()
    res = continuous(method, tol=1e-5, ode_tol=1e-6)(f, z0)
    assert res.status is SolverStatus.CONVERGED, res
    _check_structure(res.z, z0)
    assert res.t.dtype == torch.float32
    assert rel_err(flat(res.z).double(), f.picard()).max() <= 1e-4


def test_all_algorithms_agree_on_the_fixed_point():
    f = TanhMap(4, [(5,), (2, 2)], as_list=True, generator=torch.Generator().manual_seed(11))
    sols = {}
    for name in DISCRETE:
        sols[name] = flat(discrete(name, 1e-11)(f, f.zeros()).z)
    for name in ("tsit5", "rk4"):
        sols[name] = flat(continuous(name, tol=1e-9, ode_tol=1e-10, max_steps=4000)(f, f.zeros()).z)
    ref = sols["fixed_point"]
    for name, z in sols.items():
        assert rel_err(z, ref).max() <= 1e-7, name


def test_inputs_are_not_modified():
    f = TanhMap(2, [(3,), (2, 2)], as_list=True, generator=torch.Generator().manual_seed(2))
    z0 = [torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 2, 2, dtype=torch.float64)]
    before = [t.clone() for t in z0]
    for name in DISCRETE:
        discrete(name, 1e-8)(f, z0)
    continuous("tsit5", 1e-6, 1e-7)(f, z0)
    for a, b in zip(z0, before):
        assert torch.equal(a, b)


def test_no_graph_and_a_far_start():
    # The solve runs without a graph even if z0 requires grad, and starts far away reach the same point.
    f = TanhMap(2, [(4,)], as_list=False, generator=torch.Generator().manual_seed(9))
    z0 = (10 * torch.randn(2, 4, dtype=torch.float64)).requires_grad_()
    res = discrete("anderson", 1e-11)(f, z0)
    assert not res.z.requires_grad
    assert rel_err(res.z, f.picard()).max() <= 1e-9


@pytest.mark.parametrize("name", DISCRETE)
def test_fz_is_f_of_z_also_mid_solve(name):
    # Stopped after 2 steps, far from the fixed point: res.fz must still be f at the returned z
    # (a converged result cannot tell f(z) from z).
    f = TanhMap(2, [(3,), (2, 2)], as_list=True, norm=0.9, generator=torch.Generator().manual_seed(8))
    z0 = f.unflat(torch.full((2, 7), 3.0, dtype=torch.float64))
    res = discrete(name, 1e-12, max_steps=2)(f, z0)
    assert res.status is SolverStatus.MAX_STEPS
    du = flat(f(res.z)) - flat(res.z)
    assert (torch.linalg.vector_norm(du, dim=1) > 1e-3).all()
    torch.testing.assert_close(flat(res.fz), flat(f(res.z)), rtol=0, atol=1e-12)
    torch.testing.assert_close(res.abs_residual, torch.linalg.vector_norm(du, dim=1), rtol=1e-10, atol=0)


def _tanh_systems(B, D=6, seed=0):
    """Per-sample ``f_i(z) = tanh(W_i z + b_i)`` with ``||W_i|| = 1.2`` (not a contraction: Newton's job)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(B, D, D, generator=g, dtype=torch.float64)
    W = 1.2 * W / torch.linalg.matrix_norm(W, ord=2).view(B, 1, 1)
    return W, torch.randn(B, D, generator=g, dtype=torch.float64)


def _tanh_map(W, b):
    return lambda z: torch.tanh(torch.bmm(W, z.unsqueeze(2)).squeeze(2) + b)


@pytest.mark.parametrize("neighbour", ["far_off", "nan"])
@pytest.mark.parametrize("line_search", [False, True])
def test_newton_krylov_sample_is_the_same_alone_and_in_a_batch(neighbour, line_search):
    # Old: the inner GMRES tolerance was the worst sample's forcing term (a NaN sample's included) and GMRES
    # iterated every sample until the last converged: sample 0 took 4 steps next to a far-off sample instead
    # of 3 alone, and next to a NaN sample its residual after one step was 0.089 instead of 0.159.
    W, b = _tanh_systems(3)
    z0 = torch.zeros(3, 6, dtype=torch.float64)
    if neighbour == "far_off":
        z0[2] = 10.0
        b[2] = 5 * b[2]
    else:
        b[1] = float("nan")
    solver = DiscreteDEQSolver(
        "newton_krylov", mode="abs_norm", abstol_termination=1e-7, max_steps=60, line_search=line_search
    )
    alone = solver(_tanh_map(W[:1], b[:1]), z0[:1])
    batch = solver(_tanh_map(W, b), z0)
    assert alone.status is SolverStatus.CONVERGED and bool(batch.converged[0])
    assert int(batch.sample_steps[0]) == int(alone.sample_steps[0]) == alone.steps
    torch.testing.assert_close(batch.z[:1], alone.z, rtol=0, atol=1e-13)
    torch.testing.assert_close(batch.trace[: alone.steps + 1, 0], alone.trace[:, 0], rtol=1e-9, atol=1e-15)
    if neighbour == "nan":
        assert batch.status is SolverStatus.NONFINITE and batch.sample_steps[1] == 0


def test_newton_krylov_per_sample_exit_is_exactly_the_full_batch():
    # The forcing terms are per sample, so dropping stopped samples changes nothing. Old: the worst sample's
    # forcing term changed when stopped samples left the working batch ("may differ slightly", said the
    # docstring): the returned iterates differed by 1e-9 here.
    from deqlab.solvers import PerSampleMap

    W, b = _tanh_systems(6, seed=3)
    b = b * torch.linspace(0.2, 3.0, 6, dtype=torch.float64).view(6, 1)
    f = PerSampleMap(lambda z, W_, b_: torch.tanh(torch.bmm(W_, z.unsqueeze(2)).squeeze(2) + b_), W, b)
    z0 = torch.zeros(6, 6, dtype=torch.float64)
    kw = dict(mode="abs_norm", abstol_termination=1e-5, max_steps=60, compact_below=1.0)
    full = DiscreteDEQSolver("newton_krylov", **kw)(f, z0)
    part = DiscreteDEQSolver("newton_krylov", per_sample_exit=True, **kw)(f, z0)
    assert full.all_converged and torch.equal(part.sample_steps, full.sample_steps)
    torch.testing.assert_close(part.z, full.z, rtol=0, atol=1e-13)
