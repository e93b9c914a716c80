"""The integer families: fp16 scales (and zero points) plus `bits`-wide codes packed by the kernels.

SymmetricInt (int8, int4, int3, int2): one scale per block, codes in [-2**(b-1), 2**(b-1) - 1].
AsymmetricInt (asym4, asym3, asym2): a (scale, zero point) pair per block, codes in [0, 2**b - 1]
(the zero point is stored as the fp16 value code 0 decodes to: the block's minimum). Either may
be `rotate`d: each head's rows go through the normalized Hadamard transform before quantizing
and back after dequantizing (kernels.hadamard; block-diagonal where head_dim is not a power of
two), which spreads outlier channels over the whole row. Rotated encodings take the token axis
only: rotation and per-channel scales are two cures for the same outlier channels, and the
channel axis quantizes across positions, where no rotation applies.

The code width must be one the kernels implement (kernels.SUPPORTED_BITS); how codes fill bytes
is the kernels' fact too (kernels.unit_values), so this file knows no per-width detail.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvwire import kernels
from kvwire.kvcodec.encodings.base import Encoding, bytes_tensor, tensor_bytes
from kvwire.kvcodec.errors import ConfigError


@dataclass(frozen=True)
class IntegerCodes(Encoding):
    """Codes of `bits` bits with fp16 scales, on the token or the channel axis.

    axis "token": one scale (pair) per (head, position, group of `group` channels; 0 = the whole
    head_dim). axis "channel" (KIVI-style, for keys with outlier channels): one scale (pair) per
    (head, channel, group of `group` positions of the chunk; 0 = all of them). The chunk's
    positions are cut into n // group full groups and a tail group of the rest; the tail is padded
    to whole packed units (zeros when symmetric, its last value repeated when asymmetric, so the
    padding never widens its range) and the decoder drops the padding.
    """

    name: str
    code: int
    bits: int
    rotate: bool = False

    asymmetric: ClassVar[bool] = False

    def __post_init__(self):
        if self.bits not in kernels.SUPPORTED_BITS:
            raise ValueError(
                f"encoding {self.name!r}: the kernels pack no {self.bits}-bit codes "
                f"(supported: {', '.join(map(str, kernels.SUPPORTED_BITS))})"
            )

    @property
    def axes(self) -> tuple[str, ...]:
        return ("token",) if self.rotate else ("token", "channel")

    @property
    def _scale_bytes(self) -> int:  # per block: an fp16 scale, and an fp16 zero point if asymmetric
        return 4 if self.asymmetric else 2

    def _rotation(self, head_dim: int) -> int:
        return kernels.rotation_block(head_dim) if self.rotate else 0

    def check(self, axis: str, group: int) -> None:
        if axis not in self.axes:
            raise ConfigError(f"{self.name} is rotated: it takes the token axis only (got axis {axis!r})")
        unit = kernels.unit_values(self.bits)
        if axis == "channel" and group % unit:
            raise ConfigError(
                f"{self.name} channel-axis groups are positions packed in whole bytes: group must be 0 "
                f"(the whole chunk) or a multiple of {unit}, got {group}"
            )

    def check_head_dim(self, axis: str, group: int, head_dim: int) -> None:
        if axis == "token":
            group = group or head_dim
            if head_dim % group:
                raise ConfigError(f"group {group} does not divide head_dim {head_dim}")
            unit = kernels.unit_values(self.bits)
            if head_dim % unit:
                raise ConfigError(f"{self.name} token-axis packing needs head_dim divisible by {unit}")
        if self.rotate and kernels.rotation_block(head_dim) < 2:
            raise ConfigError(f"{self.name} rotates pairs of channels at least: head_dim {head_dim} is odd")

    def _channel_split(self, n: int, group: int) -> tuple[int, int, int]:
        """(positions in full groups, tail positions, padded tail) of a chunk of n positions."""
        full = n // group * group if group else 0
        unit = kernels.unit_values(self.bits)
        tail = n - full
        return full, tail, -(-tail // unit) * unit

    def sizes(self, axis: str, group: int, heads: int, n: int, head_dim: int) -> tuple[int, int]:
        row = kernels.packed_row_bytes
        if axis == "token":
            group = group or head_dim
            return heads * n * (head_dim // group) * self._scale_bytes, heads * n * row(self.bits, head_dim)
        full, tail, padded = self._channel_split(n, group)
        blocks = (full // group if full else 0) + (1 if tail else 0)
        payload = (row(self.bits, full) if full else 0) + (row(self.bits, padded) if tail else 0)
        return heads * head_dim * blocks * self._scale_bytes, heads * head_dim * payload

    def _quantize(self, x: torch.Tensor, group: int, rotate: int = 0) -> tuple[bytes, bytes]:
        payload, scales = kernels.quantize_pack(x, None, self.bits, group, self.asymmetric, rotate)
        return tensor_bytes(scales), tensor_bytes(payload)

    def encode(self, x: torch.Tensor, axis: str, group: int) -> tuple[bytes, bytes]:
        if axis == "token":
            return self._quantize(x, group or x.shape[-1], self._rotation(x.shape[-1]))
        xt = x.transpose(1, 2)  # [heads, head_dim, n]: one row per (head, channel)
        full, tail, padded = self._channel_split(x.shape[1], group)
        parts = []
        if full:
            parts.append(self._quantize(xt[:, :, :full], group))
        if tail:
            mode = "replicate" if self.asymmetric else "constant"
            rest = torch.nn.functional.pad(xt[:, :, full:], (0, padded - tail), mode=mode)
            parts.append(self._quantize(rest, padded))
        return b"".join(s for s, _ in parts), b"".join(p for _, p in parts)

    def _dequantize(self, scales, payload, group: int, out: torch.Tensor, rotate: int = 0) -> torch.Tensor:
        heads, n, width = out.shape
        shape = (heads, n, width // group) + ((2,) if self.asymmetric else ())
        s = bytes_tensor(scales, torch.float16, shape).to(out.device)
        p = bytes_tensor(payload, torch.uint8, (heads, n, kernels.packed_row_bytes(self.bits, width))).to(out.device)
        return kernels.unpack_dequantize(p, s, self.bits, group, out, self.asymmetric, rotate)

    def decode(self, scales: bytes, payload: bytes, out: torch.Tensor, axis: str, group: int) -> torch.Tensor:
        heads, n, head_dim = out.shape
        if axis == "token":
            return self._dequantize(scales, payload, group or head_dim, out, self._rotation(head_dim))
        full, tail, padded = self._channel_split(n, group)
        s_at = p_at = 0
        for start, width, block in ((0, full, group), (full, padded, padded)):
            if not width:
                continue
            ns = heads * head_dim * (width // block) * self._scale_bytes
            np_ = heads * head_dim * kernels.packed_row_bytes(self.bits, width)
            tmp = torch.empty(heads, head_dim, width, dtype=out.dtype, device=out.device)
            self._dequantize(scales[s_at : s_at + ns], payload[p_at : p_at + np_], block, tmp)
            s_at, p_at = s_at + ns, p_at + np_
            used = min(width, n - start)
            out[:, start : start + used].copy_(tmp[:, :, :used].transpose(1, 2))
        return out


@dataclass(frozen=True)
class SymmetricInt(IntegerCodes):
    """Codes clamp(round_half_even(x / s)) with one fp16 scale s = absmax / (2**(bits-1) - 1) per block."""


@dataclass(frozen=True)
class AsymmetricInt(IntegerCodes):
    """Codes clamp(round_half_even((x - z) / s), 0, 2**bits - 1) with an fp16 zero point z = min and
    scale s = (max - z) / (2**bits - 1) per block: the whole code range covers [min, max]."""

    asymmetric: ClassVar[bool] = True
