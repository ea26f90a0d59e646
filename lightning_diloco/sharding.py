"""Sharded workers: a worker's replica split over its processes with FSDP2, and its DiLoCo state split the same way.

With ``sharding="fsdp"`` the G processes of a worker shard its replica with ``torch.distributed.fsdp.fully_shard``
over the worker's own device mesh (a LightningModule may also shard itself in ``configure_model`` on
``self.device_mesh``, as under Lightning's ``ModelParallelStrategy``). Every parameter is then a ``DTensor`` whose
local tensor is one dim-0 chunk of the whole, and process ``j`` of every worker holds the same chunk.

DiLoCo follows the local tensors (:func:`local`): each process keeps the global weights and the outer optimizer state
of its own chunks only (8 bytes per parameter over G for Nesterov SGD in fp32), computes its pseudo-gradient on them
and averages it with process ``j`` of the other workers (:class:`ShardedWorkers`). Nothing is gathered inside a
worker: an outer step moves ``1 / G`` of the model per process, as the sliced sync of an unsharded worker does.
"""

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.nn import Module

from lightning_diloco.collectives import CommStats, average_
from lightning_diloco.compression import ErrorFeedback
from lightning_diloco.topology import Topology
from lightning_diloco.workers import ProcessGroupWorkers

__all__ = ["ShardedWorkers", "is_sharded", "local", "shard_module", "to_global", "worker_mesh"]


def local(tensor: Tensor) -> Tensor:
    """The part of ``tensor`` this process holds: a ``DTensor``'s local chunk (sharing its storage), else itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def to_global(chunk: Tensor, like: Tensor) -> Tensor:
    """``chunk`` (this process's part, laid out as ``like``'s local tensor) as a tensor laid out like ``like``: a
    ``DTensor`` on ``like``'s mesh and placements, or ``chunk`` itself when ``like`` is an ordinary tensor."""
    if not isinstance(like, DTensor):
        return chunk
    return DTensor.from_local(
        chunk, like.device_mesh, like.placements, run_check=False, shape=like.shape, stride=like.stride()
    )


def is_sharded(module: Module) -> bool:
    """Whether any of ``module``'s parameters is a ``DTensor`` (sharded by FSDP2 or tensor parallelism)."""
    return any(isinstance(p, DTensor) for p in module.parameters())


def worker_mesh(topology: Topology, device_type: str) -> Optional[DeviceMesh]:
    """The device mesh of this process's worker (its G processes, on the training backend); ``None`` if G = 1."""
    if topology.intra is None:
        return None
    return DeviceMesh.from_group(topology.intra, device_type, mesh_dim_names=("shard",))


def shard_module(module: Module, mesh: DeviceMesh) -> None:
    """Shard ``module`` with FSDP2 over ``mesh``, unless it is sharded already (by its own ``configure_model``).

    Every element of a ``torch.nn.ModuleList`` (the blocks of a transformer) becomes its own FSDP unit, so that only one
    block's weights are gathered at a time; the root module holds the rest (embeddings, final layers).
    """
    from torch.distributed.fsdp import fully_shard

    if is_sharded(module):
        return
    for child in list(module.modules()):
        if isinstance(child, torch.nn.ModuleList):
            for block in child:
                if any(True for _ in block.parameters()):
                    fully_shard(block, mesh=mesh)
    fully_shard(module, mesh=mesh)


class ShardedWorkers(ProcessGroupWorkers):
    """The workers of fixed process groups whose replicas are sharded over each worker's processes.

    Process ``j`` of a worker holds chunk ``j`` of every tensor, so the pseudo-gradients it hands in are its own
    chunks: they are averaged with process ``j`` of every other worker over the cross-worker group ``outer`` number
    ``j``, with no slicing and no all-gather inside the worker.

    Args:
        topology: this process's groups.

    """

    def average_(
        self, tensors: list[Tensor], compression: str, bucket_cap_mb: float, share: float, total: float,
        feedback: Optional[ErrorFeedback],
    ) -> CommStats:
        return average_(tensors, compression, self.topology.outer, bucket_cap_mb, weight=share, divisor=total,
                        error_feedback=feedback)

    def sum_in_worker(self, value: float) -> float:
        """``value`` summed over this worker's processes (the squared norm of a pseudo-gradient held in chunks)."""
        if self.topology.intra_sync is None:
            return value
        total = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(total, group=self.topology.intra_sync)
        return float(total)

    @torch.no_grad()
    def broadcast_(self, tensors: list[Tensor]) -> None:
        """Give every process worker 0's values: chunk ``j`` from worker 0's process ``j``; replicated tensors from
        rank 0."""
        if not self._distributed:
            return
        for tensor in tensors:
            if isinstance(tensor, DTensor):
                # process j of worker 0 is global rank j
                dist.broadcast(local(tensor), src=self.topology.index_in_worker, group=self.topology.outer)
            else:
                dist.broadcast(tensor.data, src=0)
