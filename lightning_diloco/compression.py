"""Pseudo-gradient compressors for the outer synchronization.

A compressor turns a flat fp32 tensor into a *payload*: one 1-D ``torch.uint8`` tensor holding exactly the bytes that
travel over the network, and turns a payload back into fp32. Every compressor reports its wire cost
(:meth:`Compressor.payload_nbytes`, :attr:`Compressor.bits_per_element`) and a per-element bound on its round-trip
error (:meth:`Compressor.error_bound`), so callers and tests can reason about accuracy without running a collective.

Available formats (see :func:`get_compressor`):

========  ====================================================================  ==================================
name      encoding                                                              bound on ``|x - decode(encode(x))|``
========  ====================================================================  ==================================
``none``  fp32, bit-exact                                                       ``0``
``bf16``  bfloat16, round to nearest even                                       ``max(|x| 2^-8, 2^-134)``
``fp16``  float16 of ``x / 2^e`` with one power-of-two ``2^e`` per block        ``max(|x| 2^-11, 2^e 2^-25)``
``int8``  ``round(x / s)`` in ``[-127, 127]``, ``s = absmax / 127`` per block   ``absmax / 254``
``int4``  ``round(x / s)`` in ``[-7, 7]``, ``s = absmax / 7`` per block         ``absmax / 14``
``e3m0``  sign + 3-bit exponent: ``x ≈ ±absmax 2^-k``, ``k in 0..6``, or ``0``  ``max(|x| / 3, absmax / 128)``
``int2``  ``round(x / absmax)`` in ``{-1, 0, 1}`` in 2 bits, per block             ``absmax / 2``
``sparse`` top 64 of every 4096 by magnitude, 2-bit values, 12-bit positions     ``absmax / 3`` kept, ``|x|`` dropped
========  ====================================================================  ==================================

``absmax`` is the largest magnitude within the element's block. The bounds are those of exact arithmetic; the
implementation adds ``absmax * 2^-20`` to cover fp32 rounding in the scale computations. Non-finite inputs are not
special-cased: a NaN or infinity poisons the decoded values of its block.

Blocked formats (``fp16``, ``int8``, ``int4``, ``e3m0``) lay out their payload as the fp32 block scales followed by
the packed codes. Blocks start at element 0, so encoding a tensor whose length is a multiple of the block size
gives the same result as encoding its blocks one at a time; :mod:`lightning_diloco.collectives` relies on this.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import Tensor

#: Relative allowance added to every bound (as ``absmax * FP32_SLACK``) for fp32 rounding in scale computations.
FP32_SLACK = 2.0**-20


def _check_flat(flat: Tensor) -> Tensor:
    """Validate a 1-D floating tensor and return it as contiguous fp32."""
    if flat.dim() != 1:
        raise ValueError(f"Expected a 1-D tensor, got shape {tuple(flat.shape)}.")
    if not flat.is_floating_point():
        raise ValueError(f"Expected a floating point tensor, got {flat.dtype}.")
    return flat.to(torch.float32).contiguous()


def _bytes_as(buffer: Tensor, dtype: torch.dtype) -> Tensor:
    """Reinterpret a 1-D uint8 tensor as ``dtype``, copying first if its offset is not aligned for ``dtype``."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    if buffer.storage_offset() % itemsize != 0:
        buffer = buffer.clone()
    return buffer.contiguous().view(dtype)


