"""``DEQLightningCLI``: Lightning's CLI over every ``DEQLightningModule`` and data module.

Models and data modules are chosen by class path (``model.class_path: deqlab.zoo.DigitsDEQ``), so a config
names the same class a Python user imports, and jsonargparse checks every key and type against the
constructors' signatures: an unknown key or a wrong type stops the run before anything is built, naming
the key. Solvers, termination conditions and backward modes are objects in the config too
(``solver: {class_path: deqlab.solvers.DiscreteDEQSolver, init_args: {...}}``).

This module imports no model: a full class path imports its module. The ``deqlab`` console command
(`deqlab.cli.main`, one layer above) additionally imports the zoo and the data modules so that short
class names (``class_path: DigitsDEQ``) resolve; nothing here imports it back.
"""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

import pytorch_lightning as pl
from jsonargparse import lazy_instance
from pytorch_lightning.cli import LightningCLI
from pytorch_lightning.loggers import TensorBoardLogger

from deqlab._compat import moved_attribute
from deqlab.lightning.module import DEQLightningModule

__all__ = ["DEFAULT_LOG_DIR", "DEQLightningCLI"]

#: Where the CLI writes TensorBoard logs unless a config says otherwise.
DEFAULT_LOG_DIR = "runs"


class DEQLightningCLI(LightningCLI):
    """``LightningCLI`` in subclass mode for models (any ``DEQLightningModule``) and data modules, with a
    TensorBoard logger (``runs/<experiment>``, HParams metrics instead of Lightning's ``hp_metric``) by
    default.

    Args:
        args: the command line (``["fit", "--config", "experiments/digits.yaml"]``). Default ``None``:
            ``sys.argv``, as for a console script.
        **kwargs: passed to ``LightningCLI`` (``run=False`` to only build the objects, ``trainer_defaults``,
            ...). ``subclass_mode_model``, ``subclass_mode_data`` (``True``: any subclass by class path) and
            ``save_config_kwargs`` (``{"overwrite": True}``: a rerun into the same directory does not stop
            on the previous run's ``config.yaml``) default here; ``trainer_defaults`` gets the TensorBoard
            logger unless it names a ``logger``.

    Examples:
        >>> from deqlab.lightning.cli import DEQLightningCLI
        >>> cli = DEQLightningCLI(run=False, seed_everything_default=False, args=[
        ...     "--model=deqlab.zoo.DigitsDEQ", "--model.width=8", "--model.training.lr=0.01",
        ...     "--data=deqlab.data.DigitsDataModule", "--trainer.logger=false", "--trainer.max_epochs=1"])
        >>> type(cli.model).__name__, cli.model.deq_config.lr, cli.model.deq_config.weight_decay
        ('DigitsDEQ', 0.01, 1e-05)
        >>> cli.trainer.max_epochs
        1
    """

    def __init__(self, args: Optional[List[str]] = None, **kwargs) -> None:
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        trainer_defaults = dict(kwargs.pop("trainer_defaults", None) or {})
        trainer_defaults.setdefault(
            "logger", lazy_instance(TensorBoardLogger, save_dir=DEFAULT_LOG_DIR, name="deqlab", default_hp_metric=False)
        )
        super().__init__(
            DEQLightningModule, pl.LightningDataModule, trainer_defaults=trainer_defaults, args=args, **kwargs
        )

    def instantiate_classes(self) -> None:
        """Build the configured objects; a value a constructor rejects ends the run with one line naming the
        config key, the class and the constructor's own reason (``error: model.init_args.solver
        (deqlab.solvers.DiscreteDEQSolver): abstol_termination must be ...``), as a misspelt key does,
        instead of jsonargparse's chained traceback ending in ``Given value: Namespace(...)``. Every
        constructor runs here, before any data is set up, so a bad ``lr`` stops the run at once."""
        try:
            super().instantiate_classes()
        except (ValueError, TypeError) as err:
            cause = constructor_error(err)
            if cause is None:
                raise
            where = config_key(self.config, cause)
            import sys

            sys.stderr.write(f"{self.parser.prog}: error: {where}{type(cause).__name__}: {cause}\n")
            raise SystemExit(2) from None


