"""Checkpoints that resume exactly and fail loudly.

Two jobs, both invisible until something goes wrong:

* `check_checkpoint_file`: a truncated (killed mid-write), empty or overwritten checkpoint would
  otherwise surface as ``PytorchStreamReader failed reading zip archive`` without a file name; this check
  names the file and says it is damaged, before Lightning or ``load_from_checkpoint`` reads it.
* `rng_state` / `restore_rng_state`: Lightning does not checkpoint the global random number
  generators, so a resumed run would draw different dropout masks and Hutchinson probes than the
  uninterrupted one. The states are stored as plain tensors and tuples, so the checkpoint stays loadable
  with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import os
import random
import zipfile
from pathlib import Path
from typing import Any, Dict, Union

import numpy as np
import torch

__all__ = ["CheckpointDamagedError", "check_checkpoint_file", "restore_rng_state", "rng_state"]

PathLike = Union[str, "os.PathLike[str]"]


class CheckpointDamagedError(ValueError):
    """A checkpoint file exists but cannot be a complete checkpoint (empty, truncated, corrupted).

    A ``ValueError`` subclass, so code that already catches a bad-value error from loading keeps working;
    catch this class to fall back to another checkpoint.

    Examples:
        >>> from deqlab.lightning.checkpoint import CheckpointDamagedError
        >>> issubclass(CheckpointDamagedError, ValueError)
        True
    """


def _damaged(path: Path, why: str) -> CheckpointDamagedError:
    return CheckpointDamagedError(
        f"checkpoint file {str(path)!r} is damaged: {why}. It was probably cut off while being written (a killed "
        "run, a full disk) or overwritten; resume from another checkpoint (e.g. an earlier "
        "ModelCheckpoint(every_n_train_steps=...) file) and delete this one"
    )


def check_checkpoint_file(path: PathLike) -> None:
    """Raise `CheckpointDamagedError` naming ``path`` unless it looks like a complete torch checkpoint.

    ``torch.save`` writes a zip archive: the archive's directory must be readable and every member's CRC
    must match (``zipfile.testzip``, one sequential read of the file). Files in torch's legacy non-zip
    format are accepted when they start like a pickle. Paths that are not local files (``s3://...``) and
    missing files are left to the loader, whose own error is clear.

    Args:
        path: the checkpoint file (a string or path-like; a URL is not checked).

    Raises:
        CheckpointDamagedError: when the file is empty, is not a zip archive (nor a legacy pickle), its
            archive cannot be read, or a member fails its CRC check. The message names the file.

    Examples:
        >>> import os, tempfile, torch
        >>> from deqlab.lightning.checkpoint import check_checkpoint_file
        >>> with tempfile.TemporaryDirectory() as root:
        ...     path = os.path.join(root, "last.ckpt")
        ...     torch.save({"state_dict": {}}, path)
        ...     check_checkpoint_file(path)  # complete: returns quietly
        ...     with open(path, "r+b") as f:
        ...         _ = f.truncate(100)  # as if the run was killed mid-write
        ...     check_checkpoint_file(path)
        Traceback (most recent call last):
        ...
        deqlab.lightning.checkpoint.CheckpointDamagedError: checkpoint file '...last.ckpt' is damaged: ...
    """
    text = os.fspath(path)
    if "://" in text:
        return
    p = Path(text)
    if not p.is_file():
        return
    size = p.stat().st_size
    if size == 0:
        raise _damaged(p, "the file is empty (0 bytes)")
    with open(p, "rb") as f:
        head = f.read(4)
    if head[:2] == b"\x80\x02" or head[:1] == b"\x80":  # legacy (pre-1.6) torch.save format: a pickle
        return
    if not zipfile.is_zipfile(p):
        raise _damaged(p, f"it is not a torch checkpoint archive ({size} bytes, no readable zip directory: "
                          "truncated or not written by torch.save)")
    try:
        with zipfile.ZipFile(p) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        raise _damaged(p, f"its archive cannot be read ({type(err).__name__}: {err})") from err
    if bad is not None:
        raise _damaged(p, f"the archive member {bad!r} fails its CRC check")


def rng_state() -> Dict[str, Any]:
    """The global RNG states of torch (CPU and every CUDA device), numpy and Python, as plain data.

    Returns:
        The states as ``{"torch": ..., "numpy": {...}, "python": ...}`` (plus ``"cuda"`` once CUDA is
            initialised): tensors, numbers, strings and tuples only, so ``torch.load(weights_only=True)``
            reads it back.

    Examples:
        >>> import torch
        >>> from deqlab.lightning.checkpoint import restore_rng_state, rng_state
        >>> state = rng_state()
        >>> {"torch", "numpy", "python"} <= set(state)  # and "cuda" once CUDA is in use
        True
        >>> first = torch.rand(2)
        >>> restore_rng_state(state)
        >>> torch.equal(torch.rand(2), first)
        True
    """
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: Dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Dict[str, Any]) -> None:
    """Set the global RNGs back to `rng_state`'s ``state``.

    CUDA states are restored only when the machine has as many CUDA devices as the saved state (a run
    resumed on a different machine keeps its fresh CUDA generators rather than failing).

    Args:
        state: what `rng_state` returned (possibly after a ``torch.save`` / ``torch.load`` round trip).

    Examples:
        >>> import random
        >>> from deqlab.lightning.checkpoint import restore_rng_state, rng_state
        >>> state = rng_state()
        >>> first = random.random()
        >>> restore_rng_state(state)
        >>> random.random() == first
        True
    """
    torch.set_rng_state(state["torch"].cpu())
    npst = state["numpy"]
    np.random.set_state((npst["kind"], npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"],
                         npst["cached_gaussian"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
