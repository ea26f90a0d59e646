"""Leave torch.distributed while the interpreter is still whole, so that a finished job's processes exit with 0.

A gloo process group runs its collectives on C++ worker threads (``pt_gloo_runloop``). Such a thread drops its
reference to a finished collective, and so to the tensors of that collective, only after the waiting Python thread
has been woken. When that reference is the last one to a tensor that had a Python object, the worker thread takes
the GIL to release it. If the main thread has reached ``Py_FinalizeEx`` by then (the last collective of a script is a
few milliseconds before the interpreter exits), Python ends the worker thread with ``pthread_exit``; the forced unwind
meets a ``noexcept`` destructor (``~AsyncWork``) and the process aborts: ``terminate called without an active
exception``, exit code 134 (SIGABRT), which SLURM records as a failed task. Plain Lightning DDP on gloo does the same.

Gloo groups have no ``shutdown``: their threads are joined only when the C++ group is destroyed, which
``destroy_process_group`` alone does not do for a group that Python still references (Lightning's Trainer and
strategy form a reference cycle). :func:`close_process_groups` destroys every group, collects the cycles that hold
them, and tells whether any gloo thread is left. :class:`~lightning_diloco.DiLoCoStrategy` registers it to run at
the interpreter's exit (:func:`close_at_exit`), before finalization, so a user's script needs nothing of its own.
"""

import atexit
import gc
import os
import warnings

import torch.distributed as dist

_GLOO_THREADS = ("pt_gloo", "gloo_tcp")
_registered = False


def gloo_threads() -> list[str]:
    """The names of this process's gloo threads (empty where ``/proc`` is not there to tell)."""
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return []
    names = []
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/comm") as f:
                name = f.read().strip()
        except OSError:  # the thread ended meanwhile
            continue
        if name.startswith(_GLOO_THREADS):
            names.append(name)
    return names


def _forget_meshes() -> None:
    """Drop the process groups that device meshes still hold: DTensor's caches of sharding plans keep a sharded run's
    meshes (and with them their groups) alive after the model is gone."""
    from torch.distributed.device_mesh import DeviceMesh

    with warnings.catch_warnings():  # isinstance on some of torch's deprecated objects warns
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            if isinstance(obj, DeviceMesh) and isinstance(getattr(obj, "_pg_registry", None), dict):
                obj._pg_registry.clear()


def close_process_groups(strict: bool = True) -> list[str]:
    """Destroy every process group and join its threads now, before the interpreter finalizes.

    Call it once nothing needs the groups any more and the objects that reference them (the Trainer, the strategy)
    are out of scope, e.g. right after ``main()`` returned.

    Args:
        strict: raise if a gloo thread is still running; otherwise return their names.

    Raises:
        RuntimeError: with ``strict``, a gloo thread is still running, because something still references a process
            group.

    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()
    _forget_meshes()
    gc.collect()  # the last references to the subgroups sit in reference cycles (Trainer <-> strategy)
    left = gloo_threads()
    if left and strict:
        raise RuntimeError(
            f"{len(left)} gloo threads ({', '.join(sorted(set(left)))}) outlive destroy_process_group(): a process"
            " group is still referenced, and its threads may touch Python while the interpreter exits"
        )
    return left


def close_at_exit() -> None:
    """Run :func:`close_process_groups` when the interpreter exits (once per process, whatever the calls)."""
    global _registered
    if not _registered:
        _registered = True
        atexit.register(_close_quietly)


def _close_quietly() -> None:
    try:
        close_process_groups(strict=False)
    except Exception:  # noqa: BLE001 (at exit, a group that cannot be destroyed is left to the interpreter)
        pass
