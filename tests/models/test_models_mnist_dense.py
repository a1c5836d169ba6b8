"""MNIST dense paper model: every model type × solver builds, trains one step and follows the contract."""

import subprocess
import sys

import pytest
import torch

from deqlab.models import EXPERIMENTS, MODEL_TYPES, TRAINING_KEYS, build_model, count_parameters, paper_settings
from deqlab.nn import DeepEquilibriumNetwork, ImplicitBackward, MultiScaleNeuralODE, SkipDeepEquilibriumNetwork
from deqlab.solvers import ContinuousDEQSolver, DiscreteDEQSolver
from deqlab.solvers.algorithms import LimitedMemoryBroyden

COMBOS = [
    (m, s) for m in MODEL_TYPES for s in ("continuous", "discrete") if not (m == "neural_ode" and s == "discrete")
]


@pytest.mark.parametrize("model_type,solver", COMBOS)
def test_mnist_dense_forward_backward(model_type, solver):
    torch.manual_seed(0)
    net = build_model("mnist", "dense", model_type=model_type, solver=solver)
    x = torch.randn(3, 1, 28, 28)
    logits, sol = net(x)
    assert logits.shape == (3, 10)
    (logits.square().mean() + sol.skip_loss).backward()
    grads = {n: p.grad for n, p in net.named_parameters()}
    # the stem, the DEQ map and the head all receive a gradient
    for name in ("stem.1.weight", "head.weight" if model_type != "neural_ode" else "head.module.weight"):
        assert grads[name] is not None and grads[name].abs().sum() > 0, name
    map_grads = [g for n, g in grads.items() if n.startswith("deq.") and "shortcut" not in n]
    assert map_grads and all(g is not None and g.abs().sum() > 0 for g in map_grads)
    if model_type == "skip":  # the shortcut learns through the skip loss only
        assert sol.skip_loss > 0 and net.deq.shortcut[0].weight.grad.abs().sum() > 0
    if model_type == "neural_ode":
        assert isinstance(net.deq, MultiScaleNeuralODE) and sol.nfe > 0
    else:
        assert sol.backward_nfe > 0  # the implicit backward ran


@pytest.mark.parametrize("model_type,solver", COMBOS)
def test_mnist_dense_solver_selection_is_effective(model_type, solver):
    net = build_model("mnist", "dense", model_type=model_type, solver=solver)
    if model_type == "neural_ode":
        assert net.deq.method == "tsit5" and net.deq.ode_abstol == net.deq.ode_reltol == 5e-3
        return
    s = net.deq.solver
    if solver == "continuous":
        assert isinstance(s, ContinuousDEQSolver) and s.ode_solver == "tsit5"
    else:
        assert isinstance(s, DiscreteDEQSolver) and isinstance(s.algorithm, LimitedMemoryBroyden)
    assert s.termination.abstol == s.termination.reltol == 5e-3 and s.max_steps == 50
    b = net.deq.backward
    # the adjoint's tolerance has one route: the forward's termination tolerance, handed over by the layer
    assert isinstance(b, ImplicitBackward) and b.solver == "gmres" and b.tol is None and b.max_steps == 15
    assert b.linear_solver(s.termination.tol).tol == 5e-3
    expected = SkipDeepEquilibriumNetwork if model_type != "vanilla" else DeepEquilibriumNetwork
    assert type(net.deq) is expected
    assert (net.deq.shortcut is not None) == (model_type == "skip")


@pytest.mark.parametrize("model_type", ["vanilla", "skip", "skip_reg"])
def test_mnist_dense_explicit_and_counts(model_type):
    net = build_model("mnist", "dense", model_type=model_type)
    x = torch.randn(2, 784)
    out = net.explicit_forward(x)
    if model_type == "vanilla":
        assert out is None
    else:
        assert out.shape == (2, 10)
        with torch.no_grad():  # the u0-only prediction is head(u0)
            _, sol = net(x)
        torch.testing.assert_close(out, net.head(sol.u0))
    # 784*128+128 (stem) + 2*128*128 (map) + 128*10+10 (head) [+ 128*128+128 (skip predictor)]
    base = 784 * 128 + 128 + 2 * 128 * 128 + 128 * 10 + 10
    assert count_parameters(net) == base + (128 * 128 + 128 if model_type == "skip" else 0)


