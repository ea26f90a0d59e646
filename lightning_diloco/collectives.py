"""Averaging of pseudo-gradients across workers with few, large collectives.

:func:`average_` packs the tensors into flat fp32 buckets (one collective, or one pair, per bucket), reduces each
bucket with the chosen :class:`~lightning_diloco.compression.Compressor` and writes the average back in place. Sums
are always accumulated in fp32: compressed payloads are moved as raw bytes and decoded before adding, so neither
low-precision sums nor integer overflow can occur.

Algorithms and the bytes each rank sends per bucket (``k`` ranks, ``n`` elements in the bucket, ``P(n)`` the
compressor's :meth:`~lightning_diloco.compression.Compressor.payload_nbytes`):

``all_reduce``
    fp32 sum with ``dist.all_reduce`` (``"none"`` compressor only). Reported as the ring algorithm's volume,
    ``floor(2 (k - 1) * 4n / k)``: the bandwidth lower bound for an all-reduce; the backend may pick another
    algorithm internally.
``all_gather``
    Every rank's payload is gathered everywhere, decoded and summed in fp32 in rank order. Each rank's payload
    reaches ``k - 1`` peers: ``(k - 1) * P(n)``. One quantization per contribution.
``reduce_scatter``
    The bucket is cut into ``k`` chunks of ``m`` elements (``m`` a multiple of the block size). An all-to-all sends
    chunk ``r`` of every rank to rank ``r``, which decodes and sums them in fp32, re-encodes the sum and all-gathers
    it: ``2 (k - 1) * P(m)``, about ``2 (k - 1) / k * P(n)`` like a ring all-reduce. The reduced chunk is quantized a
    second time, so the error is one round trip larger than ``all_gather``'s.

``"auto"`` picks ``all_reduce`` for ``"none"``, ``all_gather`` for two ranks (same bytes as ``reduce_scatter`` there,
one quantization fewer) and for ``"sparse"`` (a sum of sparse payloads is not sparse), and ``reduce_scatter`` from
three ranks on. Where all-to-all is not available for the
tensors' device (taken to be the case for gloo with non-CPU tensors) ``reduce_scatter`` falls back to ``all_gather``,
with a warning when it was asked for explicitly.

Buckets hold whole tensors, each starting on a block boundary (``compressor.block_size``), so no block mixes two
tensors and the result does not depend on ``bucket_cap_mb``. The alignment padding is sent and counted.

With one rank (or no initialized process group) nothing is communicated and ``bytes_sent`` is 0, but the bucket
still makes one encode/decode round trip, so single-worker runs see the same compression error as multi-worker ones.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_diloco.compression import Compressor, ErrorFeedback, get_compressor

#: Values accepted by the ``algorithm`` argument of :func:`average_`.
ALGORITHMS: tuple[str, ...] = ("auto", "all_reduce", "all_gather", "reduce_scatter")

_FP32_BYTES = 4


@dataclass
class CommStats:
    """What one call to :func:`average_` did.

    Attributes:
        algorithm: The algorithm used: ``"all_reduce"``, ``"all_gather"``, ``"reduce_scatter"`` or ``"local"``
            (one rank, nothing sent).
        compressor: Name of the compressor.
        world_size: Number of ranks in the group.
        numel: Elements averaged, without alignment padding.
        num_buckets: Number of flat buckets.
        num_collectives: Number of collective calls issued.
        bytes_sent: Bytes this rank sent, from the formula of the algorithm used (see the module docstring).
        seconds: Wall time spent inside collectives (on CUDA, the current stream is synchronized around them).
        total_seconds: Wall time of the whole call, including packing and compression.
    """

    algorithm: str
    compressor: str
    world_size: int
    numel: int = 0
    num_buckets: int = 0
    num_collectives: int = 0
    bytes_sent: int = 0
    seconds: float = 0.0
    total_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dictionary, e.g. for logging."""
        return asdict(self)

    def __add__(self, other: CommStats) -> CommStats:
        """Totals of two calls; differing algorithm or compressor names are joined with ``+``."""
        return CommStats(
            algorithm=_join(self.algorithm, other.algorithm),
            compressor=_join(self.compressor, other.compressor),
            world_size=max(self.world_size, other.world_size),
            numel=self.numel + other.numel,
            num_buckets=self.num_buckets + other.num_buckets,
            num_collectives=self.num_collectives + other.num_collectives,
            bytes_sent=self.bytes_sent + other.bytes_sent,
            seconds=self.seconds + other.seconds,
            total_seconds=self.total_seconds + other.total_seconds,
        )


