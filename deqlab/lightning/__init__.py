"""PyTorch Lightning integration: the DEQ training module, TensorBoard callbacks and the ``deqlab`` CLI.

Importing this imports Lightning; ``import deqlab`` alone does not.
"""
from deqlab.lightning.callbacks import ConvergenceFigure, NFEHistogram
from deqlab.lightning.module import DEQLightningModule, DEQTrainingConfig, find_deq_layers

__all__ = ["ConvergenceFigure", "DEQLightningModule", "DEQTrainingConfig", "NFEHistogram", "find_deq_layers"]