@pytest.mark.parametrize("model_type", ["vanilla", "skip", "skip_reg"])
@pytest.mark.parametrize("solver", ["continuous", "discrete"])
def test_mnist_dense_jac_reg_gives_a_positive_jacobian_loss(model_type, solver):
    torch.manual_seed(0)
    net = build_model("mnist", "dense", model_type=model_type, solver=solver, jacobian_regularization=True)
    _, sol = net(torch.randn(2, 784))
    assert sol.jacobian_loss.requires_grad and float(sol.jacobian_loss.detach()) > 0
    sol.jacobian_loss.backward()
    assert net.deq.model.w_z.weight.grad.abs().sum() > 0
    off = build_model("mnist", "dense", model_type=model_type, solver=solver)
    assert float(off(torch.randn(2, 784))[1].jacobian_loss) == 0.0


def test_neural_ode_rejects_discrete_and_jac_reg():
    with pytest.raises(ValueError, match="solver='continuous'"):
        build_model("mnist", "dense", model_type="neural_ode", solver="discrete")
    with pytest.raises(ValueError, match="jacobian_regularization=False"):
        build_model("mnist", "dense", model_type="neural_ode", solver="continuous", jacobian_regularization=True)


def test_builder_rejects_unknown_names():
    with pytest.raises(ValueError, match="valid: mnist"):
        build_model("mnits", "dense")
    with pytest.raises(ValueError, match="valid: dense, conv"):
        build_model("mnist", "v1")
    with pytest.raises(ValueError, match="model_type"):
        build_model("mnist", "dense", model_type="skipdeq")
    with pytest.raises(ValueError, match="solver"):
        build_model("mnist", "dense", solver="broyden")
    with pytest.raises(TypeError, match="unexpected keyword"):
        build_model("mnist", "dense", tolerance=1e-3)


def test_overrides_and_num_classes_reach_the_model():
    net = build_model("mnist", "dense", model_type="vanilla", num_classes=7, tol=1e-4, max_steps=30)
    assert net.head.out_features == 7
    assert net.deq.solver.termination.reltol == 1e-4 and net.deq.solver.max_steps == 30
    b = net.deq.backward
    assert b.linear_solver(net.deq.solver.termination.tol).tol == 1e-4 and b.max_steps == 15


def test_mnist_dense_paper_settings():
    # the paper's stated protocol (its text): Adam at a constant 1e-3, λ_skip = 0.01
    s = paper_settings("mnist", "dense", "skip", "discrete")
    assert s["optimizer"] == "adam" and s["lr"] == 1e-3 and s["weight_decay"] == 0.0
    assert s["betas"] == (0.9, 0.999) and s["scheduler"] == "none"
    assert s["skip_loss_weight"] == 0.01 and s["jacobian_loss_weight"] == 0.0
    assert s["batch_size"] == 32 and s["epochs"] == 25 and s["augment"] is False
    assert s["seeds"] == (6171, 3859, 2961) and s["pretrain_depth"] == 5 and s["pretrain_steps"] == 0
    assert "model_options" not in s and s.get("normalize", True) is True
    assert paper_settings("mnist", "dense", "vanilla", "continuous")["skip_loss_weight"] == 0.0
    # the January-2022 code's (v1): AdamW + cosine, λ_skip = 5 (on vanilla too), its semantics as options
    v1 = paper_settings("mnist", "dense", "skip", "discrete", protocol="v1")
    assert v1["optimizer"] == "adamw" and v1["weight_decay"] == 2.5e-6 and v1["scheduler"] == "cosine"
    assert v1["eta_min"] == 1e-6 and v1["skip_loss_weight"] == 5.0 and v1["normalize"] is False
    assert paper_settings("mnist", "dense", "vanilla", protocol="v1")["skip_loss_weight"] == 5.0
    assert v1["model_options"] == {"reapply_map": True, "vanilla_penalty": True, "batch_wide": True}
    with pytest.raises(ValueError, match="protocol must be one of 'paper', 'v1'"):
        paper_settings("mnist", "dense", protocol="2023")
    assert (
        paper_settings("mnist", "dense", "skip_reg", "continuous", jacobian_regularization=True)["jacobian_loss_weight"]
        == 1.0
    )
    # the training keys are exactly DEQLightningModule training settings (the fields of DEQTrainingConfig,
    # which DEQLightningModule accepts as flat keywords)
    import dataclasses

    from deqlab.spec import DEQTrainingConfig

    params = {f.name for f in dataclasses.fields(DEQTrainingConfig)}
    assert TRAINING_KEYS <= params
    for exp, archs in EXPERIMENTS.items():
        for arch in archs:
            for mt in MODEL_TYPES:
                st = paper_settings(exp, arch, mt, "continuous")
                assert ("epochs" in st) != ("max_steps" in st), (exp, arch)
                assert {"batch_size", "augment", "seeds", "mean", "std"} <= set(st)