def _join(first: str, second: str) -> str:
    return first if first == second else f"{first}+{second}"


@dataclass(frozen=True)
class Segment:
    """Where one tensor sits in a bucket.

    Attributes:
        index: Position of the tensor in the list being averaged.
        offset: First element of the tensor in the bucket.
        numel: Number of elements of the tensor.
    """

    index: int
    offset: int
    numel: int


@dataclass(frozen=True)
class Bucket:
    """A group of tensors reduced by one collective (or one pair).

    Attributes:
        segments: The tensors in the bucket, in order.
        numel: Bucket length including the alignment padding after each tensor.
    """

    segments: tuple[Segment, ...]
    numel: int


def _round_up(value: int, multiple: int) -> int:
    return math.ceil(value / multiple) * multiple


def plan_buckets(numels: Sequence[int], alignment: int = 1, bucket_cap_mb: float = 64.0) -> list[Bucket]:
    """Split tensors, in order, into buckets of at most ``bucket_cap_mb`` MiB of fp32.

    Each tensor starts at a multiple of ``alignment``. A tensor larger than the cap gets a bucket of its own; tensors
    are never split.

    Args:
        numels: Number of elements of each tensor.
        alignment: Offset multiple for each tensor, e.g. the compressor's block size.
        bucket_cap_mb: Largest bucket size in MiB of fp32 (including padding).

    Raises:
        ValueError: If ``alignment`` or ``bucket_cap_mb`` is not positive.
    """
    if alignment < 1:
        raise ValueError(f"`alignment` must be positive, got {alignment}.")
    if bucket_cap_mb <= 0:
        raise ValueError(f"`bucket_cap_mb` must be positive, got {bucket_cap_mb}.")
    cap = bucket_cap_mb * 2**20 / _FP32_BYTES
    buckets: list[Bucket] = []
    segments: list[Segment] = []
    length = 0
    for index, numel in enumerate(numels):
        padded = _round_up(numel, alignment)
        if segments and length + padded > cap:
            buckets.append(Bucket(tuple(segments), length))
            segments, length = [], 0
        segments.append(Segment(index, length, numel))
        length += padded
    if segments:
        buckets.append(Bucket(tuple(segments), length))
    return buckets


@torch.no_grad()
def average_(
    tensors: Sequence[Tensor],
    compressor: str | Compressor = "none",
    group: dist.ProcessGroup | None = None,
    bucket_cap_mb: float = 64.0,
    algorithm: str = "auto",
    weight: float = 1.0,
    divisor: float | None = None,
    error_feedback: ErrorFeedback | None = None,
) -> CommStats:
    """Replace each tensor with its average over the ranks of ``group``, in place.

    Every rank must call this with tensors of the same shapes, in the same order, and the same arguments except
    ``weight`` and ``error_feedback``. All ranks end with identical results: the compressed algorithms decode the same
    bytes in the same order everywhere, and ``all_reduce`` relies on the backend (gloo and NCCL return the same sum
    on every rank).

    Each rank contributes ``weight * tensor`` and the result is ``sum(contributions) / divisor``. To average over a
    subset of healthy ranks, pass ``weight=0.0`` on the others and ``divisor=<number of healthy ranks>`` everywhere;
    a zero weight sends exact zeros, even if the rank's tensors hold NaN or infinity.

    Args:
        tensors: Floating point tensors on one device, e.g. one pseudo-gradient per parameter.
        compressor: A :class:`~lightning_diloco.compression.Compressor` or its name (``"none"``, ``"bf16"``,
            ``"fp16"``, ``"int8"``, ``"int4"``, ``"e3m0"``).
        group: Process group; the default group if ``None``.
        bucket_cap_mb: Largest bucket, in MiB of fp32.
        algorithm: One of :data:`ALGORITHMS`; see the module docstring.
        weight: Multiplier of this rank's contribution.
        divisor: What the sum is divided by; the group's size if ``None``.
        error_feedback: Residual memory for this rank. Before encoding, each tensor's residual from the previous
            call is added to its contribution; afterwards ``contribution - decoded`` is stored. Unused by the
            lossless ``"none"`` and skipped when ``weight`` is 0. Keys are positions in ``tensors``.

    Returns:
        Statistics about the communication.

    Raises:
        ValueError: On an unknown compressor or algorithm, ``all_reduce`` with a lossy compressor, a non-positive
            ``divisor``, or tensors that are not floating point or not on one device.
    """
    start = time.perf_counter()
    tensors = list(tensors)
    codec = get_compressor(compressor)
    device = _check_tensors(tensors)
    world_size = _world_size(group)
    if divisor is None:
        divisor = float(world_size)
    if divisor <= 0:
        raise ValueError(f"`divisor` must be positive, got {divisor}.")
    chosen = _resolve_algorithm(algorithm, codec, world_size, group, device)
    feedback = error_feedback if error_feedback is not None and not codec.lossless and weight != 0 else None
    stats = CommStats(algorithm=chosen, compressor=codec.name, world_size=world_size)

    for bucket in plan_buckets([t.numel() for t in tensors], codec.block_size, bucket_cap_mb):
        flat = _pack(tensors, bucket, bucket_length(bucket, codec, chosen, world_size), weight, device)
        _unpack(_reduce(flat, bucket, codec, chosen, group, world_size, feedback, stats).div_(divisor), tensors,
                bucket)
    stats.total_seconds = time.perf_counter() - start
    return stats


