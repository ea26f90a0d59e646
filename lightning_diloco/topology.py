"""Who talks to whom: workers made of one or more processes, and the process groups of the outer sync.

With ``processes_per_worker = G``, ranks ``[w*G, (w+1)*G)`` form worker ``w``. They train one replica together
(DistributedDataParallel inside the worker, over ``intra``) and hold identical weights. Across workers only the
outer sync talks: process ``j`` of every worker belongs to the cross-worker group ``outer`` number ``j``, so that
process ``j`` can average slice ``j`` of the pseudo-gradient with the ``j``-th processes of the other workers
(:mod:`lightning_diloco.workers`) and send ``1 / G`` of what a whole-world average would make it send.

Every rank creates every group, in the same order (``torch.distributed.new_group`` is collective).
"""

from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch.distributed as dist


@dataclass
class Topology:
    """The process groups of one rank.

    Attributes:
        rank: this process's global rank.
        world_size: all processes.
        processes_per_worker: G, processes that train one replica together.
        control: every rank, gloo: small exchanges (health, speed) from the training thread.
        outer: this process's cross-worker group (every worker's process with the same index in its worker).
        outer_backend: the backend of ``outer``.
        intra: this worker's processes, for the gradient all-reduce of DistributedDataParallel (``None`` if G = 1).
        intra_sync: this worker's processes again, for sharing slices of the outer sync (``None`` if G = 1).

    """

    rank: int
    world_size: int
    processes_per_worker: int
    control: Optional[dist.ProcessGroup]
    outer: Optional[dist.ProcessGroup]
    outer_backend: str
    intra: Optional[dist.ProcessGroup] = None
    intra_sync: Optional[dist.ProcessGroup] = None

    def release(self, keep_intra: bool = False) -> None:
        """Destroy this topology's groups (at the end of ``fit``; the next one builds them again).

        ``keep_intra`` keeps the worker's own group: a sharded replica's ``DTensor`` parameters live on it, and the
        module stays usable after ``fit``.

        A gloo group joins its threads only when it is destroyed and no longer referenced. Left to the interpreter's
        exit, a gloo thread can still be releasing the tensors of the last outer all-reduce while Python finalizes,
        and the process aborts (``terminate called without an active exception``).
        """
        for name in ("control", "outer", "intra_sync") if keep_intra else ("control", "outer", "intra", "intra_sync"):
            group = getattr(self, name)
            if group is not None:
                dist.destroy_process_group(group)
                setattr(self, name, None)

    @property
    def num_workers(self) -> int:
        return self.world_size // self.processes_per_worker

    @property
    def worker(self) -> int:
        """The index of this process's worker."""
        return self.rank // self.processes_per_worker

    @property
    def index_in_worker(self) -> int:
        return self.rank % self.processes_per_worker


def check_processes_per_worker(processes_per_worker: int, world_size: int) -> None:
    if world_size % processes_per_worker:
        raise ValueError(
            f"`processes_per_worker={processes_per_worker}` does not divide the {world_size} processes of this run."
            f" Use a divisor of the world size (devices x num_nodes), for example the devices of one node."
        )


def build_topology(
    processes_per_worker: int, outer_backend: Optional[str], timeout: timedelta
) -> Topology:
    """Create the process groups; every rank must call this at the same point.

    Args:
        processes_per_worker: G.
        outer_backend: backend of the cross-worker groups; ``None`` takes the default group's.
        timeout: how long an outer-sync collective may wait for a peer before it fails.

    """
    if not dist.is_initialized():
        return Topology(0, 1, 1, None, None, outer_backend or "gloo")
    world_size, rank = dist.get_world_size(), dist.get_rank()
    check_processes_per_worker(processes_per_worker, world_size)
    default_backend = str(dist.get_backend())
    backend = outer_backend or default_backend
    g = processes_per_worker
    control = dist.new_group(list(range(world_size)), backend="gloo", timeout=timeout)
    topology = Topology(rank, world_size, g, control, None, backend)
    for j in range(g):
        group = dist.new_group(list(range(j, world_size, g)), backend=backend, timeout=timeout)
        if rank % g == j:
            topology.outer = group
    if g > 1:
        for w in range(world_size // g):
            ranks = list(range(w * g, (w + 1) * g))
            intra = dist.new_group(ranks, backend=default_backend)
            intra_sync = dist.new_group(ranks, backend=backend, timeout=timeout)
            if rank // g == w:
                topology.intra, topology.intra_sync = intra, intra_sync
    return topology
