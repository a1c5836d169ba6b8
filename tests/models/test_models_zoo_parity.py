"""One construction path: the zoo's models, solvers and training protocol are built by `deqlab.models`."""

from __future__ import annotations

import pytest
import torch

from deqlab import zoo
from deqlab.models import TRAINING_KEYS, _build, count_parameters, paper_settings
from deqlab.models.mnist import mnist_dense
from deqlab.solvers import ContinuousDEQSolver, DiscreteDEQSolver
from deqlab.spec import BackwardSpec, DEQTrainingConfig, SolverSpec


@pytest.mark.parametrize("model_type", ["vanilla", "skip", "skip_reg"])
def test_the_zoo_mnist_model_is_the_models_mnist_network(model_type):
    torch.manual_seed(3)
    ours = zoo.MNISTDenseDEQ(model_type=model_type)
    torch.manual_seed(3)
    theirs = mnist_dense(model_type, "discrete")
    assert count_parameters(ours) == count_parameters(theirs)
    a, b = ours.state_dict(), theirs.state_dict()
    assert [k for k in a if not k.startswith("metrics.")] == list(b)  # same parts, same order, same names
    for k, v in b.items():
        assert torch.equal(a[k], v), k  # the same seed gave the same weights
    x = torch.randn(4, 784)
    (la, sa), (lb, sb) = ours(x), theirs(x)
    assert torch.equal(la, lb) and sa.nfe == sb.nfe
    if model_type != "vanilla":
        assert torch.equal(ours.explicit_forward(x), theirs.explicit_forward(x))


def test_the_zoo_builders_are_the_models_builders():
    assert zoo.build_solver is _build.build_solver and zoo.build_backward is _build.build_backward
    # one builder of each, from a spec or from a name: the same object either way
    by_spec = zoo.build_solver(SolverSpec(kind="continuous", mode="rel_norm", tol=1e-2, max_steps=9))
    by_name = zoo.build_solver("tsit5", mode="rel_norm", abstol_termination=1e-2, reltol_termination=1e-2, max_steps=9)
    assert repr(by_spec) == repr(by_name)
    spec = BackwardSpec(tol=1e-3, max_steps=7)
    assert repr(zoo.build_backward(spec)) == repr(zoo.build_backward("gmres", tol=1e-3, max_steps=7))
    assert not hasattr(_build, "make_solver") and not hasattr(_build, "make_backward")  # no near-synonyms
    with pytest.raises(TypeError, match="pass a SolverSpec or keywords, not both"):
        zoo.build_solver(SolverSpec(), max_steps=3)


def test_the_paper_training_settings_are_derived_not_copied():
    # the oracle: the paper's MNIST protocol as the paper's text states it (Adam at a constant 1e-3)
    assert zoo.MNIST_TRAINING == DEQTrainingConfig(
        optimizer="adam", lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0, scheduler="none"
    )
    s = paper_settings("mnist", "dense")
    assert all(
        getattr(zoo.MNIST_TRAINING, k) == v
        for k, v in s.items()
        if k in TRAINING_KEYS and k not in ("skip_loss_weight", "jacobian_loss_weight")
    )
    fields = {
        "num_classes",
        "optimizer",
        "lr",
        "weight_decay",
        "momentum",
        "nesterov",
        "betas",
        "scheduler",
        "scheduler_steps",
        "eta_min",
        "step_milestones",
        "step_gamma",
        "skip_loss_weight",
        "jacobian_loss_weight",
        "extra_loss_weights",
        "pretrain_steps",
        "pretrain_depth",
        "on_nonfinite",
        "log_solver_stats",
        "log_timing",
        "log_figures",
        "log_hparams_metrics",
    }
    assert TRAINING_KEYS == fields == set(DEQTrainingConfig.field_names())
    assert zoo.MNISTDenseDEQ.skip_loss_default == s["skip_loss_weight"] == 0.01
    assert zoo.MNISTDenseDEQ.jacobian_loss_default == 1.0


def test_build_solver_names_the_ode_and_the_termination_tolerances_apart():
    s = zoo.build_solver("tsit5", abstol_termination=1e-2, reltol_termination=2e-2, ode_abstol=1e-5, ode_reltol=2e-5)
    assert isinstance(s, ContinuousDEQSolver)
    assert (s.termination.abstol, s.termination.reltol, s.ode_abstol, s.ode_reltol) == (1e-2, 2e-2, 1e-5, 2e-5)
    # the ODE tolerances default to the termination ones (the paper-era code); the old names still work, warning
    with pytest.warns(DeprecationWarning, match="abstol= is deprecated; use abstol_termination="):
        old = zoo.build_solver("tsit5", abstol=3e-3, reltol=4e-3)
    assert (old.termination.abstol, old.termination.reltol, old.ode_abstol, old.ode_reltol) == (3e-3, 4e-3, 3e-3, 4e-3)
    d = zoo.build_solver("anderson")
    assert isinstance(d, DiscreteDEQSolver) and d.termination.abstol == d.termination.reltol == 5e-3
    with pytest.raises(ValueError, match="abstol= is the old name of abstol_termination="):
        zoo.build_solver("anderson", abstol=1e-2, abstol_termination=1e-3)
    with pytest.raises(ValueError, match="ode_abstol"):
        zoo.build_solver("anderson", ode_abstol=1e-3)


def test_the_zoo_old_tolerance_keywords_are_the_termination_tolerances():
    layer = zoo.MNISTDenseDEQ(solver="tsit5", abstol=1e-2, reltol=2e-2).deq
    assert (layer.solver.termination.abstol, layer.solver.termination.reltol) == (1e-2, 2e-2)
