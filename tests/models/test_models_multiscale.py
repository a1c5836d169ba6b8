"""Multiscale paper networks: build, forward/backward, contract, solver selection and parameter counts."""
import pytest
import torch
from torch import nn

from deqlab.models import build_model, count_parameters
from deqlab.models.mdeq import BNResidualBlock
from deqlab.nn import (
    ImplicitBackward,
    MultiScaleDeepEquilibriumNetwork,
    MultiScaleNeuralODE,
    MultiScaleSkipDeepEquilibriumNetwork,
    ResidualBlock,
)
from deqlab.solvers import ContinuousDEQSolver, DiscreteDEQSolver
from deqlab.solvers.algorithms import LimitedMemoryBroyden

SMALL = {  # archs cheap enough for a backward on CPU: (experiment, arch) -> input shape
    ("mnist", "conv"): (2, 1, 28, 28),
    ("svhn", "v1"): (2, 3, 32, 32),
    ("cifar10", "v1"): (2, 3, 32, 32),
    ("cifar10", "small"): (2, 3, 32, 32),
}
#: (experiment, arch) -> (tolerance, forward max steps, backward max steps, termination mode)
PROTOCOL = {
    ("mnist", "conv"): (1e-2, 50, 15, "rel_norm"),
    ("svhn", "v1"): (5e-2, 20, 15, "rel_deq_best"),
    ("cifar10", "v1"): (5e-2, 20, 15, "rel_deq_best"),
    ("cifar10", "small"): (5e-2, 18, 20, "rel_norm"),
    ("cifar10", "large"): (5e-2, 18, 20, "rel_deq_best"),
    ("imagenet", "small"): (5e-2, 27, 28, "abs_deq_best"),
}
COMBOS = [("vanilla", "discrete"), ("skip", "continuous"), ("skip", "discrete"), ("skip_reg", "continuous"),
          ("neural_ode", "continuous")]


@pytest.mark.parametrize("model_type,solver", COMBOS)
@pytest.mark.parametrize("key", list(SMALL), ids=lambda k: "-".join(k))
def test_forward_backward_reach_every_parameter(key, model_type, solver):
    torch.manual_seed(0)
    net = build_model(*key, model_type=model_type, solver=solver, max_steps=3)
    x = torch.randn(*SMALL[key])
    logits, sol = net(x)
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    (logits.square().mean() + sol.skip_loss).backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, missing  # stem, map, head (and the Skip predictor, through the skip loss)
    if model_type == "neural_ode":
        assert isinstance(net.deq, MultiScaleNeuralODE) and net.explicit_forward(x) is None
    else:
        assert sol.backward_nfe > 0


@pytest.mark.parametrize("key", list(SMALL), ids=lambda k: "-".join(k))
@pytest.mark.parametrize("model_type", ["vanilla", "skip", "skip_reg"])
def test_explicit_forward_is_the_head_of_u0(key, model_type):
    torch.manual_seed(0)
    net = build_model(*key, model_type=model_type, max_steps=2).eval()
    x = torch.randn(*SMALL[key])
    out = net.explicit_forward(x)
    if model_type == "vanilla":
        assert out is None
        return
    with torch.no_grad():
        _, sol = net(x)
        torch.testing.assert_close(out, net.head(sol.u0))
    assert out.shape == (2, 10)


@pytest.mark.parametrize("key", list(PROTOCOL), ids=lambda k: "-".join(k))
@pytest.mark.parametrize("solver", ["continuous", "discrete"])
@pytest.mark.parametrize("model_type", ["vanilla", "skip", "skip_reg"])
def test_solver_and_adjoint_follow_the_protocol(key, solver, model_type):
    tol, steps, bsteps, mode = PROTOCOL[key]
    net = build_model(*key, model_type=model_type, solver=solver)
    s = net.deq.solver
    if solver == "continuous":
        assert isinstance(s, ContinuousDEQSolver) and s.ode_solver == "tsit5"
    else:
        assert isinstance(s, DiscreteDEQSolver) and isinstance(s.algorithm, LimitedMemoryBroyden)
    assert (s.termination.mode, s.termination.abstol, s.termination.reltol, s.max_steps) == (mode, tol, tol, steps)
    b = net.deq.backward
    assert isinstance(b, ImplicitBackward) and (b.solver, b.tol, b.max_steps) == ("gmres", tol, bsteps)
    cls = MultiScaleDeepEquilibriumNetwork if model_type == "vanilla" else MultiScaleSkipDeepEquilibriumNetwork
    assert type(net.deq) is cls
    assert (net.deq.shortcut is not None) == (model_type == "skip")


def test_neural_ode_uses_the_forward_tolerance_on_unit_interval():
    net = build_model("cifar10", "small", model_type="neural_ode", solver="continuous")
    assert net.deq.method == "tsit5" and net.deq.abstol == net.deq.reltol == 5e-2 and net.deq.t_end == 1.0
    with pytest.raises(ValueError, match="solver='continuous'"):
        build_model("cifar10", "small", model_type="neural_ode", solver="discrete")


