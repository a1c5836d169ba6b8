"""Initial guesses as strategy objects: ``init=ZeroGuess() / ShortcutGuess(m) / MapGuess() / your own``.

The Skip / Skip Reg. / vanilla layers built with ``init=`` must be the old classes exactly (same z*,
gradients and skip loss), checked against hand-written oracles of what each variant computes.
"""

import re

import pytest
import torch
from torch import nn

from deqlab_nn_helpers import DenseMap, make_solver

import deqlab
from deqlab.nn import (
    DEQ,
    DeepEquilibriumNetwork,
    DEQLayer,
    FunctionGuess,
    ImplicitBackward,
    InitialGuess,
    MapGuess,
    MultiScaleDeepEquilibriumNetwork,
    MultiScaleSkipDeepEquilibriumNetwork,
    ShortcutGuess,
    SkipDEQ,
    ZeroGuess,
)
from deqlab.solvers import DiscreteDEQSolver


def _pair(kind):
    """(old-style layer, init=-style layer) sharing one map, one shortcut and one solver."""
    torch.manual_seed(0)
    model = DenseMap(4, 3).double()
    shortcut = nn.Linear(3, 4).double()
    solver = make_solver("anderson", tol=1e-12, max_steps=300)
    if kind == "vanilla":
        with pytest.warns(DeprecationWarning, match=r"z_shape=S is deprecated; use init=ZeroGuess\(shape=S\)"):
            old = DEQ(model, solver, z_shape=(4,))
        return old, DEQ(model, solver, init=ZeroGuess(shape=(4,)))
    if kind == "skip":
        return SkipDEQ(model, solver, shortcut, z_shape=(4,)), DEQ(model, solver, init=ShortcutGuess(shortcut))
    return SkipDEQ(model, solver, None, z_shape=(4,)), DEQ(model, solver, init=MapGuess(shape=(4,)))


def _run(layer, x):
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    z, sol = layer(x)
    (z.sin().sum() + sol.skip_loss).backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    return z.detach(), sol, x.grad.clone(), grads


@pytest.mark.parametrize("kind", ["vanilla", "skip", "skipreg"])
def test_init_forms_equal_the_old_classes(kind):
    old, new = _pair(kind)
    x = torch.randn(3, 3, dtype=torch.float64)
    z1, s1, gx1, g1 = _run(old, x)
    z2, s2, gx2, g2 = _run(new, x)
    assert torch.equal(z1, z2) and torch.equal(s1.skip_loss.detach(), s2.skip_loss.detach())
    assert torch.equal(gx1, gx2)
    assert set(g1) == set(g2) and all(torch.equal(g1[k], g2[k]) for k in g1)
    model = new.model
    # oracles: what each variant must compute
    torch.testing.assert_close(model(z2, x), z2, rtol=0, atol=1e-10)
    if kind == "vanilla":
        assert torch.equal(s2.u0, torch.zeros(3, 4, dtype=torch.float64)) and s2.skip_loss.item() == 0
    elif kind == "skip":
        sc = new.shortcut
        u0 = sc(x)
        torch.testing.assert_close(s2.u0, u0)
        torch.testing.assert_close(s2.skip_loss, (u0 - z2).abs().mean())
        # the shortcut learns only through the skip loss: its gradient is that of mean|sc(x) - z*| alone
        want = torch.autograd.grad((sc(x) - z2).abs().mean(), list(sc.parameters()))
        torch.testing.assert_close(g2["init.shortcut.weight"], want[0])
        torch.testing.assert_close(g2["init.shortcut.bias"], want[1])
    else:
        u0 = model(torch.zeros(3, 4, dtype=torch.float64), x)
        torch.testing.assert_close(s2.u0, u0)
        torch.testing.assert_close(s2.skip_loss, (u0 - z2).abs().mean())


def test_multiscale_init_forms_equal_the_old_classes():
    from test_nn_multiscale import SCALES, pieces

    torch.manual_seed(1)
    main, mapping, post = pieces()
    solver = make_solver("anderson", tol=1e-10, max_steps=300)
    shortcuts = [nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(1, 3, 3, stride=2, padding=1)]
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    for old_sc, init in [(None, MapGuess(shape=SCALES)), (shortcuts, ShortcutGuess(shortcuts))]:
        old = MultiScaleSkipDeepEquilibriumNetwork(main, mapping, post, solver, SCALES, old_sc).double()
        new = MultiScaleDeepEquilibriumNetwork(main, mapping, post, solver, SCALES, init=init).double()
        z1, s1, gx1, g1 = _run_list(old, x)
        z2, s2, gx2, g2 = _run_list(new, x)
        assert all(torch.equal(a, b) for a, b in zip(z1, z2)) and torch.equal(s1.skip_loss, s2.skip_loss)
        assert s2.skip_loss.item() > 0 and torch.equal(gx1, gx2)
        assert all(torch.equal(g1[k], g2[k]) for k in g1)
    zeros = MultiScaleDeepEquilibriumNetwork(main, mapping, post, solver, SCALES).double()
    assert isinstance(zeros.init, ZeroGuess) and zeros.init.shape == SCALES
    assert [tuple(u.shape) for u in zeros.explicit(x)] == [(2, *s) for s in SCALES]


