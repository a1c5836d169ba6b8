"""Hyperparameters of a `DEQLightningModule`: the constructor arguments it records, and the HParams tab that
shows them.

Recording: ``load_from_checkpoint`` rebuilds a model from the arguments of its *most-derived* constructor
(``**kwargs`` included). Lightning's ``save_hyperparameters()`` without arguments merges every ``__init__`` of
the chain instead (an intermediate class's arguments that a subclass fixes would be passed twice), and
finding the outermost call among the caller's stack frames broke when a model was built inside another
``__init__``. Here `records_init_arguments` wraps each subclass's ``__init__`` (from
``DEQLightningModule.__init_subclass__``) so that the outermost call binds its own arguments with
``inspect.signature(...).bind`` before anything runs; `save_init_arguments` hands them to Lightning's
public ``save_hyperparameters``. No frame is read here, nothing of Lightning's is patched.

The tab: `HParamsTab` writes the hyperparameters with placeholder ``hp/`` metrics to every TensorBoard
logger when fitting starts, and the validation accuracy as ``hp/val_accuracy`` after each validation.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, cast

import pytorch_lightning as pl
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn
from torchmetrics import Metric

from deqlab.spec.training import DEQTrainingConfig

__all__ = ["HPARAM_METRICS", "HParamsTab", "init_arguments", "records_init_arguments", "save_init_arguments"]

#: Metric names written to TensorBoard's HParams tab (placeholders at fit start, updated per validation).
HPARAM_METRICS: Tuple[str, ...] = ("hp/val_accuracy", "hp/val_loss", "hp/val_nfe")

#: Where the outermost constructor call leaves its bound arguments on the instance until the base reads them.
_ARGUMENTS = "_deqlab_init_arguments"


def _bound(signature: inspect.Signature, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The call's arguments by name, defaults applied, ``**kwargs`` merged, ``self`` and ``*args`` dropped (a
    positional rest cannot be passed back by name); ``None`` when they do not fit the signature (the
    constructor then raises its own ``TypeError``)."""
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    params = list(signature.parameters.values())
    out: Dict[str, Any] = {}
    for param in params[1:]:  # params[0] is self
        if param.name not in bound.arguments or param.kind is inspect.Parameter.VAR_POSITIONAL:
            continue
        value = bound.arguments[param.name]
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        else:
            out[param.name] = value
    return out


def records_init_arguments(init: Callable[..., None]) -> Callable[..., None]:
    """``init`` wrapped so that the outermost constructor call of an instance records its arguments.

    The wrapper of the most-derived ``__init__`` runs first: it binds the call's arguments and leaves them on
    the instance; the wrappers of the base classes' ``__init__`` (reached through ``super().__init__``) see
    them there and only call through; `DEQLightningModule.__init__` reads them (`init_arguments`). The
    signature and the source stay the wrapped function's (``functools.wraps`` and ``__signature__``), so
    LightningCLI, jsonargparse and ``load_from_checkpoint`` (``inspect.getfullargspec``) see the real
    parameters.

    Args:
        init: a class's own ``__init__``.

    Returns:
        The wrapper, to assign as the class's ``__init__``.

    Examples:
        >>> from deqlab.lightning.hparams import init_arguments, records_init_arguments
        >>> class Base:
        ...     def __init__(self, **kwargs):
        ...         self.recorded = init_arguments(self)
        >>> class Model(Base):
        ...     def __init__(self, width: int = 8, **kwargs):
        ...         super().__init__(depth=2, **kwargs)
        >>> Base.__init__, Model.__init__ = records_init_arguments(Base.__init__), records_init_arguments(Model.__init__)
        >>> Model(lr=0.1).recorded
        {'width': 8, 'lr': 0.1}
    """
    try:
        signature = inspect.signature(init)
    except (TypeError, ValueError):  # no signature to bind to (a C callable): the base records its own arguments
        return init

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        if _ARGUMENTS in self.__dict__:  # an inner constructor of the chain: the outermost call recorded
            return init(self, *args, **kwargs)
        self.__dict__[_ARGUMENTS] = _bound(signature, (self, *args), kwargs)
        try:
            init(self, *args, **kwargs)
        finally:
            self.__dict__.pop(_ARGUMENTS, None)

    __init__.__signature__ = signature  # type: ignore[attr-defined]  # also for getfullargspec (load_from_checkpoint)
    return __init__


