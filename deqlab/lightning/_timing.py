"""Wall-clock timing of the phases of a training step.

Why a helper: asynchronous CUDA kernels make a bare ``perf_counter`` measure kernel *launch* time, so
every reading synchronizes the device first when the module runs on CUDA.
"""
from __future__ import annotations

import time
from typing import Dict, Optional

import torch


class PhaseTimer:
    """Start/stop named phases (``forward``, ``backward``, ``optimizer``) and keep the last durations."""

    def __init__(self) -> None:
        self._started: Dict[str, float] = {}
        self.last: Dict[str, float] = {}

    @staticmethod
    def _sync(device: Optional[torch.device]) -> None:
        if device is not None and device.type == "cuda" and torch.cuda.is_available():
            torch.cuda.synchronize(device)

    def start(self, name: str, device: Optional[torch.device] = None) -> None:
        self._sync(device)
        self._started[name] = time.perf_counter()

    def stop(self, name: str, device: Optional[torch.device] = None) -> Optional[float]:
        """Seconds since ``start(name)``; ``None`` when the phase was never started (e.g. a skipped hook)."""
        begun = self._started.pop(name, None)
        if begun is None:
            return None
        self._sync(device)
        elapsed = time.perf_counter() - begun
        self.last[name] = elapsed
        return elapsed
