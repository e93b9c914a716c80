"""The symmetric integer family: fp16 scales and `bits`-wide codes packed by the kernels (int8, int4, int3).

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
class SymmetricInt(Encoding):
    """Codes clamp(round_half_even(x / s)) with one fp16 scale s = absmax / (2**(bits-1) - 1) per block.

    axis "token": one scale per (head, position, group of `group` channels; 0 = the whole
    head_dim). axis "channel": one scale per (head, channel) over the chunk's positions
    (KIVI-style, for keys with outlier channels; group must be 0), the positions zero-padded to
    whole packed units.
    """

    name: str
    code: int
    bits: int

    axes: ClassVar[tuple[str, ...]] = ("token", "channel")

    def __post_init__(self):
        if self.bits not in kernels.SUPPORTED_BITS:
            raise ValueError(
                f"encoding {self.name!r}: the kernels pack no {self.bits}-bit codes "
                f"(supported: {', '.join(map(str, kernels.SUPPORTED_BITS))})"
            )

    def check(self, axis: str, group: int) -> None:
        if axis == "channel" and group:
            raise ConfigError("channel-axis quantization has one scale per channel: group must be 0")

    def check_head_dim(self, axis: str, group: int, head_dim: int) -> None:
        if axis == "token":
            group = group or head_dim
            if head_dim % group:
                raise ConfigError(f"group {group} does not divide head_dim {head_dim}")
            unit = kernels.unit_values(self.bits)
            if head_dim % unit:
                raise ConfigError(f"{self.name} token-axis packing needs head_dim divisible by {unit}")

    def _channel_pad(self, n: int) -> int:
        unit = kernels.unit_values(self.bits)  # whole bytes per packed row
        return -(-n // unit) * unit

    def sizes(self, axis: str, group: int, heads: int, n: int, head_dim: int) -> tuple[int, int]:
        row = kernels.packed_row_bytes
        if axis == "token":
            group = group or head_dim
            return heads * n * (head_dim // group) * 2, heads * n * row(self.bits, head_dim)
        return heads * head_dim * 2, heads * head_dim * row(self.bits, self._channel_pad(n))

    def encode(self, x: torch.Tensor, axis: str, group: int) -> tuple[bytes, bytes]:
        if axis == "token":
            payload, scales = kernels.quantize_pack(x, None, self.bits, group or x.shape[-1])
        else:
            n = x.shape[1]
            xt = torch.nn.functional.pad(x.transpose(1, 2), (0, self._channel_pad(n) - n))  # [heads, head_dim, n_pad]
            payload, scales = kernels.quantize_pack(xt, None, self.bits, xt.shape[-1])
        return tensor_bytes(scales), tensor_bytes(payload)

    def decode(self, scales: bytes, payload: bytes, out: torch.Tensor, axis: str, group: int) -> torch.Tensor:
        heads, n, head_dim = out.shape
        row = kernels.packed_row_bytes
        if axis == "token":
            group = group or head_dim
            s = bytes_tensor(scales, torch.float16, (heads, n, head_dim // group)).to(out.device)
            p = bytes_tensor(payload, torch.uint8, (heads, n, row(self.bits, head_dim))).to(out.device)
            return kernels.unpack_dequantize(p, s, self.bits, group, out)
        padded = self._channel_pad(n)
        s = bytes_tensor(scales, torch.float16, (heads, head_dim, 1)).to(out.device)
        p = bytes_tensor(payload, torch.uint8, (heads, head_dim, row(self.bits, padded))).to(out.device)
        tmp = torch.empty(heads, head_dim, padded, dtype=out.dtype, device=out.device)
        kernels.unpack_dequantize(p, s, self.bits, padded, tmp)
        return out.copy_(tmp[:, :, :n].transpose(1, 2))