def constructor_error(err: BaseException) -> Optional[BaseException]:
    """The exception a configured constructor raised, found under jsonargparse's wrapping errors (the last
    link of the ``__cause__`` / ``__context__`` chain raised outside jsonargparse), or ``None`` when the
    error did not come from a constructor."""
    seen = set()
    found: Optional[BaseException] = None
    stack = [err]
    while stack:
        e = stack.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        tb = e.__traceback__
        last = None
        while tb is not None:
            last = tb
            tb = tb.tb_next
        if last is not None and "jsonargparse" not in last.tb_frame.f_code.co_filename:
            found = e
        stack.extend(x for x in (e.__cause__, e.__context__) if x is not None)
    return found


def _constructor_codes(cls: type) -> set:
    """The code objects of every ``__init__`` / ``__post_init__`` that constructing ``cls`` may run (its own
    and its bases'; a wrapper's inner function too, through ``__wrapped__``)."""
    codes = set()
    for klass in cls.__mro__:
        for name in ("__init__", "__post_init__"):
            fn = vars(klass).get(name)
            while fn is not None:
                code = getattr(fn, "__code__", None)
                if code is not None:
                    codes.add(code)
                fn = getattr(fn, "__wrapped__", None)
    return codes


def _class_path_entries(config: Any) -> List[Tuple[str, type]]:
    """``(key, class)`` for every ``class_path`` entry of a (LightningCLI) config, outermost first; the
    ``fit.`` / ``validate.`` ... subcommand prefix is dropped from the key."""
    import importlib

    entries: List[Tuple[str, type]] = []

    def resolve(class_path: Any) -> Optional[type]:
        if not isinstance(class_path, str) or "." not in class_path:
            return None
        module, _, name = class_path.rpartition(".")
        try:
            found = getattr(importlib.import_module(module), name, None)
        except ImportError:
            return None
        return found if isinstance(found, type) else None

    def visit(node: Any, path: str) -> None:
        for key, value in node.items() if hasattr(node, "items") else []:
            sub = f"{path}.{key}" if path else str(key)
            if hasattr(value, "items"):
                cls = resolve(value.get("class_path"))
                if cls is not None:
                    head, _, rest = sub.partition(".")
                    entries.append((rest if head in ("fit", "validate", "test", "predict") and rest else sub, cls))
                visit(value, sub)

    visit(config.as_dict() if hasattr(config, "as_dict") else config, "")
    return entries


def config_key(config: Any, err: BaseException) -> str:
    """``"model.init_args.solver (deqlab.solvers.DiscreteDEQSolver): "`` for the class_path entry of
    ``config`` whose constructor raised ``err``, or ``""`` when it cannot be told (the class and reason
    still say what to fix).

    The constructor is told by code, not by reading frames: the outermost frame of ``err``'s traceback
    that runs an ``__init__`` / ``__post_init__`` of a configured class names that entry (the innermost
    entry when several configured classes share it)."""
    try:
        entries = _class_path_entries(config)
    except Exception:  # pragma: no cover - a config shape this walk does not know
        return ""
    codes = [(key, cls, _constructor_codes(cls)) for key, cls in entries]
    tb = err.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        matches = [(key, cls) for key, cls, own in codes if code in own]
        if matches:
            key, cls = matches[-1]
            return f"{key} ({cls.__module__}.{cls.__qualname__}): "
        tb = tb.tb_next
    return ""


def __getattr__(name: str) -> Any:
    # ``deqlab.lightning.cli.main`` was an alias of the console command ``deqlab.cli.main``
    return moved_attribute(__name__, name, {"main": ("deqlab.cli", "main")})
