"""The workers present at an outer step: who they are, and the collectives that cross between them.

The round loop (:mod:`lightning_diloco.rounds`) never calls ``torch.distributed`` itself: it asks :class:`Workers`
for this worker's index and the number of workers, for a table with one row per worker (the census of health and
speed), and to average a list of tensors with given shares. :class:`ProcessGroupWorkers` does it over the fixed
process groups of a :class:`~lightning_diloco.topology.Topology`, which covers one process alone as well. A quorum
that changes from one outer step to the next, or workers whose parameters are local shards, are other
implementations of the same interface.

A worker of G processes averages bandwidth-optimally: process ``j`` averages only slice ``j`` of the tensors with the
``j``-th processes of the other workers, then the worker's processes share their slices over the fast local link.
"""

import math
from abc import ABC, abstractmethod
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn import Module

from lightning_diloco.collectives import BucketAverager, CommStats, average_
from lightning_diloco.compression import ErrorFeedback
from lightning_diloco.topology import Topology


class Workers(ABC):
    """The workers of one outer step, as this process sees them."""

    #: islands mode: the link to the other islands (:class:`lightning_diloco.islands.Quorum`); ``None`` otherwise
    quorum: Optional[Any] = None
    #: the workers whose pseudo-gradients made the latest mean, where this process's census table does not show them
    #: (islands); ``None``: count the positive shares
    healthy: Optional[int] = None

    @property
    @abstractmethod
    def index(self) -> int:
        """This process's worker, from 0."""

    @property
    @abstractmethod
    def count(self) -> int:
        """The number of workers."""

    @abstractmethod
    def gather_rows(self, row: Tensor) -> Tensor:
        """Every worker's ``row`` (a small float64 vector), one row per worker. For a worker of several processes,
        column 0 (its share) is the smallest of its processes' (a worker whose shards are not all finite has share 0)
        and the other columns the largest (the slowest process's seconds per step; a checkpoint asked by any)."""

    @abstractmethod
    def average_(
        self, tensors: list[Tensor], compression: str, bucket_cap_mb: float, share: float, total: float,
        feedback: Optional[ErrorFeedback],
    ) -> CommStats:
        """Replace ``tensors`` in place by ``sum_w share_w * tensors_w / total`` over the workers."""

    @abstractmethod
    def average_buffers_(self, buffers: list[Tensor], bucket_cap_mb: float, share: float, total: float) -> CommStats:
        """:meth:`average_` for floating-point buffers (uncompressed), from identical values within a worker."""

    def bucket_averager(self, compression: str, device: torch.device) -> Optional[BucketAverager]:
        """:meth:`average_` one bucket at a time, for workers whose processes hold whole tensors (``None`` where a
        worker's processes share the work of a sync)."""
        return None

    @abstractmethod
    def broadcast_(self, tensors: list[Tensor]) -> None:
        """Give every process the first process's ``tensors``, in place."""

    @abstractmethod
    def gather_objects(self, obj: Any) -> list[Any]:
        """Every process's ``obj``, on every process (small objects only)."""

    def sum_in_worker(self, value: float) -> float:
        """``value`` summed over the processes of this worker that hold different parts of its tensors (sharded
        workers); a worker whose processes hold whole tensors returns ``value``."""
        return value

    @abstractmethod
    def mean_gradients_(self, module: Module, bucket_cap_mb: float) -> int:
        """Average ``module``'s gradients over every process (the synchronous warm-up); the bytes sent."""


