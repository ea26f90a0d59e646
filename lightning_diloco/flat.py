"""The global state in flat buffers, laid out bucket by bucket as the outer syncs send it.

The global weights (and, for the default outer optimizer, its momentum) live in one contiguous buffer per
:class:`~lightning_diloco.outer.OuterState`; each global parameter is a view of its slot. The slots follow the
buckets of the outer syncs (:func:`~lightning_diloco.collectives.plan_buckets` over each fragment's parameters, with
the compressor's block alignment), so a bucket of the sync and the global state it updates are the same contiguous
range: the outer step of one bucket is a handful of whole-range operations (:func:`nesterov_`), not a loop over
parameters.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor
from torch.optim import SGD, Optimizer

from lightning_diloco.collectives import Bucket, plan_buckets

#: Elements per piece of the whole-range operations: the pieces of the global weights, the momentum and the mean
#: that one piece touches stay in the CPU's cache between the operations of the outer step.
PIECE = 1 << 18


@dataclass(frozen=True)
class FlatBucket:
    """One bucket of an outer sync, and the range of the flat buffers it covers.

    Attributes:
        start: its first element in the flat buffers.
        bucket: its segments, as the collectives see them: ``segment.index`` is a position in ``params``' fragment,
            ``segment.offset`` is relative to ``start``.
        params: the outer state's index of the parameter of each segment, in order.

    """

    start: int
    bucket: Bucket
    params: tuple[int, ...]

    @property
    def numel(self) -> int:
        return self.bucket.numel


class FlatLayout:
    """Where each global parameter lives in the flat buffers: the buckets of every fragment, one after the other.

    Args:
        groups: the parameter indices of each fragment.
        numels: every parameter's number of elements.
        alignment: each parameter starts at a multiple of it within its bucket (the compressor's block size).
        bucket_cap_mb: the largest bucket, in MiB of fp32.

    """

    def __init__(self, groups: Sequence[Sequence[int]], numels: Sequence[int], alignment: int,
                 bucket_cap_mb: float) -> None:
        self.groups: list[list[FlatBucket]] = []
        self.offsets: dict[int, int] = {}
        start = 0
        for params in groups:
            buckets = []
            for bucket in plan_buckets([numels[i] for i in params], alignment, bucket_cap_mb):
                indices = tuple(params[s.index] for s in bucket.segments)
                for segment, index in zip(bucket.segments, indices):
                    self.offsets[index] = start + segment.offset
                buckets.append(FlatBucket(start, bucket, indices))
                start += bucket.numel
            self.groups.append(buckets)
        self.numel = start

    def buckets(self, fragment: int) -> list[FlatBucket]:
        """The buckets of fragment ``fragment``, in order."""
        return self.groups[fragment]


def fast_sgd(optimizer: Optimizer) -> Optional[dict]:
    """The parameter group of ``optimizer`` if :func:`nesterov_` computes its step exactly, else ``None``.

    That is :class:`torch.optim.SGD` with one parameter group, no weight decay, no dampening and no ``maximize``, with
    or without (Nesterov) momentum: the paper's outer optimizer, and FedAvg's plain SGD.
    """
    if type(optimizer) is not SGD or len(optimizer.param_groups) != 1:
        return None
    group = optimizer.param_groups[0]
    if group["weight_decay"] != 0 or group["dampening"] != 0 or group["maximize"] or group.get("differentiable"):
        return None
    return group


@torch.no_grad()
def nesterov_(theta: Tensor, momentum: Optional[Tensor], grad: Tensor, lr: float, mu: float, nesterov: bool,
              first: bool, divisor: float = 1.0, after_piece: Optional[Callable[[int, int], None]] = None) -> float:
    """One SGD step of the flat ``theta`` with gradient ``grad / divisor`` (``grad`` is overwritten), as
    :class:`torch.optim.SGD` computes it element by element; returns the squared norm of that gradient (fp32).

    ``momentum`` (``None`` when ``mu`` is 0 and no buffer is kept) becomes ``mu * momentum + grad``, or ``grad`` on
    the ``first`` step; the step is ``grad + mu * momentum`` with Nesterov, else ``momentum``. With ``mu`` 0 and a
    ``momentum`` buffer (a momentum schedule at 0), the buffer becomes ``grad``. The work goes in pieces of
    :data:`PIECE` elements, each one through all the operations while it is in cache, ``after_piece(begin, end)``
    (the copy of the new weights into the model) included.
    """
    squared = torch.zeros((), dtype=torch.float32, device=grad.device)
    for begin in range(0, theta.numel(), PIECE):
        end = min(begin + PIECE, theta.numel())
        g, t = grad[begin:end], theta[begin:end]
        if divisor != 1.0:
            g.div_(divisor)
        squared += torch.dot(g, g)
        if momentum is not None:
            m = momentum[begin:end]
            if first or mu == 0:
                m.copy_(g)
            else:
                m.mul_(mu).add_(g)
            if mu != 0:
                if nesterov:
                    g.add_(m, alpha=mu)
                else:
                    g.copy_(m)
        t.add_(g, alpha=-lr)
        if after_piece is not None:
            after_piece(begin, end)
    return float(squared)
