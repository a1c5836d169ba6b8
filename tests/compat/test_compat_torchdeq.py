"""deqlab.compat.torchdeq against torchdeq 0.1.0 itself (skipped without it), and its own contracts."""

from __future__ import annotations

import argparse

import pytest
import torch
from torch import nn

from deqlab.compat import torchdeq as ours


def _problem():
    torch.manual_seed(0)
    lin = nn.Linear(5, 5).double()
    with torch.no_grad():
        lin.weight.mul_(0.3)
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    return lin, x, (lambda z: torch.tanh(lin(z)) + x)


def _run(lib, kw, lin, x, f):
    deq = lib.get_deq(**kw)
    deq.train()
    z_out, info = deq(f, torch.zeros(4, 5, dtype=torch.float64))
    loss = sum((i + 1) * (z**2).sum() for i, z in enumerate(z_out))
    return z_out, info, torch.autograd.grad(loss, [x, *lin.parameters()])


@pytest.mark.parametrize(
    "kw",
    [
        dict(ift=True, f_max_iter=60, f_tol=1e-10),
        dict(grad=3, tau=0.8, f_max_iter=60, f_tol=1e-10),
        dict(core="indexing", n_states=3, ift=True, f_max_iter=12, f_tol=1e-30),
        dict(core="indexing", indexing=[2, 5], grad=2, tau=0.7, f_max_iter=12, f_tol=1e-30),
        dict(core="indexing", n_states=4, f_max_iter=12, f_tol=1e-30),
    ],
)
def test_matches_torchdeq_on_z_gradients_and_info(kw):
    torchdeq = pytest.importorskip("torchdeq")
    kw = dict(f_solver="fixed_point_iter", b_tol=1e-12, b_max_iter=100, **kw)
    lin, x, f = _problem()
    za, ia, ga = _run(torchdeq, kw, lin, x, f)
    zb, ib, gb = _run(ours, kw, lin, x, f)
    assert len(za) == len(zb)
    for a, b in zip(za, zb):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, atol=1e-8, rtol=1e-8)
    for key in ("abs_lowest", "rel_lowest", "abs_trace", "rel_trace", "nstep", "sradius"):
        assert key in ia and key in ib
    assert ib["abs_lowest"].shape == ia["abs_lowest"].shape == (4,)
    assert ib["nstep"].shape == ia["nstep"].shape


def test_early_converging_solve_still_gives_every_state():
    lin, x, f = _problem()
    deq = ours.get_deq(core="indexing", n_states=3, f_max_iter=60, f_tol=1e-8)
    z_out, _ = deq(f, torch.zeros(4, 5, dtype=torch.float64))
    assert len(z_out) == 3  # torchdeq returns fewer states once the solver stopped before the sampled steps
    deq.eval()
    z_eval, info = deq(f, torch.zeros(4, 5, dtype=torch.float64), sradius_mode=True)
    assert len(z_eval) == 1 and info["sradius"].shape == (4,) and bool((info["sradius"] < 1).all())


def test_unknown_options_raise_with_the_nearest_name():
    with pytest.raises(ValueError, match="'f_max_iters'.*'f_max_iter'"):
        ours.get_deq(f_max_iters=10)
    with pytest.raises(ValueError, match="f_solver 'andersen'.*'anderson'"):
        ours.get_deq(f_solver="andersen")
    with pytest.raises(ValueError, match="weight_func"):
        ours.fp_correction(lambda a, b: a, ([torch.ones(1)], torch.ones(1)), weight_func="cosine")
    with pytest.raises(ValueError, match="'gama'"):
        ours.fp_correction(lambda a, b: a, ([torch.ones(1)], torch.ones(1)), gama=0.5)


def test_args_namespace_and_add_deq_args():
    parser = argparse.ArgumentParser()
    parser.add_argument("--lr", type=float, default=0.1)  # the script's own option: left alone
    ours.add_deq_args(parser)
    args = parser.parse_args(["--f_max_iter", "7", "--ift", "--n_states", "2"])
    deq = ours.get_deq(args)
    assert deq.f_max_iter == 7 and deq.opts["ift"] is True and deq.opts["n_states"] == 2


def test_helpers_match_torchdeq():
    torchdeq = pytest.importorskip("torchdeq")
    states = [torch.tensor([3.0]), torch.tensor([2.0]), torch.tensor([1.0])]
    target = torch.tensor([1.0])
    crit = lambda a, b: ((a - b) ** 2).mean()  # noqa: E731
    for wf, kw in (("exp", {}), ("exp", {"gamma": 0.5}), ("linear", {})):
        want, want_parts = torchdeq.fp_correction(crit, (states, target), weight_func=wf, return_loss_values=True, **kw)
        got, got_parts = ours.fp_correction(crit, (states, target), weight_func=wf, return_loss_values=True, **kw)
        assert float(got) == pytest.approx(float(want)) and got_parts == pytest.approx(want_parts)
    lin, x, f = _problem()
    z = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    fz = f(z)
    torch.manual_seed(1)
    want = torchdeq.jac_reg(fz, z, vecs=2)
    torch.manual_seed(1)
    got = ours.jac_reg(fz, z, vecs=2)
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-9)
    torch.manual_seed(2)
    _, want_r = torchdeq.power_method(f(z), z, n_iters=50)
    torch.manual_seed(2)
    _, got_r = ours.power_method(f(z), z, n_iters=50)
    torch.testing.assert_close(got_r, want_r)
    torch.manual_seed(3)
    m = ours.mixed_init((64, 8))
    assert m.shape == (64, 8) and 0.3 < float((m == 0).float().mean()) < 0.7


