"""The packed byte layout and the argument checks every kernel backend shares.

Each backend (torch reference, Triton) assumes its arguments passed these checks, so a bad call
raises the same ValueError whichever backend would have run it.
"""

from __future__ import annotations

import math

import torch

# The code widths the kernels implement: reference._pack/_unpack and triton_kernels'
# _store_packed/_unpack_chunk have one branch each. The codec's integer encodings name a width
# from this tuple (kvcodec/encodings/); a new width starts here.
SUPPORTED_BITS = (8, 4, 3, 2)
MODEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def qrange(bits: int, asymmetric: bool = False) -> tuple[int, int]:
    """(lowest, highest) code of a `bits`-wide integer: two's complement, or unsigned when asymmetric."""
    if asymmetric:
        return 0, (1 << bits) - 1
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def rotation_block(head_dim: int) -> int:
    """The Hadamard block of a head_dim: its largest power-of-two divisor (64 -> 64, 80 -> 16, 96 -> 32).

    A power-of-two head_dim is rotated whole; any other is rotated block-diagonally, one normalized
    Hadamard transform per block of this many channels.
    """
    if head_dim <= 0:
        raise ValueError(f"head_dim must be positive, got {head_dim}")
    return head_dim & -head_dim


def rotation_gain(block: int) -> float:
    """1 / sqrt(block) rounded to fp32: the normalization both backends multiply by after the butterflies
    (exact for blocks that are even powers of two)."""
    return float(torch.tensor(1.0 / math.sqrt(block), dtype=torch.float32))


def scale_shape(heads: int, n: int, groups: int, asymmetric: bool) -> tuple[int, ...]:
    """Shape of the fp16 scales of quantize_pack: [H, K, G], or [H, K, G, 2] (scale, zero) when asymmetric."""
    return (heads, n, groups, 2) if asymmetric else (heads, n, groups)


def unit_values(bits: int) -> int:
    """Codes per packed unit: the fewest `bits`-wide codes that fill whole bytes (8: 1, 4: 2, 3: 8, 2: 4).

    Every width packs the same way: code j of a unit sits at bits j*bits.. of a little-endian word
    of unit_values * bits / 8 bytes (one int8; two int4, the first in the low nibble; eight int3
    in three bytes; four int2 in a byte, the first in bits 0-1). ValueError for a width the kernels do not implement.
    """
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    return math.lcm(bits, 8) // bits


def packed_row_bytes(bits: int, head_dim: int) -> int:
    """Bytes of one packed row of `head_dim` values at `bits` bits each.

    8 bits: head_dim bytes; 4 bits: head_dim / 2 (head_dim even); 3 bits: 3 * head_dim / 8
    (head_dim a multiple of 8); 2 bits: head_dim / 4 (head_dim a multiple of 4). Raises ValueError for other widths or a head_dim that does not
    fill whole packed units.
    """
    unit = unit_values(bits)
    if head_dim <= 0:
        raise ValueError(f"head_dim must be positive, got {head_dim}")
    if head_dim % unit:
        raise ValueError(f"{bits}-bit packing needs head_dim divisible by {unit}, got {head_dim}")
    return head_dim * bits // 8


def _check_group(group_size: int, head_dim: int) -> int:
    if group_size <= 0 or head_dim % group_size:
        raise ValueError(f"group_size {group_size} must be positive and divide head_dim {head_dim}")
    return head_dim // group_size


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(n) for n in t.shape) + "]"


def _check_rotate(rotate: int, head_dim: int) -> None:
    if rotate and (rotate < 2 or rotate & (rotate - 1) or head_dim % rotate):
        raise ValueError(
            f"rotate must be 0 (none) or a power of two >= 2 dividing head_dim {head_dim}, got {rotate} "
            f"(rotation_block gives {rotation_block(head_dim)})"
        )