class BucketAverager:
    """:func:`average_`, one bucket at a time, for a caller that packs each bucket itself.

    The caller writes its weighted contribution into a zero-padded fp32 buffer of :meth:`length` elements (the
    bucket's tensors at their segments' offsets) and calls :meth:`sum`, which returns the sum over the ranks; divided
    by the divisor, that is what :func:`average_` returns on the same tensors, with the same collectives and bytes.

    Args:
        compressor: as in :func:`average_`.
        group: as in :func:`average_`.
        device: where the buffers are.
        algorithm: as in :func:`average_`.

    """

    def __init__(self, compressor: str | Compressor, group: dist.ProcessGroup | None, device: torch.device,
                 algorithm: str = "auto") -> None:
        self.codec = get_compressor(compressor)
        self.group = group
        self.world_size = _world_size(group)
        self.algorithm = _resolve_algorithm(algorithm, self.codec, self.world_size, group, device)
        self.stats = CommStats(algorithm=self.algorithm, compressor=self.codec.name, world_size=self.world_size)

    def length(self, bucket: Bucket) -> int:
        """The buffer length that ``bucket`` needs (its own, padded for ``reduce_scatter``)."""
        return bucket_length(bucket, self.codec, self.algorithm, self.world_size)

    def sum(self, flat: Tensor, bucket: Bucket, error_feedback: ErrorFeedback | None = None) -> Tensor:
        """The sum of every rank's ``flat``: ``flat`` itself (uncompressed) or a new tensor of its length; the mean
        is that over the divisor (:func:`average_` divides at once; a caller may divide as it reads it).
        ``error_feedback`` as in :func:`average_` (pass ``None`` for a rank of weight 0)."""
        started = time.perf_counter()
        feedback = None if self.codec.lossless else error_feedback
        total = _reduce(flat, bucket, self.codec, self.algorithm, self.group, self.world_size, feedback, self.stats)
        self.stats.total_seconds += time.perf_counter() - started
        return total


def bucket_length(bucket: Bucket, codec: Compressor, algorithm: str, world_size: int) -> int:
    """Elements of the buffer that carries ``bucket``: padded to ``world_size`` whole chunks for ``reduce_scatter``."""
    if algorithm == "reduce_scatter":
        return _round_up(bucket.numel, world_size * codec.block_size)
    return bucket.numel