def test_apply_and_reset_norm():
    from deqlab.nn import WeightNorm

    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    ours.apply_norm(model, filter_out=["1"])
    assert isinstance(model[0], WeightNorm) and type(model[1]) is nn.Linear
    ours.reset_deq(model)
    with pytest.raises(ValueError, match="norm_type"):
        ours.apply_norm(model, norm_type="weight_nrom")
    # torchdeq's filters: prefix_filter_out by prefix, filter_out by substring
    model = nn.Sequential(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), nn.Linear(2, 2), nn.Linear(2, 2))
    ours.apply_norm(model, "spectral_norm", prefix_filter_out="0.", filter_out=["2"], norm_target_norm=0.5)
    assert [type(m).__name__ for m in (model[0][0], model[0][1], model[1], model[2])] == [
        "Linear",
        "Linear",
        "SpectralNorm",
        "Linear",
    ]
    assert model[1].target == 0.5 and model[1].scale is not None
    ours.apply_norm(
        model,
        "spectral_norm",
        args={"norm_no_scale": True, "norm_clip": True, "sn_n_power_iters": 3},
        prefix_filter_out="0.1",
    )
    assert model[0][0].scale is None and model[0][0].clamp and model[0][0].n_power_iterations == 3
    # options deqlab's wrappers have no equivalent of raise, naming the key
    for kw, key in (
        (dict(norm_no_scale=True), "norm_no_scale"),
        (dict(norm_clip=True), "norm_clip"),
        (dict(learn_scale=False), "learn_scale"),
    ):
        with pytest.raises(ValueError, match=key):
            ours.apply_norm(nn.Linear(2, 2), **kw)
    with pytest.raises(ValueError, match="norm_clip_value"):
        ours.apply_norm(nn.Linear(2, 2), "spectral_norm", norm_clip=True, norm_clip_value=0.5)
    with pytest.raises(ValueError, match="'norm_target'.*'norm_target_norm'"):
        ours.apply_norm(nn.Linear(2, 2), norm_target=0.5)
    with pytest.raises(ValueError, match="ConvTranspose2d"):
        ours.apply_norm(nn.Sequential(nn.ConvTranspose2d(2, 2, 3)))
    assert ours.apply_norm(nn.Linear(2, 2), "none").__class__ is nn.Linear


def _norm_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 5)).double(), torch.randn(3, 5, dtype=torch.float64)


def _norm_steps(lib, norm_type, kw, steps=3, copy_uv=None):
    """``steps`` SGD steps of a normalized map with torchdeq's loop: reset_norm, several calls, backward."""
    model, x = _norm_model()
    lib.apply_norm(model, norm_type, **kw)
    if copy_uv is not None:  # start deqlab's power iteration where torchdeq's random one starts
        for i in (0, 2):
            model[i].u.copy_(copy_uv[i][0])
            model[i].v.copy_(copy_uv[i][1])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    outs = []
    for _ in range(steps):
        lib.reset_norm(model)
        z = torch.zeros_like(x)
        for _ in range(4):  # the map evaluated several times with one normalization, as in a solve
            z = 0.5 * model(z) + x
        outs.append(z.detach())
        opt.zero_grad()
        (z**2).sum().backward()
        opt.step()
    return model, outs


@pytest.mark.parametrize(
    "norm_type,kw",
    [
        ("weight_norm", {}),
        ("spectral_norm", dict(norm_no_scale=True)),
        ("spectral_norm", dict(norm_no_scale=True, norm_clip=True, norm_target_norm=0.3)),
        ("spectral_norm", dict(norm_target_norm=0.7, sn_n_power_iters=2)),
    ],
)
def test_apply_norm_with_reset_norm_matches_torchdeq(norm_type, kw):
    """torchdeq's own apply_norm + reset_norm is the reference: one normalization per reset, the same
    weights, the same training trajectory (a learned spectral scale: the first step only, as torchdeq's
    is one per output unit and deqlab's one scalar)."""
    torchdeq = pytest.importorskip("torchdeq")
    ref, want = _norm_steps(torchdeq, norm_type, dict(args=kw))
    uv = None
    if norm_type == "spectral_norm":
        fresh, _ = _norm_model()
        torchdeq.apply_norm(fresh, norm_type, args=kw)  # the same draws of u, v as ref's
        uv = {i: (fresh[i].weight_u.clone(), fresh[i].weight_v.clone()) for i in (0, 2)}
    got_model, got = _norm_steps(ours, norm_type, kw, copy_uv=uv)
    learned = norm_type == "spectral_norm" and "norm_no_scale" not in kw
    # torchdeq's learned spectral scale g is a float32 parameter (so is g / sigma): float32 agreement there
    tol = dict(atol=1e-7, rtol=1e-6) if learned else dict(atol=1e-12, rtol=1e-10)
    for a, b in zip(want[:1] if learned else want, got):
        torch.testing.assert_close(b, a, **tol)