def test_dense_model_trains_in_deqclassifier():
    from deqlab.zoo import DEQClassifier

    net = build_model("mnist", "dense", model_type="skip", solver="discrete")
    training = {k: v for k, v in paper_settings("mnist", "dense", "skip", "discrete").items() if k in TRAINING_KEYS}
    module = DEQClassifier(net, **training)
    logits, sol = module(torch.randn(2, 1, 28, 28))
    assert logits.shape == (2, 10) and module.explicit_forward(torch.randn(2, 784)).shape == (2, 10)


def test_import_models_does_not_import_lightning(tmp_path):
    code = (
        "import sys, deqlab.models as m; m.build_model('mnist', 'dense'); "
        "bad = [k for k in sys.modules if k.split('.')[0] in ('pytorch_lightning', 'lightning')]; "
        "assert not bad, bad"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_mnist_dense_gradient_matches_finite_differences_float64():
    """The implicit gradient through stem → DEQ → head equals central differences of the loss (float64,
    tight solve), for a stem, a map and a head parameter."""
    torch.manual_seed(0)
    net = build_model(
        "mnist", "dense", model_type="skip_reg", solver="discrete", tol=1e-11, max_steps=300, backward_max_steps=300
    ).double()
    x, t = torch.randn(3, 784, dtype=torch.float64), torch.randn(3, 10, dtype=torch.float64)

    def loss():
        y, sol = net(x)
        return ((y - t) ** 2).sum(), sol

    value, sol = loss()
    assert bool(sol.converged.all())
    value.backward()
    for p in (net.stem[1].weight, net.deq.model.w_z.weight, net.head.weight):
        d = torch.randn_like(p)
        with torch.no_grad():
            p.add_(1e-5 * d)
            up = loss()[0]
            p.sub_(2e-5 * d)
            down = loss()[0]
            p.add_(1e-5 * d)
        torch.testing.assert_close((p.grad * d).sum(), (up - down) / 2e-5, rtol=1e-5, atol=1e-7)


def test_paper_settings_of_the_other_experiments():
    conv = paper_settings("mnist", "conv", "skip", "continuous")
    assert (conv["batch_size"], conv["epochs"], conv["skip_loss_weight"]) == (64, 25, 1.0)
    assert paper_settings("cifar10", "v1", "skip", "discrete")["batch_size"] == 32
    assert paper_settings("cifar10", "v1", "skip", "continuous")["batch_size"] == 64
    assert paper_settings("svhn", "v1", "skip", "discrete")["batch_size"] == 64
    small = paper_settings("cifar10", "tiny", "skip", "continuous")
    assert (small["optimizer"], small["weight_decay"], small["max_steps"], small["batch_size"]) == (
        "adam",
        2.5e-5,
        20000,
        128,
    )
    assert small["pretrain_steps"] == 3000 and small["skip_loss_weight"] == 0.01 and small["augment"] is False
    assert paper_settings("cifar10", "small", "neural_ode", "continuous")["pretrain_steps"] == 0
    large = paper_settings("cifar10", "large", "vanilla", "discrete")
    assert (large["weight_decay"], large["max_steps"], large["augment"], large["skip_loss_weight"]) == (
        0.0,
        90000,
        True,
        0.0,
    )
    imnet = paper_settings("imagenet", "small", "skip_reg", "discrete")
    assert (imnet["optimizer"], imnet["lr"], imnet["momentum"], imnet["nesterov"], imnet["weight_decay"]) == (
        "sgd",
        0.05,
        0.9,
        True,
        1e-6,
    )
    assert (imnet["scheduler"], imnet["step_milestones"], imnet["step_gamma"]) == (
        "step",
        (100_000, 150_000, 250_000),
        0.1,
    )
    assert (imnet["max_steps"], imnet["batch_size"], imnet["num_classes"]) == (500_000, 64, 1000)
    with pytest.raises(ValueError, match="valid"):
        paper_settings("cifar100", "small")


def test_skip_target_semantics_per_model_type():
    assert build_model("mnist", "dense", model_type="skip").deq.init.detach_skip_target is True
    assert build_model("mnist", "dense", model_type="skip_reg").deq.init.detach_skip_target is False
    assert build_model("cifar10", "small", model_type="skip_reg").deq.init.detach_skip_target is False
    assert build_model("mnist", "dense", model_type="skip_reg", detach_skip_target=True).deq.init.detach_skip_target
    # coupled (skip_reg): the skip loss also differentiates through z*, so it reaches W1, which f(0, x) lacks
    torch.manual_seed(0)
    net = build_model("mnist", "dense", model_type="skip_reg")
    _, sol = net(torch.randn(4, 784))
    sol.skip_loss.backward()
    assert net.deq.model.w_z.weight.grad.abs().sum() > 0


def test_skip_reg_training_keeps_the_fixed_point_bounded():
    """With a detached target the Skip Reg. loss only raises u0 = f(0, x) = relu(W2 x) towards z* ≥ u0, which
    raises z* again: |z*| ran away (≈4 after 80 steps here, ≈600 on MNIST). The coupled default stays small."""
    torch.manual_seed(0)
    net = build_model("mnist", "dense", model_type="skip_reg", width=32, in_features=64)
    X, Y = torch.randn(256, 64), torch.randint(0, 10, (256,))
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    for _ in range(80):
        idx = torch.randint(0, 256, (32,))
        logits, sol = net(X[idx])
        loss = torch.nn.functional.cross_entropy(logits, Y[idx]) + 5.0 * sol.skip_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(sol.z_star.detach().abs().mean()) < 1.5


def test_the_v1_semantics_reach_the_network():
    from deqlab.models.settings import V1_SEMANTICS

    net = build_model("mnist", "dense", model_type="vanilla", solver="discrete", **V1_SEMANTICS)
    assert net.deq.solver.termination.batch_wide and net.deq.reapply_map
    assert net.deq.init.fixed_point_penalty
    plain = build_model("mnist", "dense", model_type="vanilla", solver="continuous")
    assert not plain.deq.solver.termination.batch_wide and not plain.deq.reapply_map
    assert not plain.deq.init.fixed_point_penalty
    assert plain.deq.solver.reference_counting == "fastdeq"  # the MNIST table's count (deqlab.solvers.counting)


def test_jac_reg_is_the_deprecated_name_of_jacobian_regularization():
    with pytest.warns(DeprecationWarning, match="jac_reg= is deprecated; use jacobian_regularization="):
        net = build_model("mnist", "dense", model_type="vanilla", jac_reg=True)
    assert net.deq.jacobian_regularization
    with pytest.warns(DeprecationWarning, match="jacobian_regularization="):
        assert paper_settings("mnist", "dense", "skip", jac_reg=True)["jacobian_loss_weight"] == 1.0
    with pytest.raises(ValueError, match="pass only jacobian_regularization="):
        build_model("mnist", "dense", jac_reg=True, jacobian_regularization=True)