def _reduce(flat: Tensor, bucket: Bucket, codec: Compressor, algorithm: str, group: dist.ProcessGroup | None,
            world_size: int, feedback: ErrorFeedback | None, stats: CommStats) -> Tensor:
    """The sum over the ranks of one packed bucket: ``flat`` itself (``all_reduce``) or a new tensor."""
    length = flat.numel()
    if algorithm == "local" and codec.lossless:  # one rank, nothing lost: the sum is the buffer itself
        total = flat
    elif algorithm == "all_reduce":
        total = _all_reduce(flat, group, world_size, stats)
    else:
        num_chunks = world_size if algorithm == "reduce_scatter" else 1
        payload = _encode_local(codec, flat, bucket, num_chunks, feedback)
        if algorithm == "all_gather":
            total = _all_gather_sum(codec, payload, length, group, world_size, stats)
        elif algorithm == "reduce_scatter":
            total = _reduce_scatter_sum(codec, payload, length, group, world_size, stats)
        else:
            total = codec.decode(payload, length)
    stats.num_buckets += 1
    stats.numel += sum(segment.numel for segment in bucket.segments)
    return total


def _check_tensors(tensors: list[Tensor]) -> torch.device:
    """Check the tensors are floating point and share a device; return that device."""
    if not tensors:
        return torch.device("cpu")
    device = tensors[0].device
    for index, tensor in enumerate(tensors):
        if not tensor.is_floating_point():
            raise ValueError(f"Tensor {index} has dtype {tensor.dtype}; only floating point tensors can be averaged.")
        if tensor.device != device:
            raise ValueError(f"All tensors must be on one device: tensor 0 is on {device}, tensor {index} on "
                             f"{tensor.device}.")
    return device


def _world_size(group: dist.ProcessGroup | None) -> int:
    """Number of ranks in ``group``; 1 without an initialized process group."""
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise ValueError("A `group` was given but torch.distributed is not initialized.")
        return 1
    return dist.get_world_size(group)


def _resolve_algorithm(
    algorithm: str, codec: Compressor, world_size: int, group: dist.ProcessGroup | None, device: torch.device
) -> str:
    """Validate ``algorithm`` and turn ``"auto"`` (and unsupported choices) into the algorithm to run."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"Unknown algorithm {algorithm!r}. Valid algorithms: {', '.join(ALGORITHMS)}.")
    if algorithm == "all_reduce" and not codec.lossless:
        raise ValueError(
            f"`all_reduce` would sum {codec.name!r} codes in low precision; use `all_gather` or `reduce_scatter`."
        )
    if world_size == 1:
        return "local"
    if algorithm == "reduce_scatter" and codec.gather_only:
        raise ValueError(f"`reduce_scatter` would re-encode sums of {codec.name!r} payloads; use `all_gather`.")
    if algorithm == "auto":
        if codec.lossless:
            return "all_reduce"
        if world_size <= 2 or codec.gather_only or not _supports_all_to_all(group, device):
            return "all_gather"
        return "reduce_scatter"
    if algorithm == "reduce_scatter" and not _supports_all_to_all(group, device):
        warnings.warn(
            f"The process group cannot all-to-all {device.type} tensors; using `all_gather` instead of "
            "`reduce_scatter`.",
            stacklevel=3,
        )
        return "all_gather"
    return algorithm


def _supports_all_to_all(group: dist.ProcessGroup | None, device: torch.device) -> bool:
    """Whether the backend serving ``device`` in ``group`` implements all-to-all (gloo does on CPU only)."""
    backend = str(dist.get_backend(group)).lower()
    if ":" in backend:  # e.g. "cpu:gloo,cuda:nccl"
        per_device = dict(item.split(":", 1) for item in backend.split(","))
        backend = per_device.get(device.type, "")
    return not (backend == "gloo" and device.type != "cpu")


def _view(flat: Tensor, segment: Segment) -> Tensor:
    """The elements of ``segment`` in a bucket-shaped tensor."""
    return flat[segment.offset : segment.offset + segment.numel]


def _pack(tensors: list[Tensor], bucket: Bucket, length: int, weight: float, device: torch.device) -> Tensor:
    """Copy ``weight * tensor`` for each tensor of ``bucket`` into a zero-padded fp32 buffer of ``length``."""
    flat = torch.zeros(length, dtype=torch.float32, device=device)
    if weight == 0:
        return flat
    for segment in bucket.segments:
        view = _view(flat, segment)
        view.copy_(tensors[segment.index].reshape(-1))
        if weight != 1:
            view.mul_(weight)
    return flat


def _unpack(flat: Tensor, tensors: list[Tensor], bucket: Bucket) -> None:
    """Copy each tensor's segment of ``flat`` back into the tensor."""
    for segment in bucket.segments:
        tensor = tensors[segment.index]
        tensor.copy_(_view(flat, segment).view_as(tensor))


