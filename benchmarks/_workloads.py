"""The maps and the data the benchmark scripts run on, in one module.

Why one module: the scripts used to import each other through ``sys.path`` (``backward.py`` took its maps
from ``solvers.py``) and each read MNIST its own way; now every script imports its workloads from here and
its helpers from ``_common.py``, and no benchmark script imports another one.

* :class:`Workload`, :func:`make_dense`, :func:`make_conv`, :data:`WORKLOADS` – the contractive dense and
  conv maps of ``solvers.py`` / ``backward.py`` (and the dense solver map of ``revision_ab.py``), built
  from a seed in float64 and cast, so every script and every revision sees the same numbers;
* :func:`relative_residual` – the per-sample criterion the solver benchmarks re-measure;
* :func:`per_sample_mlp` – the unevenly converging batch of ``per_sample_exit.py``;
* :func:`mnist_labelled` / :func:`mnist_images` – real MNIST images (with or without their labels) through
  deqlab's one loader (``deqlab.data.load_mnist_tensors``), or seeded noise of the same shape and scale when
  the files are not there, so a benchmark runs anywhere and says which it used.

Only torch is imported here at module level: ``revision_ab.py``'s worker imports this module next to old
revisions of deqlab, and deqlab's data modules cost seconds to import.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Tuple, Union

import torch
import torch.nn.functional as Fn


@dataclass
class Workload:
    """A map ``f(z, x)`` with its injection ``x`` and the state's shape (``z0 = 0``)."""

    name: str
    description: str
    f: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # f(z, x)
    x: torch.Tensor
    z_shape: tuple

    def closure(self) -> Callable[[torch.Tensor], torch.Tensor]:
        f, x = self.f, self.x
        return lambda z: f(z, x)

    def z0(self) -> torch.Tensor:
        return torch.zeros(self.z_shape, dtype=self.x.dtype, device=self.x.device)


