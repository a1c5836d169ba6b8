"""Solver configuration without ambiguity (issue 7): one way to set each tolerance, nothing dropped silently."""

import pytest
import torch

from deqlab.solvers import (
    ContinuousDEQSolver,
    DiscreteDEQSolver,
    Solver,
    TerminationCondition,
    available_solvers,
    get_solver,
)

F64 = torch.float64
FLAT = {"mode": "abs_norm", "abstol_termination": 1e-7, "reltol_termination": 1e-6, "norm": "rms"}


@pytest.mark.parametrize("name", available_solvers())
def test_every_registered_solver_satisfies_the_solver_protocol(name):
    s = get_solver(name)
    assert isinstance(s, Solver)
    assert isinstance(s.termination, TerminationCondition)
    assert s.termination.norm in ("l2", "rms") and s.termination.tol > 0


@pytest.mark.parametrize("cls", [DiscreteDEQSolver, ContinuousDEQSolver])
@pytest.mark.parametrize("key", sorted(FLAT))
def test_termination_object_with_a_flat_keyword_raises_naming_it(cls, key):
    cond = TerminationCondition("abs_norm", abstol=1e-9)
    with pytest.raises(ValueError, match=key):
        cls(termination=cond, **{key: FLAT[key]})
    # even a flat value equal to the default is ambiguous: it was given
    with pytest.raises(ValueError, match="not both"):
        cls(termination=cond, norm="l2")


@pytest.mark.parametrize("cls", [DiscreteDEQSolver, ContinuousDEQSolver])
def test_termination_object_with_all_flat_keywords_names_all(cls):
    with pytest.raises(ValueError) as err:
        cls(termination=TerminationCondition(), **FLAT)
    for key in FLAT:
        assert key in str(err.value)


@pytest.mark.parametrize("cls", [DiscreteDEQSolver, ContinuousDEQSolver])
def test_termination_object_alone_is_used_as_is(cls):
    cond = TerminationCondition("abs_deq_best", abstol=1e-9, reltol=1e-8, norm="rms", patience=7)
    s = cls(termination=cond)
    assert s.termination is cond
    with pytest.raises(TypeError, match="TerminationCondition"):
        cls(termination="abs_norm")


@pytest.mark.parametrize("cls", [DiscreteDEQSolver, ContinuousDEQSolver])
def test_flat_keywords_build_the_condition(cls):
    s = cls(**FLAT)
    t = s.termination
    assert (t.mode, t.abstol, t.reltol, t.norm) == ("abs_norm", 1e-7, 1e-6, "rms")


def test_discrete_defaults_unchanged():
    t = DiscreteDEQSolver().termination
    assert (t.mode, t.abstol, t.reltol, t.norm) == ("rel_deq_default", 1e-3, 1e-3, "l2")


def test_discrete_refuses_bare_abstol_with_the_right_name():
    with pytest.raises(TypeError, match="abstol_termination"):
        DiscreteDEQSolver("anderson", abstol=1e-5)
    with pytest.raises(TypeError, match="reltol_termination"):
        DiscreteDEQSolver("anderson", reltol=1e-5)


def test_continuous_ode_tolerances_have_their_own_names():
    s = ContinuousDEQSolver("tsit5", ode_abstol=1e-6, ode_reltol=1e-5)
    assert (s.ode_abstol, s.ode_reltol) == (1e-6, 1e-5)
    with pytest.warns(DeprecationWarning, match=r"\.abstol is deprecated; use \.ode_abstol"):
        assert s.abstol == 1e-6  # the old readable names still read the ODE tolerances, and say so
    with pytest.warns(DeprecationWarning, match=r"\.reltol is deprecated; use \.ode_reltol"):
        assert s.reltol == 1e-5
    # termination tolerances default to the ODE tolerances, as before
    assert (s.termination.abstol, s.termination.reltol) == (1e-6, 1e-5)
    s = ContinuousDEQSolver("tsit5", ode_abstol=1e-6, abstol_termination=1e-4)
    assert s.termination.abstol == 1e-4 and s.ode_abstol == 1e-6 and s.termination.reltol == 1e-3
    d = ContinuousDEQSolver()
    assert (d.ode_abstol, d.ode_reltol, d.termination.abstol, d.termination.reltol) == (1e-3,) * 4