def _run_list(layer, x):
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    z, sol = layer(x)
    (sum(t.sin().sum() for t in z) + sol.skip_loss).backward()
    return (
        [t.detach() for t in z],
        sol,
        x.grad.clone(),
        {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None},
    )


class EMAGuess(InitialGuess):
    """A user-written strategy: start from an exponential moving average of past fixed points."""

    def __init__(self, shape, momentum=0.5):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("mean", torch.zeros(shape))
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))

    def forward(self, x, f):
        return self.mean.to(x.dtype).expand(x.shape[0], *self.mean.shape).clone()

    def observe(self, x, z_star):
        m = z_star.mean(0)
        self.mean.copy_(m if int(self.seen) == 0 else self.momentum * self.mean + (1 - self.momentum) * m)
        self.seen += 1


def test_user_written_ema_guess_works_without_touching_deqlab():
    torch.manual_seed(2)
    model = DenseMap(6, 6, scale=0.8)
    with torch.no_grad():
        model.wx.weight.mul_(0.05)  # fixed points of different inputs are close: an EMA start pays off
    solver = make_solver("fixed_point", tol=1e-6, max_steps=500)
    ema = EMAGuess((6,))
    layer = DEQ(model, solver, init=ema)
    x = torch.randn(8, 6)
    z_first, s_first = layer(x)
    assert torch.equal(s_first.u0, torch.zeros(8, 6)) and int(ema.seen) == 1
    torch.testing.assert_close(ema.mean, z_first.detach().mean(0))
    z_again, s_again = layer(x)
    assert s_again.nfe < s_first.nfe  # the learned start is closer to the fixed point
    torch.testing.assert_close(z_again, z_first, rtol=0, atol=1e-5)
    (z_again.sum() + s_again.skip_loss).backward()  # no skip loss: a zero scalar
    assert s_again.skip_loss.item() == 0 and model.wz.weight.grad is not None
    assert "init.mean" in dict(layer.named_buffers())  # registered with the layer (saved, moved by .to())


def test_two_ways_of_setting_u0_raise_naming_both():
    model, solver = DenseMap(4, 3), make_solver("anderson")
    with pytest.raises(ValueError, match="init and z_shape"):
        DEQ(model, solver, init=ZeroGuess(), z_shape=(4,))
    with pytest.raises(ValueError, match="z_shape and initializer"):
        DEQ(model, solver, z_shape=(4,), initializer=lambda x: x)
    with pytest.raises(ValueError, match="init and shortcut"):
        SkipDEQ(model, solver, nn.Linear(3, 4), init=ZeroGuess())
    with pytest.raises(ValueError, match="initializer and shortcut"):
        SkipDEQ(model, solver, nn.Linear(3, 4), initializer=lambda x: x)
    with pytest.raises(TypeError, match="InitialGuess"):
        DEQ(model, solver, init=lambda x, f: x)


@pytest.mark.filterwarnings("ignore:.*is deprecated; use init=:DeprecationWarning")
def test_aliases_build_the_same_objects():
    model, solver = DenseMap(4, 3), make_solver("anderson")
    assert isinstance(DEQ(model, solver, z_shape=(4,)).init, ZeroGuess)
    assert DEQ(model, solver, z_shape=(4,)).init.shape == (4,)
    fn = DEQ(model, solver, initializer=lambda x: torch.ones(x.shape[0], 4))
    assert isinstance(fn.init, FunctionGuess)
    _, sol = fn(torch.randn(2, 3))
    assert torch.equal(sol.u0, torch.ones(2, 4))
    sc = nn.Linear(3, 4)
    skip = SkipDEQ(model, solver, sc)
    assert isinstance(skip.init, ShortcutGuess) and skip.shortcut is sc and skip.init.shortcut is sc
    assert isinstance(SkipDEQ(model, solver, None).init, MapGuess) and SkipDEQ(model, solver).shortcut is None
    with pytest.raises(AttributeError, match="init.shortcut"):
        skip.shortcut = nn.Linear(3, 4)  # read-only view
    with pytest.raises(AttributeError, match="init.skip_loss_kind"):
        skip.skip_loss_kind = "l2"  # would silently do nothing: the guess owns it
    # the base class has no Skip fields set after construction
    for attr in ("_skip_mode", "skip_loss_kind", "detach_skip_target", "z_shape", "initializer"):
        assert not hasattr(DEQ(model, solver), attr), attr