def init_arguments(obj: Any) -> Optional[Dict[str, Any]]:
    """The arguments of the outermost constructor call running on ``obj`` (``None`` outside one, or when the
    class's ``__init__`` is not wrapped by `records_init_arguments`)."""
    return obj.__dict__.get(_ARGUMENTS)


def save_init_arguments(module: pl.LightningModule, arguments: Mapping[str, Any]) -> None:
    """Record ``arguments`` (a constructor's, by name) as ``module.hparams`` through Lightning's
    ``save_hyperparameters``.

    ``nn.Module`` arguments (a `DEQClassifier`'s network) are left out: their weights are in the state dict,
    as hparams they would be pickled into every checkpoint and written weight by weight into
    ``hparams.yaml``; pass them again to ``load_from_checkpoint``. A `DEQTrainingConfig` is stored as plain
    data, so the checkpoint stays loadable with ``torch.load(weights_only=True)``. When LightningCLI builds
    the model, Lightning's own record (the CLI's resolved configuration, plain data, with the class path and
    the instantiator ``load_from_checkpoint`` and ``--ckpt_path`` rebuild it with) is kept instead.

    Args:
        module: the module being constructed.
        arguments: its constructor's arguments by name.

    Examples:
        >>> from torch import nn
        >>> import pytorch_lightning as pl
        >>> from deqlab.lightning.hparams import save_init_arguments
        >>> class Wrapper(pl.LightningModule):
        ...     def __init__(self, network: nn.Module, width: int = 8):
        ...         super().__init__()
        ...         save_init_arguments(self, {"network": network, "width": width})
        >>> dict(Wrapper(nn.Linear(2, 2)).hparams)
        {'width': 8}
    """
    modules = [k for k, v in arguments.items() if isinstance(v, nn.Module)]
    # under LightningCLI Lightning records the CLI's arguments here (its "_instantiator" entry says so);
    # otherwise it collects the arguments of this __init__ chain, which the recorded call replaces
    module.save_hyperparameters(ignore=modules)
    if "_instantiator" not in module.hparams:
        module.hparams.clear()  # Lightning's save_hyperparameters adds to what is there
        module.save_hyperparameters({k: v for k, v in arguments.items() if k not in modules})
    if isinstance(module.hparams.get("training"), DEQTrainingConfig):
        module.hparams["training"] = module.hparams["training"].as_dict()


class HParamsTab(pl.Callback):
    """TensorBoard's HParams tab for a `DEQLightningModule`: its hyperparameters next to ``hp/`` metrics.

    When fitting starts, every ``TensorBoardLogger`` of the Trainer gets ``pl_module.hparams_for_logging()``
    (the constructor arguments and the effective training settings) with placeholder values of
    ``hp/val_accuracy``, ``hp/val_loss`` and ``hp/val_nfe`` (the tab lists only metrics it was given then);
    after each validation (not the sanity check) ``hp/val_accuracy`` is logged from the module's validation
    accuracy metric (the step logs ``hp/val_loss`` and ``hp/val_nfe``). `DEQLightningModule` attaches one from
    ``configure_callbacks`` when ``log_hparams_metrics`` is on.

    Examples:
        >>> from deqlab.lightning.hparams import HPARAM_METRICS, HParamsTab
        >>> callback = HParamsTab()
        >>> HPARAM_METRICS
        ('hp/val_accuracy', 'hp/val_loss', 'hp/val_nfe')
    """

    def on_fit_start(self, trainer: "pl.Trainer", pl_module: Any) -> None:
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if loggers and callable(getattr(pl_module, "hparams_for_logging", None)):
            for logger in loggers:
                logger.log_hyperparams(pl_module.hparams_for_logging(), {name: 0.0 for name in HPARAM_METRICS})

    def on_validation_epoch_end(self, trainer: "pl.Trainer", pl_module: Any) -> None:
        metrics = getattr(pl_module, "metrics", None)
        if trainer.sanity_checking or not isinstance(metrics, nn.ModuleDict) or "val_accuracy" not in metrics:
            return
        acc = cast(Metric, metrics["val_accuracy"])  # DEQLightningModule's accuracy metric
        if acc.update_count > 0:
            pl_module.log("hp/val_accuracy", acc.compute(), on_step=False, on_epoch=True)
