"""Files that are either complete or absent, whenever the process writing them is killed.

:func:`atomic_write` is the package's one way of writing a file that another process, or a later run, reads: the
checkpoints of :class:`~lightning_diloco.checkpoint_io.AtomicCheckpointIO` and the token cache of
:mod:`lightning_diloco.data`. A reader thus never finds a truncated file under the final name, only the previous
file or the new, complete one.
"""

import errno
import logging
import os
import secrets
import socket
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import IO, Any, Literal, Union, overload

__all__ = ["atomic_write", "fsync_directory"]

log = logging.getLogger(__name__)

# ending of the temporary files: no reader looking for a final file by its ending takes one for a real file
_TEMPORARY_SUFFIX = ".tmp"
_OPEN_MODES = {"wb": "xb", "w": "x"}

StrPath = Union[str, os.PathLike[str]]


@overload
def atomic_write(path: StrPath, mode: Literal["wb"] = "wb") -> AbstractContextManager[IO[bytes]]: ...


@overload
def atomic_write(path: StrPath, mode: Literal["w"]) -> AbstractContextManager[IO[str]]: ...


@contextmanager
def atomic_write(path: StrPath, mode: str = "wb") -> Iterator[IO[Any]]:
    """Write ``path`` through a temporary file that is renamed onto it once the ``with`` block completes.

    The steps: delete the temporary files of ``path`` that killed processes of this host left behind; create
    ``.<name>.<pid>@<host>.<token>.tmp`` in the same directory and yield it open; when the block ends, flush and
    ``fsync`` it, ``os.replace`` it onto ``path`` (an atomic rename on POSIX file systems) and ``fsync`` the directory,
    so the rename survives a power loss. The temporary name starts with a dot and ends in ``.tmp``, so tools that
    look for files by their ending (``*.ckpt``, ``*.bin``) pass over it. If the block raises (``KeyboardInterrupt``
    included), the temporary file is deleted, ``path`` is left as it was and the exception propagates.

    Example::

        with atomic_write(directory / "meta.json", "w") as f:
            f.write(json.dumps(meta))

    Args:
        path: The final file. Its directory must exist. An existing file of that name, or a symbolic link (the link,
            not its target), is replaced only once the new file is complete.
        mode: ``"wb"`` to write bytes, ``"w"`` to write UTF-8 text.

    Yields:
        The open temporary file.

    Raises:
        ValueError: If ``mode`` is neither ``"wb"`` nor ``"w"``.
    """
    if mode not in _OPEN_MODES:
        raise ValueError(f"`mode` must be 'wb' or 'w', got {mode!r}.")
    path = Path(path)
    _remove_stale_temporaries(path)
    temporary = path.parent / f".{path.name}.{os.getpid()}@{_hostname()}.{secrets.token_hex(4)}{_TEMPORARY_SUFFIX}"
    try:
        with open(temporary, _OPEN_MODES[mode], encoding=None if "b" in mode else "utf-8") as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        _remove_quietly(temporary)
        raise
    fsync_directory(path.parent)


def _remove_stale_temporaries(path: StrPath) -> None:
    """Delete the temporary files of ``path`` that :func:`atomic_write` calls of killed processes of this host left.

    Temporary files of live processes and of other hosts (which may share the file system) are kept.

    Args:
        path: The final file whose temporary files to look for.
    """
    path = Path(path)
    prefix = f".{path.name}."
    host = _hostname()
    try:
        names = os.listdir(path.parent)
    except OSError:
        return
    for name in names:
        if not (name.startswith(prefix) and name.endswith(_TEMPORARY_SUFFIX)):
            continue
        owner = name[len(prefix) : -len(_TEMPORARY_SUFFIX)]  # "<pid>@<host>.<token>"
        pid_text, _, rest = owner.partition("@")
        owner_host, _, token = rest.rpartition(".")
        if owner_host != host or not pid_text.isdigit() or not token or _process_alive(int(pid_text)):
            continue
        log.info(f"Removing {path.parent / name}, a partial file left by process {pid_text}")
        _remove_quietly(path.parent / name)


def _hostname() -> str:
    return socket.gethostname().replace("@", "_").replace(os.sep, "_") or "localhost"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_quietly(path: Path) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
    except OSError as err:
        log.warning(f"Could not remove the temporary file {path}: {err}")


def fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable; file systems that cannot sync a directory are skipped."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP, errno.EACCES):
            raise
    finally:
        os.close(fd)