def test_shortcut_shape_is_checked_when_given():
    layer = SkipDEQ(DenseMap(4, 3), make_solver("anderson"), nn.Linear(3, 5), z_shape=(4,))
    with pytest.raises(ValueError, match=r"shortcut returned per-sample shapes \[\(5,\)\], expected \[\(4,\)\]"):
        layer(torch.randn(2, 3))


def test_guesses_and_layers_are_public_and_typed():
    for name in ("ZeroGuess", "ShortcutGuess", "MapGuess", "InitialGuess"):
        assert getattr(deqlab, name) is getattr(deqlab.nn, name)
    for layer in (DEQ(DenseMap(3), make_solver("anderson")), SkipDEQ(DenseMap(3), make_solver("anderson"))):
        assert isinstance(layer, DEQLayer) and isinstance(layer, DeepEquilibriumNetwork)
    with pytest.raises(ValueError, match="skip_loss"):
        ShortcutGuess(nn.Linear(3, 3), skip_loss="l3")
    with pytest.raises(ValueError, match="shape"):
        ZeroGuess(shape="abc")


def test_old_skip_checkpoints_still_load():
    """Before the init strategies, a Skip DEQ's predictor lived at ``shortcut.*`` in the state dict."""
    torch.manual_seed(3)
    src = SkipDEQ(DenseMap(4, 3), make_solver("anderson"), nn.Linear(3, 4))
    old_style = {k.replace("init.shortcut.", "shortcut."): v for k, v in src.state_dict().items()}
    assert "shortcut.weight" in old_style
    dst = SkipDEQ(DenseMap(4, 3), make_solver("anderson"), nn.Linear(3, 4))
    wrapped = nn.ModuleDict({"deq": dst})  # the key prefix of a layer inside a model
    with pytest.warns(DeprecationWarning, match="'deq.init.shortcut.\\*' \\(re-save the checkpoint\\)"):
        wrapped.load_state_dict({"deq." + k: v for k, v in old_style.items()})
    assert torch.equal(dst.shortcut.weight, src.shortcut.weight)
    assert "init.shortcut.weight" in dst.state_dict()


# ------------------------------------------------------------------------------------------------------
# Golden values of the pre-refactor classes (deqlab at adcc08f^: DeepEquilibriumNetwork(z_shape=),
# SkipDeepEquilibriumNetwork(model, solver, shortcut) and SkipDeepEquilibriumNetwork(model, solver, None)
# with its default detach_skip_target=True), computed by that code on the problem below, float64,
# Anderson to 1e-13, GMRES adjoint to 1e-13, loss sum(sin z*) + 3 skip_loss.
# ------------------------------------------------------------------------------------------------------

_GOLDEN = {
    "vanilla": dict(
        z=[
            [0.498189529323972, -0.619195603274858, 0.255820483228915, 0.377787845302599],
            [-0.0731925785892476, 0.518328501106369, -0.328339625981952, -0.360542671128998],
        ],
        skip=0,
        gx=[
            [0.312902924926676, 0.361273059736023, 0.239730702394179],
            [0.446513522820606, 0.414569860386102, 0.187647397733169],
        ],
        gbz=[1.69034895115202, 1.4631605261423, 2.17525332676596, 1.63382757695952],
        gwx=[
            [0.376079694635533, 0.0152684184524714, -0.357097692415965],
            [0.324063560000179, 0.0676568230931284, -0.239951248687752],
            [0.47644071323068, 0.298320066644764, -0.105563258907571],
            [0.359138130983903, 0.176484637726071, -0.139728910869578],
        ],
    ),
    "skip": dict(
        z=[
            [0.498189529323972, -0.619195603274858, 0.255820483228914, 0.3777878453026],
            [-0.0731925785892443, 0.518328501106376, -0.328339625981966, -0.360542671128988],
        ],
        skip=0.313048983171119,
        gx=[
            [-0.0543410430236681, 0.388448787967691, 0.621513676510683],
            [0.813757490770952, 0.387394132154435, -0.194135576383335],
        ],
        gbz=[1.69034895115202, 1.4631605261423, 2.17525332676596, 1.63382757695953],
        gwx=[
            [0.376079694635533, 0.0152684184524717, -0.357097692415965],
            [0.324063560000179, 0.0676568230931298, -0.23995124868775],
            [0.47644071323068, 0.298320066644766, -0.105563258907569],
            [0.359138130983904, 0.17648463772607, -0.13972891086958],
        ],
        gsc=[
            [-0.0152174994070953, 0.563649469126558, 0.715957756646168],
            [-0.0152174994070953, 0.563649469126558, 0.715957756646168],
            [0.0152174994070953, -0.563649469126558, -0.715957756646168],
            [-0.0152174994070953, 0.563649469126558, 0.715957756646168],
        ],
    ),
    "skipreg_detached": dict(
        z=[
            [0.498189529323949, -0.619195603274809, 0.255820483228847, 0.377787845302613],
            [-0.0731925785892513, 0.518328501106361, -0.328339625981936, -0.360542671129009],
        ],
        skip=0.0743795641625682,
        gx=[
            [0.571741700099158, 0.706263333485912, 0.50861810537463],
            [0.446489306126731, 0.271187977361205, -0.031657312420297],
        ],
        gbz=[1.5808625753192, 1.48870414095906, 2.22640699430479, 2.2990113552152],
        gwx=[
            [0.339259799932634, 0.47581690207757, 0.252285258873534],
            [0.338215871824266, -0.245808042128883, -0.643809330361084],
            [0.475142011347354, 0.768432564264306, 0.480188672433606],
            [0.50532179395807, 0.249560486091121, -0.195063222276643],
        ],
    ),
}