@pytest.mark.parametrize("solver", ["continuous", "discrete"])
def test_jac_reg_gives_a_differentiable_positive_jacobian_loss(solver):
    torch.manual_seed(0)
    net = build_model("cifar10", "small", model_type="skip_reg", solver=solver, jac_reg=True, max_steps=3)
    _, sol = net(torch.randn(2, 3, 32, 32))
    assert sol.jacobian_loss.requires_grad and float(sol.jacobian_loss.detach()) > 0
    sol.jacobian_loss.backward()
    assert net.deq.model.main_layers[0].conv1.weight.grad.abs().sum() > 0
    _, off = build_model("cifar10", "small", model_type="skip_reg", solver=solver, max_steps=3)(
        torch.randn(2, 3, 32, 32))
    assert float(off.jacobian_loss) == 0.0


# The paper's parameter counts (arXiv 2201.12240 tables): CIFAR-10 small 164K (200K with Skip), large 10.63M,
# ImageNet small 17.91M. Ours must be within 5 %.
PAPER_COUNTS = [
    (("cifar10", "small"), "vanilla", 164_000),
    (("cifar10", "small"), "skip", 200_000),
    (("cifar10", "small"), "skip_reg", 164_000),
    (("cifar10", "small"), "neural_ode", 164_000),
    (("cifar10", "large"), "vanilla", 10_630_000),
    (("cifar10", "large"), "skip_reg", 10_630_000),
    (("imagenet", "small"), "vanilla", 17_910_000),
    (("imagenet", "small"), "skip_reg", 17_910_000),
]


@pytest.mark.parametrize("key,model_type,paper", PAPER_COUNTS, ids=lambda v: "-".join(v) if isinstance(v, tuple) else str(v))
def test_parameter_counts_match_the_paper(key, model_type, paper):
    n = count_parameters(build_model(*key, model_type=model_type,
                                     solver="continuous" if model_type == "neural_ode" else "discrete"))
    assert abs(n - paper) / paper < 0.05, (n, paper)


def test_exact_counts_are_stable():
    """Pin the measured counts (docs/models.md prints them); a change to a block shows up here."""
    got = {k: count_parameters(build_model(*k.split("/")[:2], model_type=k.split("/")[2])) for k in (
        "mnist/conv/vanilla", "cifar10/v1/vanilla", "cifar10/v1/skip", "cifar10/small/vanilla",
        "cifar10/small/skip", "cifar10/large/vanilla", "imagenet/small/vanilla")}
    assert got == {"mnist/conv/vanilla": 71_578, "cifar10/v1/vanilla": 159_274, "cifar10/v1/skip": 216_826,
                   "cifar10/small/vanilla": 163_546, "cifar10/small/skip": 200_122,
                   "cifar10/large/vanilla": 10_631_958, "imagenet/small/vanilla": 17_912_456}


@pytest.mark.parametrize("key,shape,overrides", [
    (("cifar10", "large"), (2, 3, 32, 32), {}),
    (("imagenet", "small"), (2, 3, 64, 64), {"image_size": 64}),
], ids=["cifar10-large", "imagenet-small"])
def test_large_models_run_one_forward(key, shape, overrides):
    torch.manual_seed(0)
    net = build_model(*key, model_type="skip", max_steps=2, **overrides)
    with torch.no_grad():
        logits, sol = net(torch.randn(*shape))
    classes = 1000 if key[0] == "imagenet" else 10
    assert logits.shape == (2, classes) and torch.isfinite(logits).all() and sol.nfe > 0
    assert [tuple(z.shape[1:]) for z in sol.z_star] == net.deq.scales


def test_blocks_per_version_and_batchnorm_inside_the_map_keeps_no_running_stats():
    v1 = build_model("cifar10", "v1", model_type="vanilla")
    assert all(isinstance(m, ResidualBlock) for m in v1.deq.model.main_layers)
    assert v1.deq.scales == [(24, 32, 32), (24, 16, 16)]
    v2 = build_model("cifar10", "large", model_type="skip")
    assert all(isinstance(m, BNResidualBlock) for m in v2.deq.model.main_layers)
    assert v2.deq.scales == [(32, 32, 32), (64, 16, 16), (128, 8, 8), (256, 4, 4)]
    bns = [m for m in v2.deq.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(not m.track_running_stats for m in bns)
    assert build_model("imagenet", "small").deq.scales[0] == (32, 56, 56)  # stem downsamples 224 by 4


def test_aliases_overrides_and_errors():
    tiny, small = build_model("cifar10", "tiny"), build_model("cifar10", "small")
    assert count_parameters(tiny) == count_parameters(small)
    net = build_model("cifar10", "small", model_type="vanilla", num_classes=100, tol=1e-3, dropout=0.0)
    assert net.head.classifier.out_features == 100 and net.deq.solver.termination.reltol == 1e-3
    assert net.deq.model.main_layers[0].dropout.p == 0.0
    with pytest.raises(TypeError, match="unexpected keyword"):
        build_model("cifar10", "small", channels=(8, 8))
    with pytest.raises(ValueError, match="divisible"):
        build_model("imagenet", "small", image_size=100)


def test_float64_and_eval_mode():
    torch.manual_seed(0)
    net = build_model("mnist", "conv", model_type="skip", max_steps=3).double().eval()
    logits, sol = net(torch.randn(2, 1, 28, 28, dtype=torch.float64))
    assert logits.dtype == torch.float64 and sol.z_star[0].dtype == torch.float64
