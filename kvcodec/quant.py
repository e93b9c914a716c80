"""Quantizers: one dataclass per tensor encoding, each with encode()/decode(), in one registry.

A quantizer turns one layer's K or V for the positions of a chunk, x: [kv_heads, n, head_dim],
into (scales, payload) bytes and back. The integer kinds go through the `kernels` dispatcher
(Triton on CUDA, vectorized torch on CPU), so the bytes are identical whichever path runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvwire import kernels
from kvwire.kvcodec.errors import ConfigError

AXES = ("token", "channel")


def tensor_bytes(t: torch.Tensor) -> bytes:
    """Raw little-endian bytes of a tensor (any dtype, bf16 included)."""
    return t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()


def bytes_tensor(b: bytes | memoryview, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """The inverse of tensor_bytes; the caller has already checked len(b)."""
    return torch.frombuffer(bytearray(b), dtype=torch.uint8).view(dtype).reshape(shape)


@dataclass(frozen=True)
class Quantizer:
    """How one tensor (a layer's K or V) is encoded.

    kind: fp32 | fp16 | bf16 (passthrough) | int8 | int4 | int3. axis: "token" — one scale per (head, position, group
    of `group` channels; 0 = the whole head_dim); "channel" — one scale per (head, channel) over
    the chunk's positions (KIVI-style, for keys with outlier channels; group must be 0).
    """

    kind: str
    axis: str = "token"
    group: int = 0

    bits: ClassVar[dict[str, int]] = {"fp32": 32, "fp16": 16, "bf16": 16, "int8": 8, "int4": 4, "int3": 3}
    float_dtypes: ClassVar[dict[str, torch.dtype]] = {
        "fp32": torch.float32,
        "fp16": torch.float16,
        "bf16": torch.bfloat16,
    }

    def __post_init__(self):
        if self.kind not in self.bits:
            raise ConfigError(f"unknown tensor encoding {self.kind!r}; known: {', '.join(self.bits)}")
        if self.axis not in AXES:
            raise ConfigError(f"unknown quantization axis {self.axis!r}; known: {', '.join(AXES)}")
        if self.group < 0:
            raise ConfigError(f"group must be >= 0, got {self.group}")
        if self.is_float and (self.axis != "token" or self.group):
            raise ConfigError(f"{self.kind} is a passthrough: it takes no axis or group")
        if self.axis == "channel" and self.group:
            raise ConfigError("channel-axis quantization has one scale per channel: group must be 0")

    @property
    def is_float(self) -> bool:
        return self.kind in self.float_dtypes

    @property
    def nbits(self) -> int:
        return self.bits[self.kind]

    def check_head_dim(self, head_dim: int) -> None:
        """Raise ConfigError if this encoding cannot pack rows of head_dim values."""
        if self.axis == "token" and not self.is_float:
            group = self.group or head_dim
            if head_dim % group:
                raise ConfigError(f"group {group} does not divide head_dim {head_dim}")
            if self.nbits == 4 and head_dim % 2 or self.nbits == 3 and head_dim % 8:
                raise ConfigError(
                    f"{self.kind} token-axis packing needs head_dim divisible by {8 if self.nbits == 3 else 2}"
                )

    def _channel_pad(self, n: int) -> int:
        multiple = {8: 1, 4: 2, 3: 8}[self.nbits]  # whole bytes per packed row
        return -(-n // multiple) * multiple

    def sizes(self, heads: int, n: int, head_dim: int) -> tuple[int, int]:
        """(scale bytes, payload bytes) of a chunk of n positions: the decoder checks lengths against these."""
        if self.is_float:
            return 0, heads * n * head_dim * self.nbits // 8
        if self.axis == "token":
            group = self.group or head_dim
            return heads * n * (head_dim // group) * 2, heads * n * kernels.packed_row_bytes(self.nbits, head_dim)
        return heads * head_dim * 2, heads * head_dim * kernels.packed_row_bytes(self.nbits, self._channel_pad(n))

    def encode(self, x: torch.Tensor) -> tuple[bytes, bytes]:
        """x: [heads, n, head_dim] -> (scales, payload) bytes."""
        if self.is_float:
            return b"", tensor_bytes(x.to(self.float_dtypes[self.kind]))
        if self.axis == "token":
            payload, scales = kernels.quantize_pack(x, None, self.nbits, self.group or x.shape[-1])
        else:
            n = x.shape[1]
            xt = torch.nn.functional.pad(x.transpose(1, 2), (0, self._channel_pad(n) - n))
            payload, scales = kernels.quantize_pack(xt, None, self.nbits, xt.shape[-1])
        return tensor_bytes(scales), tensor_bytes(payload)

    def decode(self, scales: bytes, payload: bytes, out: torch.Tensor) -> torch.Tensor:
        """Fill out: [heads, n, head_dim] (model dtype) from bytes whose lengths match sizes()."""
        heads, n, head_dim = out.shape
        if self.is_float:
            src = bytes_tensor(payload, self.float_dtypes[self.kind], (heads, n, head_dim))
            return out.copy_(src)
        row = kernels.packed_row_bytes
        if self.axis == "token":
            group = self.group or head_dim
            s = bytes_tensor(scales, torch.float16, (heads, n, head_dim // group)).to(out.device)
            p = bytes_tensor(payload, torch.uint8, (heads, n, row(self.nbits, head_dim))).to(out.device)
            return kernels.unpack_dequantize(p, s, self.nbits, group, out)
        padded = self._channel_pad(n)
        s = bytes_tensor(scales, torch.float16, (heads, head_dim, 1)).to(out.device)
        p = bytes_tensor(payload, torch.uint8, (heads, head_dim, row(self.nbits, padded))).to(out.device)
        tmp = torch.empty(heads, head_dim, padded, dtype=out.dtype, device=out.device)
        kernels.unpack_dequantize(p, s, self.nbits, padded, tmp)
        return out.copy_(tmp[:, :, :n].transpose(1, 2))