class _GoldenMap(nn.Module):
    """``tanh(Wz z + b + Wx x)`` with weights from closed formulas (no RNG: the golden values do not depend
    on torch's initialisation)."""

    def __init__(self):
        super().__init__()
        self.wz = nn.Linear(4, 4)
        self.wx = nn.Linear(3, 4, bias=False)
        with torch.no_grad():
            self.wz.weight.copy_(0.3 * torch.sin(torch.arange(16.0)).reshape(4, 4))
            self.wz.bias.copy_(0.1 * torch.cos(torch.arange(4.0)))
            self.wx.weight.copy_(0.5 * torch.cos(torch.arange(12.0) * 0.7).reshape(4, 3))

    def forward(self, z, x):
        return torch.tanh(self.wz(z) + self.wx(x))


def _golden_shortcut():
    m = nn.Linear(3, 4)
    with torch.no_grad():
        m.weight.copy_(0.4 * torch.sin(torch.arange(12.0) * 1.3).reshape(4, 3))
        m.bias.fill_(0.05)
    return m.double()


@pytest.mark.parametrize("kind", ["vanilla", "skip", "skipreg_detached"])
def test_init_forms_reproduce_the_pre_refactor_golden_values(kind):
    from deqlab.nn import ImplicitBackward
    from deqlab.solvers import DiscreteDEQSolver

    model, sc = _GoldenMap().double(), _golden_shortcut()
    init = {
        "vanilla": ZeroGuess(shape=(4,)),
        "skip": ShortcutGuess(sc),
        "skipreg_detached": MapGuess(shape=(4,), detach_skip_target=True),
    }[kind]
    layer = DEQ(
        model,
        DiscreteDEQSolver("anderson", mode="abs_norm", abstol_termination=1e-13, max_steps=300),
        init=init,
        backward=ImplicitBackward("gmres", tol=1e-13, max_steps=100),
    )
    x = torch.sin(torch.arange(6.0, dtype=torch.float64) * 0.9 + 0.2).reshape(2, 3).requires_grad_()
    z, sol = layer(x)
    (z.sin().sum() + 3.0 * sol.skip_loss).backward()
    want = {k: torch.tensor(v, dtype=torch.float64) for k, v in _GOLDEN[kind].items()}
    close = dict(rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(z.detach(), want["z"], **close)
    torch.testing.assert_close(sol.skip_loss.detach(), want["skip"], **close)
    torch.testing.assert_close(x.grad, want["gx"], **close)
    torch.testing.assert_close(model.wz.bias.grad, want["gbz"], **close)
    torch.testing.assert_close(model.wx.weight.grad, want["gwx"], **close)
    if kind == "skip":
        torch.testing.assert_close(sc.weight.grad, want["gsc"], **close)


# ------------------------------------------------------------------------------------------------------
# The protocol, the shortcut= alias, old attribute names
# ------------------------------------------------------------------------------------------------------


class _DuckGuess(nn.Module):
    """A guess that does not inherit from InitialGuess: it only has the protocol's members."""

    def __init__(self):
        super().__init__()
        self.observed = 0

    def forward(self, x, f):
        return 0.5 * x

    def start(self, u0):
        return u0.detach()

    def skip_loss(self, u0, z_star):
        return (u0 - z_star.detach()).abs().mean()

    def observe(self, x, z_star):
        self.observed += 1


def test_a_plain_module_with_the_protocol_works_as_init():
    from deqlab.nn import GuessStrategy

    guess = _DuckGuess()
    assert isinstance(guess, GuessStrategy) and not isinstance(guess, InitialGuess)
    assert deqlab.GuessStrategy is GuessStrategy
    torch.manual_seed(0)
    layer = DEQ(DenseMap(3, 3).double(), make_solver("anderson", tol=1e-12, max_steps=300), init=guess)
    assert layer.init is guess
    x = torch.randn(2, 3, dtype=torch.float64)
    z, sol = layer(x)
    torch.testing.assert_close(sol.u0, 0.5 * x)
    torch.testing.assert_close(sol.skip_loss, (0.5 * x - z.detach()).abs().mean())
    assert guess.observed == 1 and bool(sol.converged.all())


def test_an_object_lacking_a_protocol_member_is_refused_by_name():
    class NoObserve(nn.Module):
        def forward(self, x, f):
            return x

        def start(self, u0):
            return u0

        def skip_loss(self, u0, z_star):
            return None

    with pytest.raises(TypeError, match="lacks observe"):
        DEQ(DenseMap(3), make_solver("anderson"), init=NoObserve())


def test_shortcut_alias_on_the_base_class():
    model, solver, sc = DenseMap(4, 3), make_solver("anderson"), nn.Linear(3, 4)
    with pytest.warns(DeprecationWarning, match=r"shortcut=m is deprecated; use init=ShortcutGuess\(m\)"):
        layer = DEQ(model, solver, shortcut=sc, z_shape=(4,))  # z_shape with a shortcut: the shape check
    assert isinstance(layer.init, ShortcutGuess) and layer.shortcut is sc and layer.init.shape == (4,)
    with pytest.raises(ValueError, match="init and shortcut both set"):
        DEQ(model, solver, init=ZeroGuess(), shortcut=sc)
    with pytest.raises(ValueError, match="initializer and shortcut both set"):
        DEQ(model, solver, initializer=lambda x: x, shortcut=sc)


def test_skip_without_shortcut_names_the_skip_reg_default_in_the_conflict():
    with pytest.raises(ValueError, match=r"init and the Skip Reg\. default .*MapGuess"):
        SkipDEQ(DenseMap(4, 3), make_solver("anderson"), None, init=ZeroGuess())


@pytest.mark.parametrize(
    "attr, where",
    [
        ("z_shape", "init.shape"),
        ("skip_loss_kind", "init.skip_loss_kind"),
        ("detach_skip_target", "init.detach_skip_target"),
        ("initializer", "init.fn"),
    ],
)
def test_reading_a_moved_attribute_says_where_it_moved(attr, where):
    layer = SkipDEQ(DenseMap(4, 3), make_solver("anderson"), nn.Linear(3, 4))
    with pytest.raises(AttributeError, match=f"moved to the initial-guess strategy: read layer.{where}"):
        getattr(layer, attr)


def test_one_way_to_give_a_guess_and_no_silently_frozen_module():
    model, solver = DenseMap(4, 3), make_solver("anderson")
    for kw, new in (
        (dict(z_shape=(4,)), "init=ZeroGuess(shape=S)"),
        (dict(initializer=lambda x: torch.zeros(x.shape[0], 4)), "init=FunctionGuess(fn)"),
    ):
        with pytest.warns(DeprecationWarning, match=re.escape(new)):
            DEQ(model, solver, **kw)
    # a module given as a plain function guess would be registered, saved, and never trained: refused
    with (
        pytest.raises(TypeError, match=r"would never be trained .* init=ShortcutGuess\(module\)"),
        pytest.warns(DeprecationWarning),
    ):
        DEQ(model, solver, initializer=nn.Linear(3, 4))
    with pytest.raises(TypeError, match="never be trained"):
        FunctionGuess(nn.Linear(3, 4))
    frozen = nn.Linear(3, 4).requires_grad_(False)  # a fixed function is fine
    assert FunctionGuess(frozen).fn is frozen
    # a class where an object belongs: say which object to create
    for kw, needle in (
        (dict(init=ZeroGuess), "init=ZeroGuess("),
        (dict(backward=ImplicitBackward), "backward=ImplicitBackward()"),
    ):
        with pytest.raises(TypeError, match=re.escape(needle)):
            DEQ(model, solver, **kw)
    with pytest.raises(TypeError, match=re.escape("solver=DiscreteDEQSolver()")):
        DEQ(model, DiscreteDEQSolver)
