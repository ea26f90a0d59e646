"""Checkpoint files that are either complete or absent, whenever the writing process is killed."""

import logging
import os
import zipfile
from pathlib import Path
from typing import IO, Any, Callable, Optional

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _load as pl_load
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH
from typing_extensions import override

from lightning_diloco.io import atomic_write

log = logging.getLogger(__name__)


class CorruptCheckpointError(RuntimeError):
    """A checkpoint file that is truncated or damaged, so that it cannot be loaded."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file next to its final name and renames it into place when complete.

    A process killed at any moment (``SIGKILL``, a node lost, a preempted job) leaves either the previous file under
    the final name or the new, complete one; never a truncated file that looks like a checkpoint. The steps (those of
    :func:`~lightning_diloco.io.atomic_write`) are: write ``.<name>.<pid>@<host>.<token>.tmp`` in the same directory,
    flush and ``fsync`` it, ``os.replace`` it onto the final name (an atomic rename on POSIX file systems), and
    ``fsync`` the directory so the rename survives a power loss. The temporary name starts with a dot and does not end
    in ``.ckpt``, so neither ``ModelCheckpoint`` nor ``ckpt_path="last"`` ever take it for a checkpoint; a temporary
    file left by a killed process of this host is deleted the next time a checkpoint of the same name is written.

    Loading a truncated or damaged file raises :class:`CorruptCheckpointError`, which names the file and says how to
    resume from another one. With ``verify_on_load=True`` (the default) every record's checksum is checked before
    loading, which reads the file twice; without it, a truncated file is still recognised, but damage inside a tensor's
    bytes goes unnoticed.

    Remote paths (``s3://``, ``gs://``, ...) are written by :class:`~lightning.fabric.plugins.io.TorchCheckpointIO`:
    object stores make an upload visible only once it is complete.

    Args:
        verify_on_load: check the checksum of every record of a checkpoint before loading it.

    """

    def __init__(self, verify_on_load: bool = True) -> None:
        super().__init__()
        self.verify_on_load = verify_on_load

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Optional[Any] = None) -> None:
        """Write ``checkpoint`` to ``path`` atomically.

        Args:
            checkpoint: the checkpoint dictionary, as ``torch.save`` takes it.
            path: where the checkpoint goes; an existing file (or symbolic link) of that name is replaced only once
                the new file is complete.
            storage_options: not supported; must be ``None``.

        Raises:
            TypeError: if ``storage_options`` is given.

        """
        if storage_options is not None:
            raise TypeError(
                f"`{type(self).__name__}` does not take `storage_options`, got {storage_options!r}. Pass a custom"
                " `CheckpointIO` plugin to the Trainer if your storage needs options."
            )
        local = _local_path(path)
        if local is None:
            super().save_checkpoint(checkpoint, path)
            return
        local.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(local) as raw:
            file = self._wrap_file(raw)
            torch.save(checkpoint, file)
            file.flush()
        log.debug(f"Saved checkpoint {local} atomically")

    def _wrap_file(self, file: IO[bytes]) -> IO[bytes]:
        """The file object ``torch.save`` writes to; subclasses may wrap it (to count or throttle the bytes)."""
        return file

    @override
    def load_checkpoint(
        self,
        path: _PATH,
        map_location: Optional[Callable] = lambda storage, loc: storage,
        weights_only: Optional[bool] = None,
    ) -> dict[str, Any]:
        """Load the checkpoint at ``path``; a truncated or damaged file raises an error that names it.

        Args:
            path: the checkpoint file (a symbolic link to one is followed).
            map_location: how to remap storage locations, as in ``torch.load``.
            weights_only: passed on to ``torch.load``.

        Raises:
            FileNotFoundError: if there is no file at ``path`` (or the symbolic link at ``path`` is dangling).
            CorruptCheckpointError: if the file is not a complete checkpoint.

        """
        fs = get_filesystem(path)
        if not fs.exists(path):
            raise FileNotFoundError(
                f"Checkpoint file not found: {path}"
                + (" (a symbolic link to a file that no longer exists)" if os.path.islink(str(path)) else "")
                + ". Pass the path of an existing checkpoint as `ckpt_path`."
            )
        if self.verify_on_load and (reason := _damage(path)) is not None:
            raise _corrupt(path, reason)
        try:
            return pl_load(path, map_location=map_location, weights_only=weights_only)
        except Exception as err:
            if (reason := _damage(path)) is None:
                raise
            raise _corrupt(path, reason) from err


def _corrupt(path: _PATH, reason: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"The checkpoint {path} is not a complete checkpoint: {reason}. It was cut short or damaged after it was"
        " written (for example copied while still being written, or written by a tool that does not write atomically"
        " onto a full disk). Move it out of the checkpoint directory (or delete it) and resume from an earlier"
        " checkpoint: pass that file as `ckpt_path`, or, with `ckpt_path='last'`, make sure the newest `last*.ckpt` in"
        " the directory is a complete one."
    )


def _local_path(path: _PATH) -> Optional[Path]:
    """``path`` as a local ``Path``, or ``None`` when it lives on a remote file system."""
    text = str(path)
    if text.startswith("file://"):
        return Path(text[len("file://") :])
    if "://" in text:
        return None
    return Path(text)


def _damage(path: _PATH) -> Optional[str]:
    """Why the file at ``path`` is not a complete ``torch.save`` archive, or ``None`` if nothing is wrong with it."""
    local = _local_path(path)
    if local is None:
        return None
    try:
        size = local.stat().st_size
        if size == 0:
            return "the file is empty"
        with open(local, "rb") as file:
            if file.read(4) != b"PK\x03\x04":
                return None  # not the zip format of `torch.save` (e.g. its legacy format): nothing to check
        with zipfile.ZipFile(local) as archive:
            bad = archive.testzip()
    except zipfile.BadZipFile:
        return f"it has {size} bytes and ends before the archive's table of contents: it was truncated"
    except (OSError, EOFError, RuntimeError, ValueError) as err:
        return f"reading it fails: {err}"
    if bad is not None:
        return f"its record {bad!r} does not match its checksum"
    return None