def make_dense(device: torch.device, dtype: torch.dtype, seed: int, D: int = 256, B: int = 64) -> Workload:
    """f(z, x) = tanh(W z + U x + b) with ||W||_2 = 0.9 exactly (scaled by its largest singular value)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(D, D, generator=g, dtype=torch.float64) / math.sqrt(D)
    W = W * (0.9 / torch.linalg.matrix_norm(W, ord=2))
    U = torch.randn(D, D, generator=g, dtype=torch.float64) / math.sqrt(D)
    b = 0.1 * torch.randn(D, generator=g, dtype=torch.float64)
    x = torch.randn(B, D, generator=g, dtype=torch.float64)
    Wt, Ut = W.T.contiguous().to(device, dtype), U.T.contiguous().to(device, dtype)
    b, x = b.to(device, dtype), x.to(device, dtype)
    sigma = float(torch.linalg.matrix_norm(Wt.double(), ord=2))
    rho = float(torch.linalg.eigvals(W).abs().max())  # far below ||W||_2: W is far from normal

    def f(z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(torch.addmm(torch.addmm(b, x, Ut), z, Wt))

    return Workload(
        name="dense",
        description=(
            f"dense `tanh(W z + U x + b)`, D = {D}, B = {B}, W, U ~ N(0, 1/D), ‖W‖₂ = {sigma:.4f} "
            f"(spectral radius {rho:.3f})"
        ),
        f=f,
        x=x,
        z_shape=(B, D),
    )


def _conv_opnorm(w: torch.Tensor, hw: int, iters: int, g: torch.Generator) -> float:
    """Operator 2-norm of ``conv2d(., w, padding=1)`` on ``hw x hw`` maps (power iteration on A^T A)."""
    c = w.shape[1]
    v = torch.randn(1, c, hw, hw, generator=g, dtype=torch.float64)
    for _ in range(iters):
        v = v / v.norm()
        v = Fn.conv_transpose2d(Fn.conv2d(v, w, padding=1), w, padding=1)
    return float(v.norm().sqrt())


def make_conv(device: torch.device, dtype: torch.dtype, seed: int, C: int = 32, HW: int = 14, B: int = 32) -> Workload:
    """A residual-style conv DEQ cell, f(z, x) = tanh(conv3x3(z; W) + conv1x1(x; U) + b).

    The 3x3 kernel is ``identity tap + 0.3 * random`` (the shape of a residual branch folded into one
    conv), scaled so the convolution's operator 2-norm on 14x14 maps is 0.9 (power iteration, float64).
    tanh is 1-Lipschitz, so f is a contraction with constant <= 0.9; plain fixed-point iteration still
    needs ~20 steps to reach a relative residual of 1e-4.
    """
    g = torch.Generator().manual_seed(seed)
    W = torch.zeros(C, C, 3, 3, dtype=torch.float64)
    W[range(C), range(C), 1, 1] = 1.0
    W = W + 0.3 * torch.randn(C, C, 3, 3, generator=g, dtype=torch.float64) / math.sqrt(9 * C)
    W = W * (0.9 / _conv_opnorm(W, HW, 300, g))
    sigma = _conv_opnorm(W, HW, 300, g)
    U = torch.randn(C, C, 1, 1, generator=g, dtype=torch.float64) / math.sqrt(C)
    b = 0.1 * torch.randn(C, generator=g, dtype=torch.float64)
    x = 0.5 * torch.randn(B, C, HW, HW, generator=g, dtype=torch.float64)
    W, U, b, x = (t.to(device, dtype) for t in (W, U, b, x))

    def f(z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(Fn.conv2d(z, W, padding=1) + Fn.conv2d(x, U, b))

    return Workload(
        name="conv",
        description=(
            f"conv `tanh(conv3x3(z) + conv1x1(x) + b)`, {C} channels, {HW}×{HW}, B = {B}, "
            f"3×3 kernel = identity tap + 0.3·random, operator norm {sigma:.4f}"
        ),
        f=f,
        x=x,
        z_shape=(B, C, HW, HW),
    )


WORKLOADS = {"dense": make_dense, "conv": make_conv}


def relative_residual(f: Callable, z: torch.Tensor) -> torch.Tensor:
    """Per-sample ``||f(z) - z||_2 / ||f(z)||_2`` (float64 norms over each flattened sample)."""
    fz = f(z)
    d = (fz - z).flatten(1).double()
    return torch.linalg.vector_norm(d, dim=1) / torch.linalg.vector_norm(fz.flatten(1).double(), dim=1)


def per_sample_mlp(batch: int, width: int, hidden: int, device) -> Tuple[Callable, torch.Tensor]:
    """``f(z) = r * W2 tanh(W1 z) + inj`` with ``W2 W1`` orthogonal, so near z* the map contracts by about
    ``r`` in every direction and fixed-point iteration needs ~``log(tol) / log(r)`` steps: from a few
    (r = 0.2) to tens (r = 0.9) in one batch. Returns ``(PerSampleMap, z0)``."""
    from deqlab.solvers import PerSampleMap

    g = torch.Generator().manual_seed(0)
    A = torch.linalg.qr(torch.randn(hidden, width, generator=g))[0]  # (hidden, width), A^T A = I
    Q = torch.linalg.qr(torch.randn(width, width, generator=g))[0]  # orthogonal
    W1, W2 = A * 2.0, (Q @ A.T) / 2.0  # W2 W1 = Q
    x = 0.5 * torch.randn(batch, width, generator=g)
    rate = torch.linspace(0.2, 0.9, batch).view(batch, 1)
    W1, W2, x, rate = (t.to(device) for t in (W1, W2, x, rate))

    def fn(z, r, inj):
        return r * (torch.tanh(z @ W1.T) @ W2.T) + inj

    return PerSampleMap(fn, rate, x), torch.zeros(batch, width, device=device)


def mnist_labelled(
    data_dir: Optional[Union[str, Path]], split: str, n: int, *, normalize: bool = True, seed: int = 0
) -> Tuple[torch.Tensor, torch.Tensor, str]:
    """The first ``n`` MNIST images of ``split`` as ``(n, 1, 28, 28)`` float32, their int64 labels, and where
    they came from.

    Real digits from ``data_dir/MNIST/raw`` (``deqlab.data.load_mnist_tensors``, normalised like the data
    module unless ``normalize=False``); when the files are not there (or ``data_dir`` is empty), seeded noise
    of the same scale (Gaussian for normalised pixels, uniform on [0, 1] for raw ones) with seeded random
    labels, so a benchmark runs anywhere and says which it used.
    """
    if data_dir:
        from deqlab.data import load_mnist_tensors

        try:
            x, y = load_mnist_tensors(data_dir, split, normalize=normalize, limit=n)  # type: ignore[arg-type]
            return x, y, f"the first {len(x)} MNIST {split} images"
        except FileNotFoundError:
            pass
    g = torch.Generator().manual_seed(seed)
    if normalize:
        x, source = torch.randn(n, 1, 28, 28, generator=g), "Gaussian noise (MNIST not found)"
    else:
        x, source = torch.rand(n, 1, 28, 28, generator=g), "uniform noise on [0, 1] (MNIST not found)"
    return x, torch.randint(0, 10, (n,), generator=g), source


def mnist_images(
    data_dir: Optional[Union[str, Path]], split: str, n: int, *, normalize: bool = True, seed: int = 0
) -> Tuple[torch.Tensor, str]:
    """The first ``n`` MNIST images of ``split`` as ``(n, 1, 28, 28)`` float32, and where they came from
    (:func:`mnist_labelled` without the labels)."""
    x, _, source = mnist_labelled(data_dir, split, n, normalize=normalize, seed=seed)
    return x, source