def check_quantize_args(
    x: torch.Tensor, index: torch.Tensor | None, bits: int, group_size: int, rotate: int = 0
) -> None:
    """Validate quantize_pack arguments; raise ValueError naming the offending one."""
    if x.dim() != 3:
        raise ValueError(f"x must be [heads, seq, head_dim], got shape {_shape(x)}")
    if x.dtype not in MODEL_DTYPES:
        raise ValueError(f"x dtype must be float32, float16 or bfloat16, got {x.dtype}")
    packed_row_bytes(bits, x.shape[2])
    _check_group(group_size, x.shape[2])
    _check_rotate(rotate, x.shape[2])
    if index is not None:
        if index.dim() != 1 or index.dtype != torch.int64:
            raise ValueError(f"index must be a 1-D int64 tensor, got {index.dtype} of shape {_shape(index)}")
        if index.device != x.device:
            raise ValueError(f"index is on {index.device} but x is on {x.device}")


def check_unpack_args(
    payload: torch.Tensor,
    scales: torch.Tensor,
    bits: int,
    group_size: int,
    out: torch.Tensor,
    asymmetric: bool = False,
    rotate: int = 0,
) -> None:
    """Validate unpack_dequantize arguments against the shape of `out`; raise ValueError on mismatch."""
    if out.dim() != 3:
        raise ValueError(f"out must be [heads, n, head_dim], got shape {_shape(out)}")
    if out.dtype not in MODEL_DTYPES:
        raise ValueError(f"out dtype must be float32, float16 or bfloat16, got {out.dtype}")
    heads, n, head_dim = out.shape
    row = packed_row_bytes(bits, head_dim)
    groups = _check_group(group_size, head_dim)
    _check_rotate(rotate, head_dim)
    if payload.dtype != torch.uint8 or tuple(payload.shape) != (heads, n, row):
        raise ValueError(
            f"payload must be uint8 [{heads}, {n}, {row}] for {bits}-bit rows of head_dim {head_dim}, "
            f"got {payload.dtype} {_shape(payload)}"
        )
    want = scale_shape(heads, n, groups, asymmetric)
    if scales.dtype != torch.float16 or tuple(scales.shape) != want:
        raise ValueError(
            f"scales must be float16 [{', '.join(map(str, want))}] for group_size {group_size}"
            f"{' (scale, zero pairs)' if asymmetric else ''}, got {scales.dtype} {_shape(scales)}"
        )
    for name, t in (("payload", payload), ("scales", scales)):
        if t.device != out.device:
            raise ValueError(f"{name} is on {t.device} but out is on {out.device}")


def check_q2c_args(q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor, ctx_start: int, ctx_end: int) -> None:
    """Validate q2c_scores arguments; raise ValueError naming the offending one."""
    if q.dim() != 3 or k.dim() != 3:
        raise ValueError(
            f"q must be [q_heads, rows, head_dim] and k [kv_heads, seq, head_dim], got {_shape(q)} and {_shape(k)}"
        )
    if q.dtype not in MODEL_DTYPES or k.dtype not in MODEL_DTYPES:
        raise ValueError(f"q and k must be float32, float16 or bfloat16, got {q.dtype} and {k.dtype}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"q head_dim {q.shape[2]} != k head_dim {k.shape[2]}")
    if k.shape[0] == 0 or q.shape[0] % k.shape[0]:
        raise ValueError(f"q heads {q.shape[0]} must be a multiple of kv heads {k.shape[0]}")
    if q_pos.dim() != 1 or q_pos.shape[0] != q.shape[1] or q_pos.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"q_pos must be an int64 tensor [{q.shape[1]}] (one position per query row), "
            f"got {q_pos.dtype} {_shape(q_pos)}"
        )
    if not 0 <= ctx_start <= ctx_end <= k.shape[1]:
        raise ValueError(f"context range [{ctx_start}, {ctx_end}) must lie within the {k.shape[1]} keys")
    for name, t in (("k", k), ("q_pos", q_pos)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")


def q2c_prologue(
    q: torch.Tensor, k: torch.Tensor, ctx_start: int, ctx_end: int, scale: float | None
) -> tuple[int, float, torch.Tensor]:
    """What both q2c_scores backends start with: (query heads per kv head, softmax scale, the
    zeroed fp32 output of ctx_end - ctx_start scores). q: [Hq, Lq, D], k: [Hkv, S, D]."""
    group = q.shape[0] // k.shape[0]
    scale = 1.0 / math.sqrt(q.shape[2]) if scale is None else float(scale)
    return group, scale, torch.zeros(ctx_end - ctx_start, dtype=torch.float32, device=q.device)
