"""The ``deqlab`` command: ``deqlab fit --config experiments/digits.yaml``.

``deqlab fit`` trains, ``deqlab test --config ... --ckpt_path ...`` evaluates, ``deqlab fit --help`` lists
the options (see `deqlab.lightning.cli.DEQLightningCLI`). This entry point sits above the model zoo
and the data modules: it imports them so that configs may name their classes by short name
(``class_path: DigitsDEQ``); ``deqlab.lightning`` itself never imports them.
"""

from __future__ import annotations

from typing import List, Optional

__all__ = ["main"]


def main(args: Optional[List[str]] = None) -> None:
    """Entry point of the ``deqlab`` console script (``args=None`` reads ``sys.argv``)."""
    import deqlab.data  # registers the data modules' short class names
    import deqlab.zoo  # noqa: F401  (registers the zoo models' short class names)
    from deqlab.lightning.cli import DEQLightningCLI

    DEQLightningCLI(args=args)


if __name__ == "__main__":  # pragma: no cover
    main()
