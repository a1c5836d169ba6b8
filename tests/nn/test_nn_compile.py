"""Compiled DEQ maps: ``model.deq.model.compile(fullgraph=True)`` inside an eager solver loop.

Why: the map is where a DEQ spends its time, and ``torch.compile`` of the map (not of the solver loop) is
the cheap way to fuse its kernels. These tests pin down that (a) the paper's maps trace as one graph (no
graph breaks: ``fullgraph=True`` would raise), (b) a compiled map changes nothing in the results (logits,
NFE, gradients through the implicit backward) against the eager map — an independent oracle here, since
the eager path is the one tested against closed forms elsewhere, and (c) later solves reuse the compiled
graphs (no recompilation per solver iteration or per step).

``aot_eager`` compiles through dynamo and AOTAutograd without a C++ toolchain, so it checks the tracing and
the compiled backward cheaply; the ``inductor`` test (real kernels) runs only with ``DEQLAB_INDUCTOR_TESTS=1`` (it
compiles C++ kernels, minutes on a loaded 2-core machine) and is skipped when the backend cannot compile.
"""

from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch

from deqlab.nn import DenseDEQBlock

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _compile_available(backend: str) -> bool:
    try:
        import torch._dynamo

        fn = torch.compile(lambda a: torch.relu(a) + 1.0, backend=backend, fullgraph=True)
        fn(torch.randn(3))
        return True
    except Exception:  # no dynamo for this Python, no C++ compiler for inductor, ...
        return False


def _require(backend: str) -> None:
    if not _compile_available(backend):
        pytest.skip(f"torch.compile with backend={backend!r} is unavailable here")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    import torch._dynamo

    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _dense_model(model_type: str = "skip"):
    from deqlab.models import build_model

    torch.manual_seed(0)
    model = build_model("mnist", "dense", model_type=model_type, solver="discrete", width=16, in_features=36, tol=1e-4)
    model.deq.reporter.policy = "ignore"
    return model


def _run(model, x, y):
    model.zero_grad(set_to_none=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logits, sol = model(x)
        loss = torch.nn.functional.cross_entropy(logits, y) + sol.skip_loss
        loss.backward()
    grads = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
    return logits.detach(), sol, grads


def _assert_same(eager, compiled, rtol):
    (l1, s1, g1), (l2, s2, g2) = eager, compiled
    torch.testing.assert_close(l2, l1, rtol=rtol, atol=rtol)
    assert s1.nfe == s2.nfe
    assert s1.backward_nfe == s2.backward_nfe
    for a, b in zip(g1, g2):
        scale = max(float(a.abs().max()), 1e-12)
        assert float((a - b).abs().max()) <= rtol * scale * 10 + 1e-7


def test_dense_map_traces_as_one_graph():
    _require("eager")
    block = DenseDEQBlock(16, injection_dim=16)
    explanation = torch._dynamo.explain(block)(torch.randn(4, 16), torch.randn(4, 16))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize("model_type", ["vanilla", "skip", "skip_reg"])
def test_dense_compiled_map_matches_eager(model_type):
    _require("aot_eager")
    eager = _dense_model(model_type)
    compiled = copy.deepcopy(eager)
    compiled.deq.model.compile(fullgraph=True, backend="aot_eager")
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 1, 6, 6, generator=g), torch.randint(0, 10, (8,), generator=g)
    _assert_same(_run(eager, x, y), _run(compiled, x, y), rtol=1e-5)


def test_compiled_map_does_not_recompile_across_steps():
    _require("aot_eager")
    from torch._dynamo.utils import counters

    model = _dense_model("skip")
    model.deq.model.compile(fullgraph=True, backend="aot_eager")
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(8, 1, 6, 6, generator=g), torch.randint(0, 10, (8,), generator=g)
    _run(model, x, y)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1
    for _ in range(2):  # new steps, new solves, many solver iterations: no new graphs
        _run(model, x + 0.1 * torch.randn_like(x), y)
    assert counters["stats"]["unique_graphs"] == graphs


def _tiny_mdeq(model_type: str):
    from deqlab.models import build_model

    torch.manual_seed(0)
    model = build_model(
        "cifar10",
        "small",
        model_type=model_type,
        solver="discrete",
        num_channels=(4, 4),
        head_channels=(2, 2),
        final_channels=8,
        expansion=2,
        image_size=8,
        dropout=0.0,
        shortcut_expansion=2,
        tol=1e-3,
        max_steps=12,
    )
    model.deq.reporter.policy = "ignore"
    return model


@pytest.mark.slow
def test_mdeq_block_traces_and_compiled_matches_eager():
    _require("aot_eager")
    eager = _tiny_mdeq("skip")
    mp = eager.deq.model
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        xs = eager.stem(x)
    explanation = torch._dynamo.explain(mp)([torch.zeros(4, 4, 8, 8), torch.zeros(4, 4, 4, 4)], xs)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()
    compiled = copy.deepcopy(eager)
    compiled.deq.model.compile(fullgraph=True, backend="aot_eager")
    y = torch.randint(0, 10, (4,))
    _assert_same(_run(eager, x, y), _run(compiled, x, y), rtol=1e-4)


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("DEQLAB_INDUCTOR_TESTS"),
    reason="inductor compiles C++ kernels (~2.5 min on 2 loaded cores); set DEQLAB_INDUCTOR_TESTS=1",
)
def test_dense_inductor_compiled_map_matches_eager():
    _require("inductor")
    eager = _dense_model("skip")
    compiled = copy.deepcopy(eager)
    compiled.deq.model.compile(fullgraph=True)  # default backend: inductor kernels
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(8, 1, 6, 6, generator=g), torch.randint(0, 10, (8,), generator=g)
    _assert_same(_run(eager, x, y), _run(compiled, x, y), rtol=1e-4)
