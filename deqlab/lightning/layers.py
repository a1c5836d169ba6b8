"""Finding a network's DEQ layers: the submodules that implement the `deqlab.nn.DEQLayer` protocol.

Why a module of its own: the pretraining schedule, the Jacobian-setting check and a researcher's script all
drive the same layers, found the same way.
"""

from __future__ import annotations

from typing import List

from torch import nn

from deqlab.nn.protocols import DEQLayer

__all__ = ["find_deq_layers"]


def find_deq_layers(module: nn.Module) -> List[nn.Module]:
    """The outermost submodules (not ``module`` itself) that implement the [`deqlab.nn.DEQLayer`][deqlab.nn.DEQLayer]
    protocol: a settable ``fixed_depth``, a ``fixed_depth_mode(depth)`` context manager and a
    ``jacobian_regularization`` flag. deqlab's layers and any researcher's layer with those members are
    found and driven the same way.

    Why outermost only: a layer that wraps another DEQ layer owns it. Its ``fixed_depth_mode`` drives the
    inner layer and its ``jacobian_regularization`` reports the inner term, so driving both would switch
    the inner layer twice and check a flag the wrapper already answers for. The search does not descend
    into a DEQ layer.

    `PretrainingSchedule` drives the layers it finds, and `DEQLightningModule` checks its Jacobian setting
    against them; it is public so that a script can do the same to a plain ``nn.Module``.

    Args:
        module: the network to search (any ``nn.Module``; a DEQ layer nested at any depth is found).

    Returns:
        The DEQ layers in ``module.modules()`` order (registration order, depth first), none of them
            inside another; an empty list for a network without one.

    Examples:
        >>> from deqlab.lightning import find_deq_layers
        >>> from deqlab.zoo import DigitsDEQ
        >>> [type(m).__name__ for m in find_deq_layers(DigitsDEQ(width=8))]
        ['SkipDeepEquilibriumNetwork']
        >>> import torch
        >>> find_deq_layers(torch.nn.Linear(2, 2))
        []
    """
    found: List[nn.Module] = []

    def visit(parent: nn.Module) -> None:
        for child in parent.children():
            if isinstance(child, DEQLayer):
                if all(child is not m for m in found):  # a layer registered twice is one layer
                    found.append(child)
            else:
                visit(child)

    visit(module)
    return found
