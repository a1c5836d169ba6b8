"""The ``deqlab`` command: Lightning's CLI over every deqlab model and data module.

``deqlab fit --config experiments/digits.yaml`` trains; ``deqlab test --config ... --ckpt_path ...``
evaluates; ``deqlab fit --help`` lists the options. Models and data modules are chosen by class path
(``model.class_path: deqlab.zoo.MNISTDenseDEQ``), so a config names the same class a Python user
imports, and jsonargparse checks every key and type against the constructors' signatures: an unknown
key or a wrong type stops the run before anything is built, naming the key.
"""
from __future__ import annotations

from typing import List, Optional

import pytorch_lightning as pl
from jsonargparse import lazy_instance
from pytorch_lightning.cli import LightningCLI
from pytorch_lightning.loggers import TensorBoardLogger

from deqlab.lightning.module import DEQLightningModule

__all__ = ["DEQLightningCLI", "main"]

#: Where the CLI writes TensorBoard logs unless a config says otherwise.
DEFAULT_LOG_DIR = "runs"


class DEQLightningCLI(LightningCLI):
    """``LightningCLI`` in subclass mode for models (any ``DEQLightningModule``) and data modules, with a
    TensorBoard logger (``runs/<experiment>``, HParams metrics instead of Lightning's ``hp_metric``) by
    default."""

    def __init__(self, args: Optional[List[str]] = None, **kwargs) -> None:
        # make the zoo and the data modules importable by short class name (``class_path: DigitsDEQ``)
        import deqlab.data  # noqa: F401
        import deqlab.zoo  # noqa: F401

        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        trainer_defaults = dict(kwargs.pop("trainer_defaults", None) or {})
        trainer_defaults.setdefault(
            "logger", lazy_instance(TensorBoardLogger, save_dir=DEFAULT_LOG_DIR, name="deqlab", default_hp_metric=False)
        )
        super().__init__(DEQLightningModule, pl.LightningDataModule, trainer_defaults=trainer_defaults, args=args, **kwargs)


def main(args: Optional[List[str]] = None) -> None:
    """Entry point of the ``deqlab`` console script (``args=None`` reads ``sys.argv``)."""
    DEQLightningCLI(args=args)


if __name__ == "__main__":  # pragma: no cover
    main()
