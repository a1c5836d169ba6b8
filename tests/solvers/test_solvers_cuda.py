"""The solvers on CUDA (skipped without a GPU): same answers as on the CPU, tensors stay on the device."""

import math

import pytest
import torch

from deqlab_solvers_helpers import CONTINUOUS, DISCRETE, FIXED_DT, AffineMap, TanhMap, flat, ode_tol, rel_err

from deqlab.solvers import ContinuousDEQSolver, DiscreteDEQSolver, SolverStatus, gmres

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
CUDA = torch.device("cuda")
F64 = torch.float64


def _on_cuda(res):
    for v in (res.abs_residual, res.rel_residual, res.converged, res.sample_steps):
        assert v.device.type == "cuda"
    for v in res.z if isinstance(res.z, list) else [res.z]:
        assert v.device.type == "cuda"


def _affine_cuda():
    f = AffineMap(3, 8, norm=0.9, generator=torch.Generator().manual_seed(1234))
    zs = f.solution().to(CUDA)
    f.A, f.b = f.A.to(CUDA), f.b.to(CUDA)
    return f, zs


@pytest.mark.parametrize("name", DISCRETE)
def test_cuda_discrete_affine(name):
    f, zs = _affine_cuda()
    res = DiscreteDEQSolver(name, mode="abs_norm", abstol_termination=1e-11, max_steps=400)(
        f, torch.zeros(3, 8, dtype=F64, device=CUDA)
    )
    assert res.status is SolverStatus.CONVERGED
    _on_cuda(res)
    assert rel_err(res.z, zs).max() <= 1e-8


@pytest.mark.parametrize("method", CONTINUOUS)
def test_cuda_continuous_affine(method):
    f, zs = _affine_cuda()
    tol = ode_tol(method, 1e-9, 1e-7)
    res = ContinuousDEQSolver(
        method,
        mode="abs_norm",
        ode_abstol=tol,
        ode_reltol=tol,
        abstol_termination=1e-7,
        max_steps=3000,
        dt=FIXED_DT.get(method),
    )(f, torch.zeros(3, 8, dtype=F64, device=CUDA))
    assert res.status is SolverStatus.CONVERGED
    _on_cuda(res)
    assert res.t.device.type == "cuda"
    assert rel_err(res.z, zs).max() <= 1e-6


@pytest.mark.parametrize("name", [*DISCRETE, "tsit5"])
def test_cuda_float32_multiscale_matches_cpu(name):
    def run(device):
        f = TanhMap(
            4, [(2, 4, 4), (3, 2, 2)], as_list=True, dtype=torch.float32, generator=torch.Generator().manual_seed(3)
        )
        f.W, f.inj = f.W.to(device), f.inj.to(device)
        z0 = [t.to(device) for t in f.zeros()]
        if name == "tsit5":
            solver = ContinuousDEQSolver(
                "tsit5", mode="abs_norm", ode_abstol=1e-6, ode_reltol=1e-6, abstol_termination=1e-5, max_steps=2000
            )
        else:
            solver = DiscreteDEQSolver(name, mode="abs_norm", abstol_termination=1e-5, max_steps=200)
        return solver(f, z0)

    gpu, cpu = run(CUDA), run(torch.device("cpu"))
    assert gpu.status is SolverStatus.CONVERGED and cpu.status is SolverStatus.CONVERGED
    _on_cuda(gpu)
    assert [t.dtype for t in gpu.z] == [torch.float32, torch.float32]
    assert rel_err(flat(gpu.z).cpu().double(), flat(cpu.z).double()).max() <= 1e-4


@pytest.mark.parametrize("name", DISCRETE)
def test_cuda_masks_and_nan(name):
    c = torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.5, 2.0]], dtype=F64, device=CUDA)
    z0 = torch.stack([c[0], c[1] + 50.0])
    res = DiscreteDEQSolver(name, mode="abs_norm", abstol_termination=1e-9, max_steps=200)(
        lambda z: 0.5 * (z - c) + c, z0
    )
    assert res.status is SolverStatus.CONVERGED
    assert torch.equal(res.z[0], c[0]) and int(res.sample_steps[0]) == 0

    def nan_map(z):
        out = 0.5 * z + 1.0
        return torch.where((z > 1.2).any(dim=1, keepdim=True), torch.full_like(out, math.nan), out)

    res = DiscreteDEQSolver(name, mode="abs_norm", abstol_termination=1e-9, max_steps=100)(
        nan_map, torch.zeros(2, 3, dtype=F64, device=CUDA)
    )
    assert res.status is SolverStatus.NONFINITE
    assert torch.isfinite(res.z).all()


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_cuda_gmres(dtype):
    g = torch.Generator().manual_seed(0)
    B, N = 3, 30
    R = torch.randn(B, N, N, dtype=F64, generator=g)
    A = 2 * torch.eye(N, dtype=F64) + 0.8 * R / torch.linalg.matrix_norm(R, ord=2).view(B, 1, 1)
    b = torch.randn(B, N, dtype=F64, generator=g)
    b[1] = 0
    Ad, bd = A.to(CUDA, dtype), b.to(CUDA, dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-11
    x, info = gmres(lambda v: torch.bmm(Ad, v.unsqueeze(2)).squeeze(2), bd, tol=tol, restart=4, max_restarts=200)
    assert x.device.type == "cuda" and x.dtype == dtype
    assert info.converged.all()
    assert torch.equal(x[1], torch.zeros_like(x[1]))
    ref = torch.linalg.solve(A, b)
    assert (x.cpu().double() - ref).abs().max() <= (1e-3 if dtype == torch.float32 else 1e-8)
    # Breakdown (rank-1 operator) keeps the small least-squares problems full rank for CUDA's driver.
    u = torch.tensor([[1.0, 2.0, -1.0]], dtype=dtype, device=CUDA)
    x, _ = gmres(lambda v: (v @ u.T) * u, 3.0 * u, tol=tol, restart=3)
    assert torch.isfinite(x).all()
    torch.testing.assert_close((x @ u.T) * u, 3.0 * u, rtol=1e-4, atol=1e-4)
