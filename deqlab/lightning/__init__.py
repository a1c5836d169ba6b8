"""PyTorch Lightning integration: the DEQ training module, its typed training settings, TensorBoard
callbacks and the ``deqlab`` CLI.

Importing this imports Lightning; ``import deqlab`` alone does not. Nothing here imports the model zoo
(``deqlab.zoo``) or the paper networks: the arrows run from the models to this package, never back.
"""
from deqlab.lightning._stats import StepRecord
from deqlab.lightning.callbacks import ConvergenceFigure, NFEHistogram
from deqlab.lightning.config import DEQTrainingConfig
from deqlab.lightning.module import DEQLightningModule, find_deq_layers

__all__ = [
    "ConvergenceFigure",
    "DEQLightningModule",
    "DEQTrainingConfig",
    "NFEHistogram",
    "StepRecord",
    "find_deq_layers",
]