def test_continuous_old_names_are_deprecated_aliases():
    with pytest.warns(DeprecationWarning, match="abstol= is deprecated; use ode_abstol="):
        old = ContinuousDEQSolver("dopri5", abstol=1e-7, reltol=1e-6)
    new = ContinuousDEQSolver("dopri5", ode_abstol=1e-7, ode_reltol=1e-6)
    assert (old.ode_abstol, old.ode_reltol) == (new.ode_abstol, new.ode_reltol) == (1e-7, 1e-6)
    assert repr(old) == repr(new)
    # both aliases lead to the same solve
    f = lambda z: 0.5 * z + 1  # noqa: E731
    z0 = torch.zeros(2, 3, dtype=F64)
    r_old, r_new = old(f, z0), new(f, z0)
    assert r_old.nfe == r_new.nfe and torch.equal(r_old.z, r_new.z)


@pytest.mark.parametrize("new,old", [("ode_abstol", "abstol"), ("ode_reltol", "reltol")])
def test_continuous_alias_and_new_name_together_raise(new, old):
    with pytest.raises(ValueError, match=new) as err:
        ContinuousDEQSolver(**{new: 1e-4, old: 1e-4})
    assert old in str(err.value)


def test_continuous_ode_tolerances_with_termination_object_are_fine():
    cond = TerminationCondition("abs_norm", abstol=1e-5)
    s = ContinuousDEQSolver(ode_abstol=1e-8, ode_reltol=1e-8, termination=cond)
    assert s.termination is cond and s.ode_abstol == 1e-8


def test_continuous_tolerance_validation_names_the_new_option():
    with pytest.raises(ValueError, match="ode_abstol"):
        ContinuousDEQSolver(ode_abstol=-1.0)
    with pytest.raises(ValueError, match="ode_reltol"), pytest.warns(DeprecationWarning):
        ContinuousDEQSolver(reltol=float("nan"))
    with pytest.raises(ValueError, match="both be 0"):
        ContinuousDEQSolver(ode_abstol=0.0, ode_reltol=0.0)


def test_reprs_name_each_tolerance_once():
    r = repr(ContinuousDEQSolver("tsit5", ode_abstol=1e-6, ode_reltol=1e-5, abstol_termination=1e-4))
    assert "ode_abstol=1e-06" in r and "ode_reltol=1e-05" in r and "abstol_termination=0.0001" in r
    assert " abstol=" not in r and " reltol=" not in r
    r = repr(DiscreteDEQSolver("anderson", mode="abs_norm", abstol_termination=1e-6, norm="rms"))
    assert "abstol_termination=1e-06" in r and "norm='rms'" in r


def test_registry_accepts_both_spellings():
    c = get_solver("continuous", ode_abstol=1e-5, ode_reltol=1e-4)
    assert c.termination.abstol == 1e-5 and c.termination.reltol == 1e-4
    with pytest.raises(ValueError, match="not both"):
        get_solver("anderson", termination=TerminationCondition(), mode="abs")


@pytest.mark.parametrize(
    "make, kw, needle",
    [
        (
            lambda **kw: DiscreteDEQSolver("lbroyden", **kw),
            {"abstol_termnation": 1e-3},
            "did you mean 'abstol_termination'",
        ),
        (lambda **kw: DiscreteDEQSolver("anderson", **kw), {"memroy": 3}, "did you mean 'memory'"),
        (lambda **kw: DiscreteDEQSolver("lbroyden", **kw), {"tol": 1e-3}, "two tolerances: abstol_termination"),
        (lambda **kw: ContinuousDEQSolver(**kw), {"tol": 1e-3}, "two tolerances"),
        (lambda **kw: ContinuousDEQSolver(**kw), {"ode_abstl": 1e-3}, "did you mean 'ode_abstol'"),
    ],
)
def test_a_misspelt_option_names_the_closest_and_the_solvers_own_options(make, kw, needle):
    with pytest.raises(TypeError) as err:
        make(**kw)
    text = str(err.value)
    assert needle in text and "Valid:" in text
    assert "max_steps" in text  # the solver's own options are listed, not only the algorithm's
