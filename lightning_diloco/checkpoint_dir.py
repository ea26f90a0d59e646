"""Checkpoint directories: every rank writes its own part in parallel, and the whole appears at once or not at all.

A checkpoint of DiLoCo's training state is a directory at the checkpoint's path (``epoch=0-step=500.ckpt/``):

- ``meta.pt``: what rank 0 alone holds, small: Lightning's loop and callback state, the hyperparameters and the
  ``"diloco"`` entry's counters and layout (written through the strategy's ``CheckpointIO``);
- ``.metadata`` and ``__<rank>_0.distcp``: the tensors, written by ``torch.distributed.checkpoint`` (DCP) from every
  rank at once, each rank writing the chunks it holds. A tensor held identically by several ranks (the global weights
  of an unsharded run) is written once; reading takes any layout of chunks to any other, so a run resumes on another
  number of processes per worker from the same files.

:func:`save` writes into a hidden temporary directory beside the final one and moves it into place when every rank is
done: with ``renameat2(RENAME_EXCHANGE)`` where the file system has it (an atomic swap with the previous checkpoint of
that name, such as ``last.ckpt``), else with a rename. A writer killed at any moment leaves the previous checkpoint or
the new, complete one under the final name.

:func:`read` loads a whole directory into one process without any process group (to inspect it, or to
:func:`~lightning_diloco.checkpointing.consolidate` it into one file).
"""

import ctypes
import errno
import os
import secrets
import shutil
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
import torch.distributed
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from lightning_diloco.io import fsync_directory

__all__ = ["META", "is_checkpoint_dir", "keys", "load", "local_directory", "read", "read_meta", "save"]

META = "meta.pt"
_TEMPORARY_SUFFIX = ".tmp"

StrPath = Union[str, os.PathLike[str]]


def is_checkpoint_dir(path: Any) -> bool:
    """Whether ``path`` is a local checkpoint directory (one this module wrote)."""
    text = str(path)
    return "://" not in text and os.path.isdir(text) and os.path.isfile(os.path.join(text, META))


def local_directory(path: Any) -> Path:
    """``path`` as a local directory path; remote paths are refused with what to do."""
    text = str(path)
    if text.startswith("file://"):
        text = text[len("file://") :]
    if "://" in text:
        raise ValueError(
            f"DiLoCo checkpoints are directories that every rank writes in parallel, on a local or mounted file system;"
            f" {path!r} is a remote URL. Give `ModelCheckpoint(dirpath=...)` (or the Trainer's `default_root_dir`) a"
            " path on a shared or mounted file system, and copy finished checkpoints to object storage from there."
        )
    return Path(text)


def save(
    path: StrPath, tensors: dict[str, Any], meta: Optional[dict[str, Any]], write_meta: Callable[[dict[str, Any], str], None],
    agree: Callable[[str], str], barrier: Callable[[], None],
) -> None:
    """Write a checkpoint directory at ``path``; every rank calls this at the same point.

    Args:
        path: the final directory.
        tensors: this rank's flat ``{key: tensor or small object}``; a key on several ranks must hold the same value
            (or ``DTensor`` chunks of one value) on all of them.
        meta: rank 0's ``meta.pt`` content; ``None`` on the other ranks.
        write_meta: writes ``meta`` to a file path (the strategy's ``CheckpointIO.save_checkpoint``).
        agree: returns rank 0's string on every rank (a broadcast).
        barrier: waits for every rank.

    """
    final = local_directory(path)
    temporary = Path(agree(str(final.parent / f".{final.name}.{secrets.token_hex(4)}{_TEMPORARY_SUFFIX}")))
    if meta is not None:
        final.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(final)
        temporary.mkdir()
    barrier()
    # collective; rank 0 writes `.metadata` once every rank is done
    with _one_process_is_meant():
        dcp.save(tensors, checkpoint_id=temporary, no_dist=not _distributed())
    if meta is not None:
        write_meta(meta, str(temporary / META))
        fsync_directory(temporary)
        _move_into_place(temporary, final)
    barrier()


def load(path: StrPath, targets: dict[str, Any]) -> dict[str, Any]:
    """Fill ``targets`` (this rank's ``{key: tensor}``, ``DTensor`` chunks included) from the checkpoint at ``path``;
    every rank calls this at the same point. Objects that are not tensors come back in the returned dictionary."""
    with _one_process_is_meant():
        dcp.load(targets, checkpoint_id=local_directory(path), no_dist=not _distributed())
    return targets


def keys(path: StrPath) -> dict[str, Optional[tuple[torch.Size, torch.dtype]]]:
    """Every key of the checkpoint's tensors, with its whole shape and dtype (``None`` for an object)."""
    metadata = dcp.FileSystemReader(str(local_directory(path))).read_metadata()
    return {
        key: (value.size, value.properties.dtype) if isinstance(value, TensorStorageMetadata) else None
        for key, value in metadata.state_dict_metadata.items()
    }


def read_meta(path: StrPath, load_file: Callable[[str], dict[str, Any]]) -> dict[str, Any]:
    """``meta.pt`` of the checkpoint at ``path``, read with ``load_file`` (the strategy's ``CheckpointIO``)."""
    return load_file(str(local_directory(path) / META))


def read(path: StrPath, prefixes: Optional[Iterable[str]] = None) -> dict[str, Any]:
    """Every tensor and object of the checkpoint at ``path`` whose key starts with one of ``prefixes`` (all by
    default), whole and on the CPU, in this process alone (no process group needed)."""
    wanted = tuple(prefixes) if prefixes is not None else ("",)
    targets: dict[str, Any] = {}
    for key, layout in keys(path).items():
        if key.startswith(wanted):
            targets[key] = torch.empty(layout[0], dtype=layout[1]) if layout is not None else b""
    if targets:
        with _one_process_is_meant():
            dcp.load(targets, checkpoint_id=local_directory(path), no_dist=True)
    return targets


@contextmanager
def _one_process_is_meant() -> Iterator[None]:
    """Without a process group, DCP warns that it assumes one process: here that is what is meant."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _move_into_place(temporary: Path, final: Path) -> None:
    """Move a complete ``temporary`` directory onto ``final`` atomically, replacing whatever ``final`` was."""
    if os.path.lexists(final):
        if _exchange(temporary, final):
            _remove_any(temporary)  # now the previous checkpoint
        else:
            previous = final.parent / f".{final.name}.{secrets.token_hex(4)}.old{_TEMPORARY_SUFFIX}"
            os.rename(final, previous)
            os.rename(temporary, final)
            _remove_any(previous)
    else:
        os.rename(temporary, final)
    fsync_directory(final.parent)


def _remove_any(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2`` with ``RENAME_EXCHANGE``); ``False`` where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    if ctypes.get_errno() in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EXDEV):
        return False
    raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), str(b))


def _remove_stale_temporaries(final: Path) -> None:
    """Delete temporary directories of ``final`` that killed writers left (the writer of a checkpoint directory is the
    whole run, so whatever a previous run left is stale)."""
    prefix = f".{final.name}."
    try:
        names = os.listdir(final.parent)
    except OSError:
        return
    for name in names:
        if name.startswith(prefix) and name.endswith(_TEMPORARY_SUFFIX):
            shutil.rmtree(final.parent / name, ignore_errors=True)
