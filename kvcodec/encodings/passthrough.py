"""The passthrough family: x cast to a float dtype, no scales (fp32, fp16, bf16)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvwire.kvcodec.encodings.base import Encoding, bytes_tensor, tensor_bytes
from kvwire.kvcodec.errors import ConfigError


@dataclass(frozen=True)
class Passthrough(Encoding):
    """Payload: x cast to `dtype`, row-major [heads][n][head_dim], little-endian; no scales.

    Exact when `dtype` is the model's own dtype; takes neither the channel axis nor a group.
    """

    name: str
    code: int
    dtype: torch.dtype

    axes: ClassVar[tuple[str, ...]] = ("token",)

    @property
    def bits(self) -> int:
        return torch.finfo(self.dtype).bits

    def check(self, axis: str, group: int) -> None:
        if axis != "token" or group:
            raise ConfigError(f"{self.name} is a passthrough: it takes no axis or group")

    def check_head_dim(self, axis: str, group: int, head_dim: int) -> None:
        pass  # any row length casts

    def sizes(self, axis: str, group: int, heads: int, n: int, head_dim: int) -> tuple[int, int]:
        return 0, heads * n * head_dim * self.bits // 8

    def encode(self, x: torch.Tensor, axis: str, group: int) -> tuple[bytes, bytes]:
        return b"", tensor_bytes(x.to(self.dtype))

    def decode(self, scales: bytes, payload: bytes, out: torch.Tensor, axis: str, group: int) -> torch.Tensor:
        return out.copy_(bytes_tensor(payload, self.dtype, tuple(out.shape)))
