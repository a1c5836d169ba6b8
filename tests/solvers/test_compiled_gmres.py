"""``gmres(..., compile=...)`` / ``GMRES(compile=...)``: each Arnoldi step's algebra compiled, the products
eager. The compiled step works on full-size buffers with masks where the eager loop slices; these tests
hold the two together against a dense oracle: the same products, iterations and convergence, the same
solution up to rounding, with restarts, per-sample tolerances and half precision."""

from __future__ import annotations

import pytest
import torch

from deqlab.solvers import GMRES, gmres
from deqlab.solvers.compiled import compile_available

pytestmark = [
    pytest.mark.skipif(not compile_available(), reason="torch.compile is not available"),
    pytest.mark.usefixtures("fresh_dynamo"),
]


def _system(B=5, N=30, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    A = torch.eye(N, dtype=dtype) + 0.4 * torch.randn(B, N, N, generator=gen, dtype=dtype) / N**0.5
    b = torch.randn(B, N, generator=gen, dtype=dtype) * torch.linspace(0.1, 3.0, B, dtype=dtype)[:, None]
    b[1] = 0.0  # a trivial sample
    return (lambda v: torch.bmm(A.to(v.dtype), v.unsqueeze(2)).squeeze(2)), A, b


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "options",
    [
        dict(tol=1e-9, restart=30, max_restarts=1),  # one cycle to convergence
        dict(tol=1e-10, restart=4, max_restarts=8),  # restarts
        dict(tol=1e-12, restart=5, max_restarts=2),  # the budget ends first: unconverged samples
    ],
)
def test_compiled_arnoldi_equals_eager(options, dtype):
    matvec, A, b = _system(dtype=dtype)
    x_e, i_e = gmres(matvec, b, **options)
    x_c, i_c = gmres(matvec, b, compile="eager", **options)
    assert (i_c.matvecs, i_c.iterations) == (i_e.matvecs, i_e.iterations)
    assert torch.equal(i_c.converged, i_e.converged)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(x_c, x_e, rtol=tol, atol=tol)
    torch.testing.assert_close(i_c.residual, i_e.residual, rtol=1e-3, atol=tol)
    if dtype == torch.float64 and bool(i_e.converged.all()):  # and the dense oracle
        exact = torch.linalg.solve(A, b.unsqueeze(2)).squeeze(2)
        torch.testing.assert_close(x_c, exact, rtol=1e-7, atol=1e-9)


def test_per_sample_tolerances_and_half_precision():
    matvec, _, b = _system(dtype=torch.float64)
    tol = torch.tensor([1e-2, 1e-4, 1e-6, 1e-8, 1e-10], dtype=torch.float64)
    x_e, i_e = gmres(matvec, b, tol=tol, restart=30)
    x_c, i_c = gmres(matvec, b, tol=tol, restart=30, compile="eager")
    assert i_c.matvecs == i_e.matvecs and torch.equal(i_c.converged, i_e.converged)
    torch.testing.assert_close(x_c, x_e, rtol=1e-12, atol=1e-12)
    bh = b.to(torch.bfloat16)
    x_e, i_e = gmres(matvec, bh, tol=1e-2, restart=30)
    x_c, i_c = gmres(matvec, bh, tol=1e-2, restart=30, compile="eager")
    assert x_c.dtype == torch.bfloat16 and i_c.matvecs == i_e.matvecs
    torch.testing.assert_close(x_c.float(), x_e.float(), rtol=1e-2, atol=1e-2)


def test_the_gmres_object_passes_it_on_and_a_few_graphs_serve_every_step():
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()
    matvec, _, b = _system()
    solver = GMRES(tol=1e-10, max_steps=40, compile=counter)
    out = solver.solve(matvec, b)
    assert bool(out.converged.all()) and out.matvecs > 5
    # step 0 (and 1), then one graph with a symbolic step index for every later step: not one per step
    frames = counter.frame_count
    assert 1 < frames <= 3
    solver.solve(matvec, b)
    assert counter.frame_count == frames
    assert "compile=" in repr(solver)
    with pytest.raises(TypeError, match="compile must be"):
        GMRES(compile=3)
