"""Checkpoints that resume exactly and fail loudly.

Two jobs, both invisible until something goes wrong:

* `check_checkpoint_file`: a truncated (killed mid-write), empty or overwritten checkpoint would
  otherwise surface as ``PytorchStreamReader failed reading zip archive`` without a file name; this check
  names the file and says it is damaged, before Lightning or ``load_from_checkpoint`` reads it.
  `damage_reported_by_name` backs it up around the load itself: whatever damage the check cannot see
  (garbage after an intact header) still reaches the user as a `CheckpointDamagedError` naming the file.
* `rng_state` / `restore_rng_state`: Lightning does not checkpoint the global random number
  generators, so a resumed run would draw different dropout masks and Hutchinson probes than the
  uninterrupted one. The states are stored as plain tensors and tuples, so the checkpoint stays loadable
  with ``torch.load(weights_only=True)``.

The Trainer uses both through the callbacks of `deqlab.lightning.resume` (`CheckpointIntegrity`,
`ExactResume`), which `DEQLightningModule` attaches.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import random
import zipfile
from pathlib import Path
from typing import Any, Dict, Iterator, Union

import numpy as np
import torch

__all__ = [
    "CheckpointDamagedError",
    "check_checkpoint_file",
    "damage_reported_by_name",
    "restore_rng_state",
    "rng_state",
]

PathLike = Union[str, "os.PathLike[str]"]

#: torch's legacy (pre-zip) format begins with a pickled magic number: LONG1, 10 bytes, 0x1950a86a20f9469cfc6c
_LEGACY_MAGIC = b"\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
#: RuntimeError texts with which ``torch.load`` reports an unreadable file
_LOAD_DAMAGE_MARKERS = ("PytorchStreamReader", "inline_container", "magic number")


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
    must match (``zipfile.testzip``, one sequential read of the file) and hold torch's ``data.pkl``. Files
    in torch's legacy non-zip format are accepted when they start with its pickled magic number. Paths
    that are not local files (``s3://...``) and missing files are left to the loader, whose own error is
    clear.

    Args:
        path: the checkpoint file (a string or path-like; a URL is not checked).

    Raises:
        CheckpointDamagedError: when the file is empty, is not a zip archive (nor a legacy torch file), its
            archive cannot be read, a member fails its CRC check, or the archive has no ``data.pkl`` (a zip
            that ``torch.save`` did not write). The message names the file.

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
        head = f.read(32)
    if head[:1] == b"\x80":  # a pickle: torch's legacy (pre-1.6) format, if it starts with torch's magic number
        if _LEGACY_MAGIC in head:
            return
        raise _damaged(
            p,
            f"it starts like a pickle but not like a torch checkpoint ({size} bytes, no torch magic "
            "number): overwritten or not written by torch.save",
        )
    if not zipfile.is_zipfile(p):
        raise _damaged(
            p,
            f"it is not a torch checkpoint archive ({size} bytes, no readable zip directory: "
            "truncated or not written by torch.save)",
        )
    try:
        with zipfile.ZipFile(p) as archive:
            bad = archive.testzip()
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        raise _damaged(p, f"its archive cannot be read ({type(err).__name__}: {err})") from err
    if bad is not None:
        raise _damaged(p, f"the archive member {bad!r} fails its CRC check")
    if not any(name.endswith("/data.pkl") for name in names):
        raise _damaged(
            p,
            f"it is a zip archive without torch's data.pkl ({len(names)} member(s), e.g. "
            f"{names[:3]}): not written by torch.save",
        )


def _is_load_damage(err: BaseException) -> bool:
    """Whether ``torch.load`` failed because the bytes are bad (not because of trust or a missing class)."""
    if isinstance(err, EOFError):
        return True
    if isinstance(err, pickle.UnpicklingError):
        # weights_only=True refusing a class is about trust, not damage: its own message says what to do
        return "Unsupported global" not in str(err)
    return isinstance(err, RuntimeError) and any(m in str(err) for m in _LOAD_DAMAGE_MARKERS)


@contextlib.contextmanager
def damage_reported_by_name(path: PathLike) -> Iterator[None]:
    """Around a checkpoint load: re-raise ``torch.load``'s errors for unreadable bytes as `CheckpointDamagedError`.

    `check_checkpoint_file` catches what the file's structure shows; a file that passes it can still fail
    inside the unpickler (garbage after an intact header), with a raw ``UnpicklingError``, ``EOFError`` or
    ``PytorchStreamReader`` ``RuntimeError`` that names no file. Inside this context those become a
    `CheckpointDamagedError` naming ``path`` (the original error chained); every other error passes
    unchanged, including ``weights_only=True`` refusing an unknown class.

    Args:
        path: the checkpoint file being loaded (named in the error).

    Yields:
        Nothing; the load runs in the ``with`` body.

    Raises:
        CheckpointDamagedError: when the body raises ``EOFError``, an ``UnpicklingError`` other than a
            ``weights_only`` refusal, or a ``RuntimeError`` of torch's archive reader.

    Examples:
        >>> import os, tempfile, torch
        >>> from deqlab.lightning.checkpoint import damage_reported_by_name
        >>> with tempfile.TemporaryDirectory() as root:
        ...     path = os.path.join(root, "last.ckpt")
        ...     with open(path, "wb") as f:
        ...         _ = f.write(b"\\x80\\x02garbage")
        ...     with damage_reported_by_name(path):
        ...         torch.load(path)
        Traceback (most recent call last):
        ...
        deqlab.lightning.checkpoint.CheckpointDamagedError: checkpoint file '...last.ckpt' is damaged: ...
    """
    try:
        yield
    except (EOFError, pickle.UnpicklingError, RuntimeError) as err:
        if not _is_load_damage(err):
            raise
        text = str(err)
        if "WeightsUnpickler error:" in text:  # the cause, not weights_only's generic preamble
            text = text.split("WeightsUnpickler error:", 1)[1]
        detail = next((line.strip() for line in text.splitlines() if line.strip()), "")
        where = Path(os.fspath(path)) if isinstance(path, (str, os.PathLike)) else path
        raise _damaged(where, f"torch.load cannot read it ({type(err).__name__}: {detail[:200]})") from err


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
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
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
    np.random.set_state(
        (npst["kind"], npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"], npst["cached_gaussian"])
    )
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