class ProcessGroupWorkers(Workers):
    """The workers of a fixed set of processes: :class:`~lightning_diloco.topology.Topology`'s groups.

    Args:
        topology: this process's groups (a world of one when no process group is initialized).

    """

    def __init__(self, topology: Topology) -> None:
        self.topology = topology

    @property
    def index(self) -> int:
        return self.topology.worker

    @property
    def count(self) -> int:
        return self.topology.num_workers

    @property
    def _distributed(self) -> bool:
        return dist.is_initialized() and self.topology.world_size > 1

    def gather_rows(self, row: Tensor) -> Tensor:
        topology = self.topology
        if topology.control is None or topology.world_size == 1:
            return row[None]
        gathered = [torch.empty_like(row) for _ in range(topology.world_size)]
        dist.all_gather(gathered, row, group=topology.control)
        return per_worker(torch.stack(gathered), topology.processes_per_worker)

    def bucket_averager(self, compression: str, device: torch.device) -> Optional[BucketAverager]:
        if self.topology.processes_per_worker > 1:
            return None
        return BucketAverager(compression, self.topology.outer, device)

    def average_(
        self, tensors: list[Tensor], compression: str, bucket_cap_mb: float, share: float, total: float,
        feedback: Optional[ErrorFeedback],
    ) -> CommStats:
        topology = self.topology
        if topology.processes_per_worker == 1:
            return average_(tensors, compression, topology.outer, bucket_cap_mb, weight=share, divisor=total,
                            error_feedback=feedback)
        g, j = topology.processes_per_worker, topology.index_in_worker
        flat = torch.cat([t.reshape(-1) for t in tensors])
        chunk = math.ceil(flat.numel() / g)
        padded = torch.zeros(chunk * g, dtype=flat.dtype, device=flat.device)
        padded[: flat.numel()] = flat
        mine = padded[j * chunk : (j + 1) * chunk].clone()
        stats = average_([mine], compression, topology.outer, bucket_cap_mb, weight=share, divisor=total,
                         error_feedback=feedback)
        dist.all_gather_into_tensor(padded, mine, group=topology.intra_sync)
        _unflatten_into(padded, tensors)
        return stats

    def average_buffers_(self, buffers: list[Tensor], bucket_cap_mb: float, share: float, total: float) -> CommStats:
        topology = self.topology
        if topology.intra_sync is not None:
            # the processes of a worker hold identical parameters but not identical buffers: each updated its
            # BatchNorm statistics with its own micro-batches (DistributedDataParallel keeps the first process's)
            flat = torch.cat([b.reshape(-1) for b in buffers])
            dist.broadcast(flat, src=topology.worker * topology.processes_per_worker, group=topology.intra_sync)
            _unflatten_into(flat, buffers)
        return self.average_(buffers, "none", bucket_cap_mb, share, total, None)

    @torch.no_grad()
    def broadcast_(self, tensors: list[Tensor]) -> None:
        if self._distributed:
            for tensor in tensors:
                dist.broadcast(tensor.data, src=0)

    def gather_objects(self, obj: Any) -> list[Any]:
        if not self._distributed:
            return [obj]
        everyone: list[Any] = [None] * self.topology.world_size
        dist.all_gather_object(everyone, obj)
        return everyone

    @torch.no_grad()
    def mean_gradients_(self, module: Module, bucket_cap_mb: float) -> int:
        """As in DDP, a parameter that has no gradient on any process keeps none; one that has a gradient on some
        processes only counts as zero on the others. The bytes are counted as a ring all-reduce sends them
        (``2 (k - 1) / k`` of each bucket), as :mod:`lightning_diloco.collectives` counts an fp32 all-reduce."""
        if not self._distributed:
            return 0
        world = self.topology.world_size
        params = [p for p in module.parameters() if p.requires_grad]
        if not params:
            return 0
        has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=params[0].device)
        dist.all_reduce(has_grad)
        sent = _ring_bytes(has_grad, world)
        grads: list[Tensor] = []
        for p, anywhere in zip(params, has_grad.tolist()):
            if anywhere:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                grads.append(p.grad)
        for bucket in _buckets(grads, bucket_cap_mb * 2**20):
            flat = torch.cat([g.reshape(-1) for g in bucket])
            dist.all_reduce(flat)
            sent += _ring_bytes(flat, world)
            _unflatten_into(flat.div_(world), bucket)
        return sent


def _unflatten_into(flat: Tensor, tensors: list[Tensor]) -> None:
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def _ring_bytes(tensor: Tensor, world: int) -> int:
    return 2 * (world - 1) * tensor.numel() * tensor.element_size() // world


def _buckets(tensors: list[Tensor], cap_bytes: float) -> list[list[Tensor]]:
    """Consecutive tensors of one dtype and device, grouped into buckets of at most ``cap_bytes`` (a larger tensor
    travels alone)."""
    buckets: list[list[Tensor]] = []
    size = 0.0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        last = buckets[-1] if buckets else None
        if last is None or last[0].dtype != t.dtype or last[0].device != t.device or size + nbytes > cap_bytes:
            buckets.append([t])
            size = nbytes
        else:
            last.append(t)
            size += nbytes
    return buckets


def per_worker(rows: Tensor, processes_per_worker: int) -> Tensor:
    """One census row per worker from every process's row (consecutive ranks form a worker): the smallest share
    (column 0) and the largest of every other column."""
    by_worker = rows.reshape(-1, processes_per_worker, rows.shape[1])
    return torch.cat([by_worker[:, :, :1].amin(dim=1), by_worker[:, :, 1:].amax(dim=1)], dim=1)