def _encode_chunks(codec: Compressor, flat: Tensor, num_chunks: int) -> Tensor:
    """Encode ``flat`` as ``num_chunks`` equal chunks and concatenate the payloads."""
    if num_chunks == 1:
        return codec.encode(flat)
    return torch.cat([codec.encode(chunk) for chunk in flat.chunk(num_chunks)])


def _encode_local(
    codec: Compressor, flat: Tensor, bucket: Bucket, num_chunks: int, feedback: ErrorFeedback | None
) -> Tensor:
    """Encode this rank's bucket, applying and then updating error feedback per tensor when given."""
    if feedback is None:
        return _encode_chunks(codec, flat, num_chunks)
    for segment in bucket.segments:
        feedback.compensate_(segment.index, _view(flat, segment))
    payload = _encode_chunks(codec, flat, num_chunks)
    decoded = torch.cat(_decode_chunks(codec, payload, num_chunks, flat.numel() // num_chunks))
    for segment in bucket.segments:
        feedback.update_(segment.index, _view(flat, segment), _view(decoded, segment))
    return payload


def _decode_chunks(codec: Compressor, payload: Tensor, num_chunks: int, chunk_numel: int) -> list[Tensor]:
    """Decode ``num_chunks`` concatenated payloads of ``chunk_numel`` elements each."""
    return [codec.decode(chunk, chunk_numel) for chunk in payload.chunk(num_chunks)]


@contextmanager
def _collective(stats: CommStats, device: torch.device, nbytes: int) -> Iterator[None]:
    """Time the enclosed collective and add it to ``stats``.

    On CUDA the current stream is synchronized before and after, so the time covers the collective's completion
    (and any work already queued on that stream) rather than its launch.
    """
    stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
    if stream is not None:
        stream.synchronize()
    start = time.perf_counter()
    yield
    if stream is not None:
        stream.synchronize()
    stats.seconds += time.perf_counter() - start
    stats.num_collectives += 1
    stats.bytes_sent += nbytes


def _all_gather_bytes(output: Tensor, payload: Tensor, group: dist.ProcessGroup | None) -> None:
    """All-gather equal-sized payloads into ``output`` (rank order)."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(output, payload, group=group)


def _all_reduce(flat: Tensor, group: dist.ProcessGroup | None, world_size: int, stats: CommStats) -> Tensor:
    """fp32 sum over ranks, in place."""
    nbytes = 2 * (world_size - 1) * flat.numel() * _FP32_BYTES // world_size
    with _collective(stats, flat.device, nbytes):
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    return flat


def _all_gather_sum(
    codec: Compressor, payload: Tensor, numel: int, group: dist.ProcessGroup | None, world_size: int, stats: CommStats
) -> Tensor:
    """Gather every rank's payload and sum the decoded values in fp32, in rank order."""
    gathered = payload.new_empty(world_size * payload.numel())
    with _collective(stats, payload.device, (world_size - 1) * payload.numel()):
        _all_gather_bytes(gathered, payload, group)
    parts = gathered.chunk(world_size)
    total = codec.decode(parts[0], numel)
    for part in parts[1:]:
        total.add_(codec.decode(part, numel))
    return total


def _reduce_scatter_sum(
    codec: Compressor,
    payload: Tensor,
    numel: int,
    group: dist.ProcessGroup | None,
    world_size: int,
    stats: CommStats,
) -> Tensor:
    """All-to-all the chunk payloads, sum this rank's chunk in fp32, re-encode it and all-gather the sums."""
    chunk_numel = numel // world_size
    chunk_nbytes = payload.numel() // world_size
    received = torch.empty_like(payload)
    with _collective(stats, payload.device, (world_size - 1) * chunk_nbytes):
        dist.all_to_all_single(received, payload, group=group)
    parts = _decode_chunks(codec, received, world_size, chunk_numel)
    partial = parts[0]
    for part in parts[1:]:
        partial.add_(part)
    reduced = codec.encode(partial)
    gathered = payload.new_empty(world_size * chunk_nbytes)
    with _collective(stats, payload.device, (world_size - 1) * chunk_nbytes):
        _all_gather_bytes(gathered, reduced, group)
    return torch.cat(_decode_chunks(codec, gathered, world_size, chunk_numel))
