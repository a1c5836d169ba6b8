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

from typing import Any, List, Optional

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
        super().__init__(DEQLightningModule, pl.LightningDataModule, trainer_defaults=trainer_defaults, args=args, **kwargs)


def __getattr__(name: str) -> Any:
    # ``deqlab.lightning.cli.main`` was an alias of the console command ``deqlab.cli.main``
    return moved_attribute(__name__, name, {"main": ("deqlab.cli", "main")})
