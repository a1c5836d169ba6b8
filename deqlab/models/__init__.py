"""The paper's models (arXiv 2201.12240) as plain ``nn.Module`` networks built from deqlab's public layers.

Pure torch: importing this package never imports Lightning. Every network follows the contract of
[`deqlab.zoo.DEQClassifier`][deqlab.zoo.DEQClassifier]: ``forward(x) -> (logits, solution)`` and ``explicit_forward(x)`` (the
u0-only logits of Skip models, ``None`` otherwise). Train one with
``DEQClassifier(build_model(...), **training_kwargs)``; [`paper_settings`][deqlab.models.paper_settings] gives the paper's training
settings.
"""

from deqlab.models._build import MODEL_TYPES, SOLVER_KINDS, PaperNetwork, count_parameters
from deqlab.models.builder import EXPERIMENTS, build_model
from deqlab.models.settings import PROTOCOLS, TRAINING_KEYS, paper_settings, protocol_summary

__all__ = [
    "build_model",
    "paper_settings",
    "count_parameters",
    "EXPERIMENTS",
    "MODEL_TYPES",
    "SOLVER_KINDS",
    "TRAINING_KEYS",
    "PaperNetwork",
    "PROTOCOLS",
    "protocol_summary",
]
