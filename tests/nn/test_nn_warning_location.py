"""The DEQ layers' warnings point at the user's line, not at deqlab's or torch's.

Why: a warning names a file and a line; a fixed ``stacklevel`` counted from deqlab's frames lands in
``torch/nn/modules/module.py`` once the layer is called as ``layer(x)`` (``nn.Module.__call__`` adds frames)
or inside another module, and in deqlab itself when a subclass's constructor adds one. Such a warning says
nowhere useful where it comes from, and a ``DeprecationWarning`` is shown by default only when it points at
``__main__``, so a wrong level hides it from a script. Every warning here must name this file.
"""

import warnings

import torch
from torch import nn

from deqlab_nn_helpers import DenseMap, make_solver

from deqlab.nn import DEQ, MultiScaleDeepEquilibriumNetwork, SkipDEQ
from deqlab.solvers import ConvergenceWarning, DiscreteDEQSolver


def _where(caught, category):
    return {(w.filename, w.lineno) for w in caught if issubclass(w.category, category)}


class _Stuck(nn.Module):
    """``f(z, x) = z + x``: no fixed point, every solve ends at its step limit."""

    def forward(self, z, x):
        return 1.0 * z + x


def test_the_convergence_warning_names_the_line_that_called_the_layer():
    layer = DEQ(_Stuck(), DiscreteDEQSolver("fixed_point", max_steps=3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layer(torch.ones(2, 3))  # through nn.Module.__call__
        line = _line_before()
    assert _where(caught, ConvergenceWarning) == {(__file__, line - 1)}


def test_inside_a_users_model_it_names_the_models_forward():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.deq = DEQ(_Stuck(), DiscreteDEQSolver("fixed_point", max_steps=3))

        def forward(self, x):
            z, _ = self.deq(x)
            self.line = _line_before() - 1
            return z

    model = Model()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(torch.ones(2, 3))
    assert _where(caught, ConvergenceWarning) == {(__file__, model.line)}


def test_a_multiscale_layer_names_the_users_line():
    class Main0(nn.Module):  # the finest scale gets the injection
        def forward(self, z, x):
            return z + x

    scales = [(2,), (2,)]
    mapping = [[None, nn.Identity()], [nn.Identity(), None]]  # z1 + z2 feeds both: no fixed point
    layer = MultiScaleDeepEquilibriumNetwork(
        [Main0(), nn.Identity()], mapping, None, DiscreteDEQSolver("fixed_point", max_steps=3), scales
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layer(torch.ones(4, 2))
        line = _line_before()
    assert _where(caught, ConvergenceWarning) == {(__file__, line - 1)}


def test_a_map_with_a_foreign_trainable_tensor_is_reported_at_the_users_line():
    weight = torch.ones(3, requires_grad=True)  # not a parameter of the map: the implicit backward misses it

    class Map(nn.Module):
        def forward(self, z, x):
            return 0.5 * z * weight + x

    layer = DEQ(Map(), make_solver("anderson"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layer(torch.ones(2, 3, requires_grad=True))[0].sum().backward()
        line = _line_before()
    assert _where(caught, RuntimeWarning) == {(__file__, line - 1)}


def test_deprecated_constructor_spellings_name_the_users_line_also_through_a_subclass():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        DEQ(DenseMap(3), make_solver("anderson"), z_shape=(3,))
        first = _line_before() - 1
        DEQ(DenseMap(3), make_solver("anderson"), shortcut=nn.Linear(3, 3))
        second = _line_before() - 1

        class MyDEQ(DEQ):  # one constructor frame more
            def __init__(self):
                super().__init__(DenseMap(3), make_solver("anderson"), initializer=torch.zeros_like)

        MyDEQ()
        third = _line_before() - 1
    where = _where(caught, DeprecationWarning)
    # the subclass's __init__ is the user's code too: the warning names its super().__init__ line
    assert where == {(__file__, first), (__file__, second), (__file__, third - 2)}, where


def test_an_old_checkpoint_names_the_users_load_state_dict_line():
    src = SkipDEQ(DenseMap(4, 3), make_solver("anderson"), nn.Linear(3, 4))
    old_style = {"deq." + k.replace("init.shortcut.", "shortcut."): v for k, v in src.state_dict().items()}
    wrapped = nn.ModuleDict({"deq": SkipDEQ(DenseMap(4, 3), make_solver("anderson"), nn.Linear(3, 4))})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wrapped.load_state_dict(old_style)  # torch's loader calls deqlab's hook: many frames in between
        line = _line_before()
    assert _where(caught, DeprecationWarning) == {(__file__, line - 1)}


def _line_before() -> int:
    """The caller's current line number (the line after the call whose warning is checked)."""
    import inspect

    return inspect.currentframe().f_back.f_lineno
