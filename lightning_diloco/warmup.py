"""The synchronous warm-up: gradients averaged over all processes at every step, as in DDP.

DiLoCo's paper starts its workers from a model trained synchronously. ``DiLoCoStrategy(sync_warmup_steps=W)`` does
that within the same ``fit``: for the first W optimizer steps every process averages its gradients with all the
others before the optimizer steps, so every worker holds the same weights and the same inner optimizer state, and
DiLoCo then starts from them.
"""

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn import Module


@torch.no_grad()
def average_gradients(module: Module, bucket_cap_mb: float, group: Optional[dist.ProcessGroup] = None) -> int:
    """Replace every gradient of ``module`` by its mean over the processes of ``group``, in flat buckets.

    As in DDP, a parameter that has no gradient on any process keeps none; one that has a gradient on some processes
    only counts as zero on the others.

    Args:
        module: the replica whose parameters' ``.grad`` are averaged in place.
        bucket_cap_mb: the largest bucket, in MiB, sent in one collective.
        group: the processes to average over; the default process group if ``None``.

    Returns:
        The bytes this process sent, counted as a ring all-reduce sends them (``2 (k - 1) / k`` of each bucket), as
        :mod:`lightning_diloco.collectives` counts an fp32 all-reduce.

    """
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return 0
    world = dist.get_world_size(group)
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        return 0
    has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=params[0].device)
    dist.all_reduce(has_grad, group=group)
    sent = _ring_bytes(has_grad, world)
    grads: list[Tensor] = []
    for p, anywhere in zip(params, has_grad.tolist()):
        if anywhere:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
    for bucket in _buckets(grads, bucket_cap_mb * 2**20):
        flat = torch.cat([g.reshape(-1) for g in bucket])
        dist.all_reduce(flat, group=group)
        sent += _ring_bytes(flat, world)
        flat.div_(world)
        offset = 0
        for g in bucket:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
    return sent


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