class Compressor(ABC):
    """Lossy or lossless encoding of a flat fp32 tensor into the bytes sent over the wire.

    Subclasses define :attr:`name`, :meth:`encode`, :meth:`decode`, :meth:`payload_nbytes`,
    :attr:`bits_per_element` and :meth:`error_bound`.
    """

    #: Registry name, as accepted by :func:`get_compressor`.
    name: ClassVar[str]
    #: Whether ``decode(encode(x))`` reproduces ``x`` bit for bit.
    lossless: ClassVar[bool] = False
    #: Whether payloads must be gathered and summed, never summed in chunks and re-encoded (a sparse format: a sum of
    #: sparse tensors is not sparse).
    gather_only: ClassVar[bool] = False

    @property
    def block_size(self) -> int:
        """Number of elements that share one scale; ``1`` for formats without scales."""
        return 1

    @property
    @abstractmethod
    def bits_per_element(self) -> float:
        """Wire bits per element including scale overhead, for lengths that are a multiple of the block size."""

    @abstractmethod
    def payload_nbytes(self, numel: int) -> int:
        """Exact size in bytes of the payload that :meth:`encode` returns for ``numel`` elements.

        Args:
            numel: Number of elements in the encoded tensor.
        """

    @abstractmethod
    def encode(self, flat: Tensor) -> Tensor:
        """Encode a 1-D floating tensor.

        Args:
            flat: The values to encode; converted to fp32 first.

        Returns:
            A 1-D ``torch.uint8`` tensor of :meth:`payload_nbytes` bytes on the input's device.
        """

    @abstractmethod
    def decode(self, payload: Tensor, numel: int) -> Tensor:
        """Decode a payload produced by :meth:`encode`.

        Args:
            payload: The 1-D ``torch.uint8`` payload.
            numel: Number of encoded elements.

        Returns:
            A new 1-D fp32 tensor of ``numel`` elements on the payload's device.
        """

    @abstractmethod
    def error_bound(self, flat: Tensor) -> Tensor:
        """Per-element upper bound on ``|flat - decode(encode(flat))|``.

        Args:
            flat: The 1-D tensor that would be encoded.

        Returns:
            A non-negative fp32 tensor shaped like ``flat``.
        """

    def _check_payload(self, payload: Tensor, numel: int) -> None:
        """Raise if ``payload`` does not have the size and dtype that ``numel`` elements need."""
        expected = self.payload_nbytes(numel)
        if payload.dtype != torch.uint8 or payload.dim() != 1 or payload.numel() != expected:
            raise ValueError(
                f"{self.name!r} payload for {numel} elements must be a 1-D uint8 tensor of {expected} bytes, "
                f"got {payload.dtype} with shape {tuple(payload.shape)}."
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class _CastCompressor(Compressor):
    """Sends the values cast to a floating dtype (fp32 itself for the lossless format)."""

    wire_dtype: ClassVar[torch.dtype]

    @property
    def bits_per_element(self) -> float:
        return float(8 * self._itemsize)

    @property
    def _itemsize(self) -> int:
        return torch.empty((), dtype=self.wire_dtype).element_size()

    def payload_nbytes(self, numel: int) -> int:
        return numel * self._itemsize

    def encode(self, flat: Tensor) -> Tensor:
        return _check_flat(flat).to(self.wire_dtype).view(torch.uint8)

    def decode(self, payload: Tensor, numel: int) -> Tensor:
        self._check_payload(payload, numel)
        return _bytes_as(payload, self.wire_dtype).to(torch.float32, copy=True)


class NoCompression(_CastCompressor):
    """Plain fp32: four bytes per element, no error. The payload of a contiguous fp32 input is a view of its bytes."""

    name = "none"
    lossless = True
    wire_dtype = torch.float32

    def error_bound(self, flat: Tensor) -> Tensor:
        return torch.zeros_like(_check_flat(flat))


class BF16Compressor(_CastCompressor):
    """bfloat16 with round-to-nearest-even.

    bfloat16 keeps fp32's exponent range, so nothing overflows; with 8 significant bits the error is at most
    ``|x| * 2^-8`` (half a unit in the last place), and at most ``2^-134`` in the subnormal range.
    """

    name = "bf16"
    wire_dtype = torch.bfloat16

    def error_bound(self, flat: Tensor) -> Tensor:
        return (_check_flat(flat).abs() * 2.0**-8).clamp_min(2.0**-134)


class _BlockCompressor(Compressor):
    """Base for formats with one fp32 scale per block of ``block_size`` elements.

    The payload is ``[scales as fp32 bytes][packed codes]``. The last block is zero-padded for computing scales; the
    padding is not sent.

    Args:
        block_size: Elements per block; a positive even number.
    """

    #: Wire bits per code.
    code_bits: ClassVar[int]

    def __init__(self, block_size: int = 256) -> None:
        if block_size < 2 or block_size % 2:
            raise ValueError(f"`block_size` must be a positive even number, got {block_size}.")
        self._block_size = block_size

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def bits_per_element(self) -> float:
        return self.code_bits + 32 / self._block_size

    def _num_blocks(self, numel: int) -> int:
        return math.ceil(numel / self._block_size)

    def _code_nbytes(self, numel: int) -> int:
        return math.ceil(numel * self.code_bits / 8)

    def payload_nbytes(self, numel: int) -> int:
        return 4 * self._num_blocks(numel) + self._code_nbytes(numel)

    def _blocks(self, flat: Tensor) -> Tensor:
        """Return ``flat`` zero-padded to whole blocks, shaped ``(num_blocks, block_size)``."""
        padding = self._num_blocks(flat.numel()) * self._block_size - flat.numel()
        return torch.nn.functional.pad(flat, (0, padding)).view(-1, self._block_size)

    def _absmax(self, flat: Tensor) -> Tensor:
        """Largest magnitude of each block, shape ``(num_blocks,)``."""
        return self._blocks(flat).abs().amax(dim=1)

    def _per_element(self, per_block: Tensor, numel: int) -> Tensor:
        """Broadcast one value per block to every element of that block."""
        return per_block.repeat_interleave(self._block_size)[:numel]

    def encode(self, flat: Tensor) -> Tensor:
        flat = _check_flat(flat)
        scales, codes = self._quantize(self._blocks(flat))
        codes = self._pack(codes.reshape(-1)[: flat.numel()])
        return torch.cat([scales.to(torch.float32).view(torch.uint8), codes])

    def decode(self, payload: Tensor, numel: int) -> Tensor:
        self._check_payload(payload, numel)
        num_scale_bytes = 4 * self._num_blocks(numel)
        scales = _bytes_as(payload[:num_scale_bytes], torch.float32)
        codes = self._unpack(payload[num_scale_bytes:], numel)
        padding = self._num_blocks(numel) * self._block_size - numel
        codes = torch.nn.functional.pad(codes, (0, padding)).view(-1, self._block_size)
        return self._dequantize(scales, codes).reshape(-1)[:numel].contiguous()

    def error_bound(self, flat: Tensor) -> Tensor:
        flat = _check_flat(flat)
        absmax = self._per_element(self._absmax(flat), flat.numel())
        return self._nominal_bound(flat, absmax) + absmax * FP32_SLACK

    @abstractmethod
    def _quantize(self, blocks: Tensor) -> tuple[Tensor, Tensor]:
        """Map ``(num_blocks, block_size)`` fp32 values to ``(scales, codes)``; codes are integers of any dtype."""

    @abstractmethod
    def _dequantize(self, scales: Tensor, codes: Tensor) -> Tensor:
        """Inverse of :meth:`_quantize` for ``(num_blocks, block_size)`` codes; returns fp32."""

    @abstractmethod
    def _pack(self, codes: Tensor) -> Tensor:
        """Pack 1-D codes into uint8 wire bytes."""

    @abstractmethod
    def _unpack(self, packed: Tensor, numel: int) -> Tensor:
        """Unpack wire bytes into ``numel`` 1-D codes."""

    @abstractmethod
    def _nominal_bound(self, flat: Tensor, absmax: Tensor) -> Tensor:
        """Exact-arithmetic error bound, given each element's block absmax."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(block_size={self._block_size})"


def _pack_nibbles(nibbles: Tensor) -> Tensor:
    """Pack 1-D values in ``[0, 15]`` two per byte: element ``2i`` in the low nibble, ``2i + 1`` in the high one."""
    nibbles = nibbles.to(torch.uint8)
    if nibbles.numel() % 2:
        nibbles = torch.nn.functional.pad(nibbles, (0, 1))
    pairs = nibbles.view(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def _unpack_nibbles(packed: Tensor, numel: int) -> Tensor:
    """Inverse of :func:`_pack_nibbles`; returns ``numel`` uint8 values."""
    pairs = torch.stack([packed & 0x0F, packed >> 4], dim=1)
    return pairs.reshape(-1)[:numel]


class _SymmetricIntCompressor(_BlockCompressor):
    """Symmetric linear quantization: ``code = round(x / s)`` in ``[-q, q]`` with ``s = absmax / q`` per block.

    Rounding is to nearest (ties to even), so ``|x - code * s| <= s / 2 = absmax / (2q)``. All-zero blocks get
    ``s = 0`` and decode to zeros.
    """

    #: Largest code magnitude ``q``.
    max_code: ClassVar[int]

    def _quantize(self, blocks: Tensor) -> tuple[Tensor, Tensor]:
        scales = blocks.abs().amax(dim=1) / self.max_code
        safe = torch.where(scales > 0, scales, torch.ones_like(scales))
        codes = torch.round(blocks / safe[:, None]).clamp_(-self.max_code, self.max_code)
        return scales, codes.to(torch.int8)

    def _dequantize(self, scales: Tensor, codes: Tensor) -> Tensor:
        return codes.to(torch.float32) * scales[:, None]

    def _nominal_bound(self, flat: Tensor, absmax: Tensor) -> Tensor:
        return absmax / (2 * self.max_code)


class Int8Compressor(_SymmetricIntCompressor):
    """8-bit symmetric codes in ``[-127, 127]`` with an fp32 absmax scale per block.

    Error bound: ``|x - x_hat| <= absmax / 254`` (half a quantization step ``absmax / 127``).

    Args:
        block_size: Elements per scale.
    """

    name = "int8"
    code_bits = 8
    max_code = 127

    def _pack(self, codes: Tensor) -> Tensor:
        return codes.to(torch.int8).view(torch.uint8)

    def _unpack(self, packed: Tensor, numel: int) -> Tensor:
        return packed.view(torch.int8)


class Int4Compressor(_SymmetricIntCompressor):
    """4-bit symmetric codes in ``[-7, 7]``, two per byte, with an fp32 absmax scale per block.

    A code ``c`` travels as the nibble ``c + 8`` (so ``0`` is never used). Error bound: ``|x - x_hat| <= absmax / 14``.

    Args:
        block_size: Elements per scale.
    """

    name = "int4"
    code_bits = 4
    max_code = 7

    def _pack(self, codes: Tensor) -> Tensor:
        return _pack_nibbles(codes.to(torch.int16) + 8)

    def _unpack(self, packed: Tensor, numel: int) -> Tensor:
        return _unpack_nibbles(packed, numel).to(torch.int8) - 8


class Int2Compressor(_SymmetricIntCompressor):
    """Ternary codes ``{-1, 0, 1}`` in 2 bits, four per byte, with an fp32 absmax scale per block: a dense 2-bit
    format (for Muon's pseudo-gradients with error feedback, as in MuLoCo).

    A code ``c`` travels as ``c + 1``. Error bound: ``|x - x_hat| <= absmax / 2``; pair it with
    :class:`ErrorFeedback`, which carries what was rounded away into the next sync.

    Args:
        block_size: Elements per scale.
    """

    name = "int2"
    code_bits = 2
    max_code = 1

    def _pack(self, codes: Tensor) -> Tensor:
        values = codes.to(torch.int16) + 1
        return _pack_2bit(torch.nn.functional.pad(values, (0, -values.numel() % 4)))

    def _unpack(self, packed: Tensor, numel: int) -> Tensor:
        return _unpack_2bit(packed, numel).to(torch.int8) - 1


class E3M0Compressor(_BlockCompressor):
    """4-bit sign + 3-bit exponent, no mantissa (the E3M0 format of Streaming DiLoCo), fp32 absmax scale per block.

    With ``a`` the block absmax, the magnitudes on the grid are ``0`` and ``a * 2^-k`` for ``k in 0..6``: exponent
    field ``f = 0`` encodes zero (like a minifloat's subnormal zero, so zeros and padding stay exact) and ``f in 1..7``
    encodes ``a * 2^(f - 7)``. The nibble is ``sign << 3 | f``.

    Rounding is deterministic round-to-nearest in linear space (ties away from zero), which minimizes the absolute
    error: between ``2^k a`` and ``2^(k+1) a`` the midpoint is ``1.5 * 2^k a``, so the error is at most a third of
    ``|x|``; below ``2^-6 a`` values round to ``0`` or ``2^-6 a``, an error of at most ``a / 128``. Hence
    ``|x - x_hat| <= max(|x| / 3, absmax / 128)``. Deterministic rounding is biased; pair it with
    :class:`ErrorFeedback` to carry the bias into the next sync.

    Args:
        block_size: Elements per scale.
    """

    name = "e3m0"
    code_bits = 4
    #: Decoded value of each nibble for a block absmax of 1: positive levels, then their negatives.
    _values: ClassVar[tuple[float, ...]] = tuple(
        sign * level for sign in (1.0, -1.0) for level in (0.0, *(2.0**k for k in range(-6, 1)))
    )

    def _quantize(self, blocks: Tensor) -> tuple[Tensor, Tensor]:
        scales = blocks.abs().amax(dim=1)
        safe = torch.where(scales > 0, scales, torch.ones_like(scales))
        magnitude = blocks.abs() / safe[:, None]  # in [0, 1]
        mantissa, exponent = torch.frexp(magnitude)  # magnitude = mantissa * 2^exponent, mantissa in [0.5, 1)
        # magnitude lies in [2^(exponent-1), 2^exponent); it rounds up past the linear midpoint, mantissa 0.75.
        # Field f encodes 2^(f-7), so f = (exponent - 1) + 7, plus one when rounding up.
        field = (exponent.clamp(min=-8).to(torch.int8) + 6).add_((mantissa >= 0.75).to(torch.int8)).clamp_(1, 7)
        # Below 2^-6 the neighbours are 0 and 2^-6, with midpoint 2^-7.
        field.masked_fill_(magnitude < 2.0**-7, 0)
        return scales, field | ((blocks < 0).to(torch.int8) << 3)

    def _dequantize(self, scales: Tensor, codes: Tensor) -> Tensor:
        values = torch.tensor(self._values, dtype=torch.float32, device=codes.device)
        return torch.take(values, codes.to(torch.int64)).mul_(scales[:, None])

    def _pack(self, codes: Tensor) -> Tensor:
        return _pack_nibbles(codes)

    def _unpack(self, packed: Tensor, numel: int) -> Tensor:
        return _unpack_nibbles(packed, numel)

    def _nominal_bound(self, flat: Tensor, absmax: Tensor) -> Tensor:
        return torch.maximum(flat.abs() / 3, absmax / 128)


class FP16Compressor(_BlockCompressor):
    """float16 of ``x / 2^e`` with one power-of-two scale ``2^e`` per block, so large values cannot overflow.

    ``e`` is chosen so that the block absmax maps into ``[2^14, 2^15)``, well below float16's maximum of 65504.
    Dividing by a power of two is exact, so the only error is float16's round-to-nearest-even: relative ``2^-11`` for
    normal values and at most ``2^-25`` (in scaled units) in float16's subnormal range. In input units,
    ``|x - x_hat| <= max(|x| * 2^-11, 2^e * 2^-25)`` where ``2^e <= absmax * 2^-14``. ``e`` is kept at or above -126
    so the scale stays a normal fp32 number. Scaling also lifts small pseudo-gradients out of float16's subnormal range,
    which plain casting would flush towards zero.

    Args:
        block_size: Elements per scale.
    """

    name = "fp16"
    code_bits = 16

    def __init__(self, block_size: int = 1024) -> None:
        super().__init__(block_size)

    def _scales(self, absmax: Tensor) -> Tensor:
        """Power-of-two scale per block mapping ``absmax`` into ``[2^14, 2^15)``."""
        _, exponent = torch.frexp(absmax)  # absmax in [2^(exponent-1), 2^exponent)
        exponent = (exponent.to(torch.int32) - 15).clamp_min(-126)
        return torch.ldexp(torch.ones_like(absmax), exponent)

    def _quantize(self, blocks: Tensor) -> tuple[Tensor, Tensor]:
        scales = self._scales(blocks.abs().amax(dim=1))
        return scales, (blocks / scales[:, None]).to(torch.float16)

    def _dequantize(self, scales: Tensor, codes: Tensor) -> Tensor:
        return codes.to(torch.float32) * scales[:, None]

    def _pack(self, codes: Tensor) -> Tensor:
        return codes.to(torch.float16).view(torch.uint8)

    def _unpack(self, packed: Tensor, numel: int) -> Tensor:
        return _bytes_as(packed, torch.float16)

    def _nominal_bound(self, flat: Tensor, absmax: Tensor) -> Tensor:
        scale = self._scales(absmax)
        return torch.maximum(flat.abs() * 2.0**-11, scale * 2.0**-25)


class SparseCompressor(Compressor):
    """SparseLoCo's format (Sarfi et al. 2025): the ``k`` largest magnitudes of every block, 2-bit values, 12-bit
    positions.

    Each block of ``block_size`` elements (at most 4096, so that a position fits 12 bits) keeps its ``k`` entries of
    largest magnitude; the rest are dropped (error feedback carries them into the next outer step). The kept values
    are quantized to the four levels ``{-1, -1/3, 1/3, 1} * s`` with ``s`` the block's largest magnitude. The payload
    is ``[scales as fp32][positions, two per 3 bytes][levels, four per byte]``: ``4 + 1.5k + k/4`` bytes per block,
    116 bytes for 4096 elements at ``k = 64`` (1.56%), 141x fewer than fp32. The last block is zero-padded; a padded
    position is never decoded. A sum of sparse tensors is not sparse, so payloads are gathered and summed in fp32
    (:mod:`lightning_diloco.collectives` never re-encodes a sum of this format).

    Bound on the round-trip error: ``s / 3`` for a kept element, ``|x|`` for a dropped one.

    Args:
        block_size: Elements per block, even, at most 4096 (the paper's chunk: 4096).
        k: Entries kept per block, even, at most ``block_size`` (the paper's 1.56% of 4096: 64).
    """

    name = "sparse"
    gather_only = True

    def __init__(self, block_size: int = 4096, k: int = 64) -> None:
        if not (2 <= block_size <= 4096 and block_size % 2 == 0):
            raise ValueError(f"`block_size` must be an even number in [2, 4096], got {block_size}.")
        if not (4 <= k <= block_size and k % 4 == 0):
            raise ValueError(f"`k` must be a multiple of 4 in [4, block_size={block_size}], got {k}.")
        self._block_size, self._k = block_size, k

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def bits_per_element(self) -> float:
        return (32 + 12 * self._k + 2 * self._k) / self._block_size

    def _num_blocks(self, numel: int) -> int:
        return math.ceil(numel / self._block_size)

    def payload_nbytes(self, numel: int) -> int:
        return self._num_blocks(numel) * (4 + 3 * self._k // 2 + self._k // 4)

    def _select(self, flat: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(blocks, positions, scales)``: the zero-padded blocks, the kept positions of each (ascending) and each
        block's largest magnitude."""
        padding = self._num_blocks(flat.numel()) * self._block_size - flat.numel()
        blocks = torch.nn.functional.pad(flat, (0, padding)).view(-1, self._block_size)
        positions = blocks.abs().topk(self._k, dim=1, sorted=False).indices.sort(dim=1).values
        scales = blocks.abs().amax(dim=1)
        return blocks, positions, scales

    def encode(self, flat: Tensor) -> Tensor:
        flat = _check_flat(flat)
        blocks, positions, scales = self._select(flat)
        values = blocks.gather(1, positions)
        safe = torch.where(scales > 0, scales, torch.ones_like(scales))[:, None]
        levels = ((values / safe + 1.0) * 1.5).round_().clamp_(0, 3).to(torch.uint8)
        return torch.cat([scales.view(torch.uint8), _pack_12bit(positions.reshape(-1)), _pack_2bit(levels.reshape(-1))])

    def decode(self, payload: Tensor, numel: int) -> Tensor:
        self._check_payload(payload, numel)
        blocks, k = self._num_blocks(numel), self._k
        scales = _bytes_as(payload[: 4 * blocks], torch.float32)
        positions_end = 4 * blocks + blocks * 3 * k // 2
        positions = _unpack_12bit(payload[4 * blocks : positions_end], blocks * k).view(blocks, k)
        levels = _unpack_2bit(payload[positions_end:], blocks * k).view(blocks, k)
        values = (levels.to(torch.float32) / 1.5 - 1.0) * scales[:, None]
        out = torch.zeros(blocks, self._block_size, dtype=torch.float32, device=payload.device)
        out.scatter_(1, positions, values)
        return out.reshape(-1)[:numel].contiguous()

    def error_bound(self, flat: Tensor) -> Tensor:
        flat = _check_flat(flat)
        blocks, positions, scales = self._select(flat)
        bound = blocks.abs()
        bound.scatter_(1, positions, (scales / 3)[:, None].expand_as(positions).contiguous())
        return (bound + scales[:, None] * FP32_SLACK).reshape(-1)[: flat.numel()]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(block_size={self._block_size}, k={self._k})"


def _pack_12bit(values: Tensor) -> Tensor:
    """Pack an even number of values in ``[0, 4095]`` two per 3 bytes."""
    pairs = values.to(torch.int32).view(-1, 2)
    a, b = pairs[:, 0], pairs[:, 1]
    return torch.stack([a & 0xFF, (a >> 8) | ((b & 0x0F) << 4), b >> 4], dim=1).to(torch.uint8).reshape(-1)


def _unpack_12bit(packed: Tensor, numel: int) -> Tensor:
    triples = packed.to(torch.int64).view(-1, 3)
    a = triples[:, 0] | ((triples[:, 1] & 0x0F) << 8)
    b = (triples[:, 1] >> 4) | (triples[:, 2] << 4)
    return torch.stack([a, b], dim=1).reshape(-1)[:numel]


def _pack_2bit(values: Tensor) -> Tensor:
    """Pack a multiple of 4 values in ``[0, 3]`` four per byte, element ``4i`` in the lowest bits."""
    quads = values.to(torch.uint8).view(-1, 4)
    return quads[:, 0] | (quads[:, 1] << 2) | (quads[:, 2] << 4) | (quads[:, 3] << 6)


def _unpack_2bit(packed: Tensor, numel: int) -> Tensor:
    return torch.stack([(packed >> shift) & 0x03 for shift in (0, 2, 4, 6)], dim=1).reshape(-1)[:numel]


_COMPRESSORS: dict[str, type[Compressor]] = {
    cls.name: cls
    for cls in (NoCompression, BF16Compressor, FP16Compressor, Int8Compressor, Int4Compressor, Int2Compressor,
                E3M0Compressor, SparseCompressor)
}

#: Names accepted by :func:`get_compressor`.
COMPRESSOR_NAMES: tuple[str, ...] = tuple(_COMPRESSORS)


def get_compressor(name: str | Compressor, **kwargs: Any) -> Compressor:
    """Build a compressor from its name.

    Args:
        name: One of :data:`COMPRESSOR_NAMES` (``"none"``, ``"bf16"``, ``"fp16"``, ``"int8"``, ``"int4"``,
            ``"e3m0"``), or a :class:`Compressor` instance, which is returned unchanged.
        **kwargs: Passed to the compressor's constructor, e.g. ``block_size`` for the blocked formats.

    Raises:
        ValueError: If ``name`` is not a known compressor.
    """
    if isinstance(name, Compressor):
        if kwargs:
            raise ValueError("Keyword arguments cannot be combined with a `Compressor` instance.")
        return name
    if name not in _COMPRESSORS:
        raise ValueError(f"Unknown compressor {name!r}. Valid names: {', '.join(COMPRESSOR_NAMES)}.")
    return _COMPRESSORS[name](**kwargs)


class ErrorFeedback:
    """Remembers what compression dropped and adds it back at the next sync.

    Each tensor is identified by an integer key (its index in the list being averaged). Before encoding, call
    :meth:`compensate_` to add the stored residual; after encoding, call :meth:`update_` with the encoded input and its
    local decoding to store the new residual ``input - decoded``. Over many syncs the sum of decoded values then
    differs from the sum of inputs only by the latest residual, which is bounded by one round-trip error.

    Example::

        feedback = ErrorFeedback()
        flat = feedback.compensate_(0, pseudo_gradient.flatten().clone())
        payload = compressor.encode(flat)
        feedback.update_(0, flat, compressor.decode(payload, flat.numel()))
    """

    def __init__(self) -> None:
        self._residuals: dict[int, Tensor] = {}

    def residual(self, key: int) -> Tensor | None:
        """The stored residual for ``key``, or ``None`` before its first update."""
        return self._residuals.get(key)

    @torch.no_grad()
    def compensate_(self, key: int, flat: Tensor) -> Tensor:
        """Add the residual stored for ``key`` to ``flat`` in place.

        Args:
            key: Identifies the tensor across syncs.
            flat: 1-D values about to be encoded; modified in place.

        Returns:
            ``flat``.

        Raises:
            ValueError: If the stored residual has a different number of elements.
        """
        residual = self._residuals.get(key)
        if residual is None:
            return flat
        if residual.numel() != flat.numel():
            raise ValueError(
                f"Error-feedback residual {key} has {residual.numel()} elements but the tensor has {flat.numel()}."
            )
        return flat.add_(residual.to(device=flat.device, dtype=flat.dtype))

    @torch.no_grad()
    def update_(self, key: int, flat: Tensor, decoded: Tensor) -> None:
        """Store ``flat - decoded`` as the residual for ``key``.

        Args:
            key: Identifies the tensor across syncs.
            flat: The compensated values that were encoded.
            decoded: What the receivers decode from this rank's payload.
        """
        residual = self._residuals.get(key)
        if residual is None or residual.shape != flat.shape or residual.device != flat.device:
            self._residuals[key] = torch.sub(flat, decoded, out=torch.empty_like(flat, dtype=torch.float32))
        else:
            torch.sub(flat, decoded, out=residual)

    def reset(self) -> None:
        """Forget all residuals."""
        self._residuals.clear()

    def state_dict(self) -> dict[str, Any]:
        """Residuals by key, as copies, for checkpointing."""
        return {"residuals": {key: value.detach().clone() for key, value in self._residuals.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore residuals saved by :meth:`state_dict`.

        Args:
            state_dict: The mapping returned by :meth:`state_dict`.

        Raises:
            KeyError: If ``state_dict`` has no ``"residuals"`` entry.
        """
        self._residuals = {int(key): value.detach().clone() for key, value in state_dict["residuals"].items()}
