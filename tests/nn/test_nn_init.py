"""Initial guesses as strategy objects: ``init=ZeroGuess() / ShortcutGuess(m) / MapGuess() / your own``.

The Skip / Skip Reg. / vanilla layers built with ``init=`` must be the old classes exactly (same z*,
gradients and skip loss), checked against hand-written oracles of what each variant computes.
"""
import pytest
import torch
from torch import nn

import deqlab
from deqlab.nn import (DEQ, DEQLayer, DeepEquilibriumNetwork, FunctionGuess, InitialGuess, MapGuess,
                       MultiScaleDeepEquilibriumNetwork, MultiScaleSkipDeepEquilibriumNetwork, ShortcutGuess,
                       SkipDEQ, ZeroGuess)

from deqlab_nn_helpers import DenseMap, make_solver


def _pair(kind):
    """(old-style layer, init=-style layer) sharing one map, one shortcut and one solver."""
    torch.manual_seed(0)
    model = DenseMap(4, 3).double()
    shortcut = nn.Linear(3, 4).double()
    solver = make_solver("anderson", tol=1e-12, max_steps=300)
    if kind == "vanilla":
        return DEQ(model, solver, z_shape=(4,)), DEQ(model, solver, init=ZeroGuess(shape=(4,)))
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
    return [t.detach() for t in z], sol, x.grad.clone(), {n: p.grad.clone() for n, p in layer.named_parameters()
                                                            if p.grad is not None}


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
    wrapped.load_state_dict({"deq." + k: v for k, v in old_style.items()})
    assert torch.equal(dst.shortcut.weight, src.shortcut.weight)
    assert "init.shortcut.weight" in dst.state_dict()
