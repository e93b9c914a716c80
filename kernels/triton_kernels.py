"""Triton kernels for quantize+pack, unpack+dequantize and q2c scores, with their launchers.

The launchers take the same arguments as kernels.reference and must agree with it: packed bytes
and scales bit for bit, q2c scores to fp32 rounding. Under TRITON_INTERPRET=1 the same kernels run
on CPU tensors; that is Triton's switch, read by @triton.jit when this module is imported, so the
variable must be set before the import and later changes have no effect. `interpreted()` asks the
kernels which mode they were built in; the interpreter runs programs one after another, so the
launchers pick much larger blocks there. kernels.compile_check compiles the GPU
configurations to cubins without a GPU, to catch compile errors and register spills.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

from . import reference
from .layout import packed_row_bytes, q2c_prologue, rotation_gain, scale_shape

# GPU tiles of quantize/unpack hold at most this many values: 8 per thread at 4 warps keeps every
# variant under ~64 registers with no spills (ptxas, sm_90); 4x larger tiles spill in unpack.
_GPU_TILE = 1024
# Interpreter tiles can be large: numpy handles them in one call, and programs run serially.
_INTERP_TILE = 1 << 17
# Widest channel chunk per loop step on GPU; longer rows (channel-axis codes) loop over chunks.
_GPU_MAX_CHUNK = 1024
# In the interpreter a whole row up to this width is one chunk.
_INTERP_MAX_CHUNK = 8192


def interpreted() -> bool:
    """Whether this module's kernels run in the Triton interpreter: @triton.jit built compiled
    JITFunctions, or interpreted ones because TRITON_INTERPRET=1 was set when this module was imported."""
    return not isinstance(_quantize_pack_kernel, JITFunction)


def runs_on(device: torch.device) -> bool:
    """Whether these kernels can take tensors on `device` in this process."""
    if device.type == "cuda":
        return torch.cuda.is_available()
    return device.type == "cpu" and interpreted()


# ----------------------------------------------------------------------------- shared pieces

# tl.max / tl.sum / tl.zeros are themselves @jit functions, fixed as compiled-only when triton is
# first imported; if triton was imported before TRITON_INTERPRET was set (importing transformers'
# models does that), the interpreter cannot call them. tl.reduce with triton's own combine
# functions is the same IR as tl.max / tl.sum on fp32 and int32, and the interpreter runs it in
# one numpy call.


@triton.jit
def _max(x, axis: tl.constexpr):
    return tl.reduce(x, axis, tl.standard._elementwise_max)


@triton.jit
def _sum(x, axis: tl.constexpr):
    return tl.reduce(x, axis, tl.standard._sum_combine)


@triton.jit
def _round_half_even(y):
    # libdevice rint is missing from the interpreter; floor arithmetic is exact for |y| < 2**23.
    r = tl.floor(y)
    d = y - r
    odd = (r - 2.0 * tl.floor(r * 0.5)) == 1.0
    up = (d > 0.5) | ((d == 0.5) & odd)
    return r + up.to(tl.float32)


@triton.jit
def _scale_of(absmax, QMAX: tl.constexpr):
    # fp16(absmax / qmax) with an IEEE division (plain `/` is approximate on GPU), then back to
    # fp32; also returns a divisor that is 1 where the scale underflowed to 0 (see reference).
    scale16 = tl.math.div_rn(absmax, tl.full(absmax.shape, QMAX, tl.float32)).to(tl.float16)
    s = scale16.to(tl.float32)
    return scale16, tl.where(s > 0.0, s, 1.0)


@triton.jit
def _codes(x, divisor, BITS: tl.constexpr):
    lo: tl.constexpr = -(1 << (BITS - 1))
    hi: tl.constexpr = (1 << (BITS - 1)) - 1
    y = tl.math.div_rn(x, divisor)
    y = tl.minimum(tl.maximum(y, lo), hi)  # clamping first is exact: the bounds are integers
    return _round_half_even(y).to(tl.int32)


@triton.jit
def _affine_of(mn, mx, QMAX: tl.constexpr):
    # The asymmetric (scale, zero) of groups with minimum mn and maximum mx, as in
    # reference._quantize_asym: zero = fp16(mn), scale = fp16((mx - zero) / qmax); also the fp32
    # divisor (1 where the scale is not positive) and the fp32 zero.
    zero16 = mn.to(tl.float16)
    z = zero16.to(tl.float32)
    scale16 = tl.math.div_rn(mx - z, tl.full(mx.shape, QMAX, tl.float32)).to(tl.float16)
    s = scale16.to(tl.float32)
    return scale16, zero16, tl.where(s > 0.0, s, 1.0), z


@triton.jit
def _codes_asym(x, divisor, zero, BITS: tl.constexpr):
    hi: tl.constexpr = (1 << BITS) - 1
    y = tl.math.div_rn(x - zero, divisor)
    y = tl.minimum(tl.maximum(y, 0.0), hi)
    return _round_half_even(y).to(tl.int32)


@triton.jit
def _butterfly(x, H: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr):
    # One Hadamard stage: channel i pairs with i + H inside blocks of 2H, (a, b) -> (a + b, a - b).
    v = tl.permute(tl.reshape(x, [BLOCK_K, BLOCK_C // (2 * H), 2, H]), (0, 1, 3, 2))  # [.., H, 2]
    a, b = tl.split(v)
    y = tl.permute(tl.join(a + b, a - b), (0, 1, 3, 2))
    return tl.reshape(y, [BLOCK_K, BLOCK_C])


@triton.jit
def _hadamard(x, STAGES: tl.constexpr, GAIN: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr):
    # reference.hadamard (block 2**STAGES) on a [BLOCK_K, BLOCK_C] fp32 tile whose chunk starts on a
    # block boundary: the same stages in the same order, then one multiplication by the fp32 gain.
    for s in tl.static_range(STAGES):
        x = _butterfly(x, 1 << s, BLOCK_K, BLOCK_C)
    return x * GAIN


@triton.jit
def _to_bf16(x):
    # Round fp32 to nearest-even bf16 by bit arithmetic: the interpreter's own conversion
    # truncates, and this is exact on GPU too (finite inputs).
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _load_chunk(x_rows, row_ok, c0, D, sxd, BLOCK_C: tl.constexpr):
    cols = c0 + tl.arange(0, BLOCK_C)
    mask = row_ok[:, None] & (cols < D)[None, :]
    return tl.load(x_rows[:, None] + cols[None, :] * sxd, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _store_packed(q, p_rows, row_ok, c0, D, BITS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr):
    # q: [BLOCK_K, BLOCK_C] int32 codes of channels c0..c0+BLOCK_C; c0 is a multiple of 8, so a
    # chunk always starts on a whole packed unit.
    if BITS == 8:
        cols = c0 + tl.arange(0, BLOCK_C)
        mask = row_ok[:, None] & (cols < D)[None, :]
        tl.store(p_rows[:, None] + cols[None, :], (q & 0xFF).to(tl.uint8), mask=mask)
    elif BITS == 4:
        u = tl.reshape(q & 0xF, [BLOCK_K, BLOCK_C // 2, 2])
        byte = _sum(u << (tl.arange(0, 2) * 4)[None, None, :], axis=2)  # low nibble = even channel
        cols = c0 // 2 + tl.arange(0, BLOCK_C // 2)
        mask = row_ok[:, None] & (cols < D // 2)[None, :]
        tl.store(p_rows[:, None] + cols[None, :], byte.to(tl.uint8), mask=mask)
    elif BITS == 2:
        u = tl.reshape(q & 0x3, [BLOCK_K, BLOCK_C // 4, 4])
        byte = _sum(u << (tl.arange(0, 4) * 2)[None, None, :], axis=2)  # code j at bits 2j
        cols = c0 // 4 + tl.arange(0, BLOCK_C // 4)
        mask = row_ok[:, None] & (cols < D // 4)[None, :]
        tl.store(p_rows[:, None] + cols[None, :], byte.to(tl.uint8), mask=mask)
    else:
        u = tl.reshape(q & 0x7, [BLOCK_K, BLOCK_C // 8, 8])
        word = _sum(u << (tl.arange(0, 8) * 3)[None, None, :], axis=2)  # code j at bit 3j
        b = tl.arange(0, 4)  # 3 bytes per word, padded to a power of two and masked
        byte = (word[:, :, None] >> (b * 8)[None, None, :]) & 0xFF
        units = c0 // 8 + tl.arange(0, BLOCK_C // 8)
        offs = (units * 3)[None, :, None] + b[None, None, :]
        mask = row_ok[:, None, None] & (units < D // 8)[None, :, None] & (b < 3)[None, None, :]
        tl.store(p_rows[:, None, None] + offs, byte.to(tl.uint8), mask=mask)


# ----------------------------------------------------------------------------- quantize + pack


@triton.jit
def _load_rows(x_rows, row_ok, c0, D, sxd, STAGES: tl.constexpr, GAIN: tl.constexpr, BLOCK_K, BLOCK_C: tl.constexpr):
    x = _load_chunk(x_rows, row_ok, c0, D, sxd, BLOCK_C)
    if STAGES > 0:
        x = _hadamard(x, STAGES, GAIN, BLOCK_K, BLOCK_C)
    return x


@triton.jit
def _quantize_pack_kernel(
    x_ptr,
    idx_ptr,
    p_ptr,
    s_ptr,
    K,
    D,
    G,
    RB,
    sxh,
    sxs,
    sxd,
    HAS_INDEX: tl.constexpr,
    BITS: tl.constexpr,
    GS: tl.constexpr,
    ROW_GROUP: tl.constexpr,
    ONE_CHUNK: tl.constexpr,
    ASYM: tl.constexpr,
    STAGES: tl.constexpr,
    GAIN: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # grid: (cdiv(K, BLOCK_K), H). One program quantizes BLOCK_K gathered rows of one head, rotated
    # first when STAGES > 0 (a Hadamard block of 2**STAGES channels). Asymmetric scales are
    # (scale, zero) pairs: scale at 2 * i, zero at 2 * i + 1.
    QMAX: tl.constexpr = (1 << BITS) - 1 if ASYM else (1 << (BITS - 1)) - 1
    h = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = rows < K
    if HAS_INDEX:
        src = tl.load(idx_ptr + rows, mask=row_ok, other=0)
    else:
        src = rows
    x_rows = x_ptr + h * sxh + src.to(tl.int64) * sxs
    out_rows = h * K + rows.to(tl.int64)
    p_rows = p_ptr + out_rows * RB
    if ROW_GROUP:
        # One scale per row (group_size == D): the row's range first, then codes. Columns past D
        # are loaded as 0: they never change an absmax, but are kept out of a min and a max.
        if ONE_CHUNK:
            x = _load_rows(x_rows, row_ok, 0, D, sxd, STAGES, GAIN, BLOCK_K, BLOCK_C)
            if ASYM:
                col_ok = (tl.arange(0, BLOCK_C) < D)[None, :]
                mn = -_max(tl.where(col_ok, -x, float("-inf")), axis=1)
                mx = _max(tl.where(col_ok, x, float("-inf")), axis=1)
                scale16, zero16, div, z = _affine_of(mn, mx, QMAX)
                tl.store(s_ptr + 2 * out_rows, scale16, mask=row_ok)
                tl.store(s_ptr + 2 * out_rows + 1, zero16, mask=row_ok)
                q = _codes_asym(x, div[:, None], z[:, None], BITS)
            else:
                scale16, div = _scale_of(_max(tl.abs(x), axis=1), QMAX)
                tl.store(s_ptr + out_rows, scale16, mask=row_ok)
                q = _codes(x, div[:, None], BITS)
            _store_packed(q, p_rows, row_ok, 0, D, BITS, BLOCK_K, BLOCK_C)
        else:
            if ASYM:
                neg_min = tl.full([BLOCK_K], float("-inf"), tl.float32)
                top = tl.full([BLOCK_K], float("-inf"), tl.float32)
            else:
                absmax = tl.full([BLOCK_K], 0.0, tl.float32)
            for c0 in range(0, D, BLOCK_C):
                x = _load_rows(x_rows, row_ok, c0, D, sxd, STAGES, GAIN, BLOCK_K, BLOCK_C)
                if ASYM:
                    col_ok = (c0 + tl.arange(0, BLOCK_C) < D)[None, :]
                    neg_min = tl.maximum(neg_min, _max(tl.where(col_ok, -x, float("-inf")), axis=1))
                    top = tl.maximum(top, _max(tl.where(col_ok, x, float("-inf")), axis=1))
                else:
                    absmax = tl.maximum(absmax, _max(tl.abs(x), axis=1))
            if ASYM:
                scale16, zero16, div, z = _affine_of(-neg_min, top, QMAX)
                tl.store(s_ptr + 2 * out_rows, scale16, mask=row_ok)
                tl.store(s_ptr + 2 * out_rows + 1, zero16, mask=row_ok)
            else:
                scale16, div = _scale_of(absmax, QMAX)
                tl.store(s_ptr + out_rows, scale16, mask=row_ok)
            for c0 in range(0, D, BLOCK_C):
                x = _load_rows(x_rows, row_ok, c0, D, sxd, STAGES, GAIN, BLOCK_K, BLOCK_C)
                if ASYM:
                    q = _codes_asym(x, div[:, None], z[:, None], BITS)
                else:
                    q = _codes(x, div[:, None], BITS)
                _store_packed(q, p_rows, row_ok, c0, D, BITS, BLOCK_K, BLOCK_C)
    else:
        # GS is a power of two dividing BLOCK_C, so groups never straddle a chunk (and groups past
        # D are whole padding groups, never stored).
        NG: tl.constexpr = BLOCK_C // GS
        for c0 in range(0, D, BLOCK_C):
            x = _load_rows(x_rows, row_ok, c0, D, sxd, STAGES, GAIN, BLOCK_K, BLOCK_C)
            x3 = tl.reshape(x, [BLOCK_K, NG, GS])
            g = c0 // GS + tl.arange(0, NG)
            s_at = out_rows[:, None] * G + g[None, :]
            s_ok = row_ok[:, None] & (g < G)[None, :]
            if ASYM:
                scale16, zero16, div, z = _affine_of(-_max(-x3, axis=2), _max(x3, axis=2), QMAX)
                tl.store(s_ptr + 2 * s_at, scale16, mask=s_ok)
                tl.store(s_ptr + 2 * s_at + 1, zero16, mask=s_ok)
                div = tl.reshape(tl.broadcast_to(div[:, :, None], [BLOCK_K, NG, GS]), [BLOCK_K, BLOCK_C])
                z = tl.reshape(tl.broadcast_to(z[:, :, None], [BLOCK_K, NG, GS]), [BLOCK_K, BLOCK_C])
                q = _codes_asym(x, div, z, BITS)
            else:
                scale16, div = _scale_of(_max(tl.abs(x3), axis=2), QMAX)
                tl.store(s_ptr + s_at, scale16, mask=s_ok)
                div = tl.reshape(tl.broadcast_to(div[:, :, None], [BLOCK_K, NG, GS]), [BLOCK_K, BLOCK_C])
                q = _codes(x, div, BITS)
            _store_packed(q, p_rows, row_ok, c0, D, BITS, BLOCK_K, BLOCK_C)


def _rotation_consts(rotate: int) -> dict:
    """The rotation constexprs of both kernels: butterfly stages and the fp32 gain (0 and 1.0: none)."""
    return {"STAGES": rotate.bit_length() - 1 if rotate else 0, "GAIN": rotation_gain(rotate) if rotate else 1.0}


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def row_blocks(rows: int, head_dim: int, interpret: bool) -> tuple[int, int]:
    """(BLOCK_K, BLOCK_C) of quantize/unpack for a [rows, head_dim] slab, for the interpreter or a GPU:
    powers of two, BLOCK_C >= 8 (one int3 unit). Also used by tools that compile the kernels ahead of time."""
    max_chunk, tile = (_INTERP_MAX_CHUNK, _INTERP_TILE) if interpret else (_GPU_MAX_CHUNK, _GPU_TILE)
    block_c = max(8, min(_next_pow2(head_dim), max_chunk))
    block_k = max(1, min(_next_pow2(rows), tile // block_c))
    return block_k, block_c


def quantize_pack(
    x: torch.Tensor,
    index: torch.Tensor | None,
    bits: int,
    group_size: int,
    asymmetric: bool = False,
    rotate: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of reference.quantize_pack (same arguments, same bytes)."""
    heads, seq, head_dim = x.shape
    n = seq if index is None else index.shape[0]
    block_k, block_c = row_blocks(n, head_dim, interpreted())
    row_group = group_size == head_dim
    if (not row_group and (group_size & (group_size - 1) or group_size > block_c)) or rotate > block_c:
        # Groups that are not a power of two would straddle chunks, and a rotation block wider
        # than a chunk cannot be done in registers; the reference runs on the same device and
        # yields the same bytes.
        return reference.quantize_pack(x, index, bits, group_size, asymmetric, rotate)
    groups = head_dim // group_size
    payload = torch.empty(heads, n, packed_row_bytes(bits, head_dim), dtype=torch.uint8, device=x.device)
    scales = torch.empty(scale_shape(heads, n, groups, asymmetric), dtype=torch.float16, device=x.device)
    if n == 0 or heads == 0:
        return payload, scales
    grid = (triton.cdiv(n, block_k), heads)
    _quantize_pack_kernel[grid](
        x,
        index.contiguous() if index is not None else payload,
        payload,
        scales,
        n,
        head_dim,
        groups,
        payload.shape[2],
        x.stride(0),
        x.stride(1),
        x.stride(2),
        HAS_INDEX=index is not None,
        BITS=bits,
        GS=0 if row_group else group_size,
        ROW_GROUP=row_group,
        ONE_CHUNK=head_dim <= block_c,
        ASYM=asymmetric,
        **_rotation_consts(rotate),
        BLOCK_K=block_k,
        BLOCK_C=block_c,
    )
    return payload, scales


# ----------------------------------------------------------------------------- unpack + dequantize


@triton.jit
def _unpack_chunk(p_rows, cols, mask, BITS: tl.constexpr, SIGNED: tl.constexpr):
    # Returns the int32 codes of channels `cols` (a gather: neighbours share bytes), sign-extended
    # when SIGNED (symmetric codes), the raw unsigned code otherwise (asymmetric codes).
    if BITS == 8:
        u = tl.load(p_rows[:, None] + cols[None, :], mask=mask, other=0).to(tl.int32)
    elif BITS == 4:
        b = tl.load(p_rows[:, None] + (cols // 2)[None, :], mask=mask, other=0).to(tl.int32)
        u = (b >> ((cols & 1) * 4)[None, :]) & 0xF
    elif BITS == 2:
        b = tl.load(p_rows[:, None] + (cols // 4)[None, :], mask=mask, other=0).to(tl.int32)
        u = (b >> ((cols & 3) * 2)[None, :]) & 0x3
    else:
        base = p_rows[:, None] + ((cols // 8) * 3)[None, :]
        b0 = tl.load(base, mask=mask, other=0).to(tl.int32)
        b1 = tl.load(base + 1, mask=mask, other=0).to(tl.int32)
        b2 = tl.load(base + 2, mask=mask, other=0).to(tl.int32)
        u = ((b0 | (b1 << 8) | (b2 << 16)) >> ((cols & 7) * 3)[None, :]) & 0x7
    if SIGNED:
        u = u - ((u & (1 << (BITS - 1))) << 1)
    return u


@triton.jit
def _unpack_dequantize_kernel(
    p_ptr,
    s_ptr,
    o_ptr,
    K,
    D,
    G,
    RB,
    soh,
    sok,
    sod,
    BITS: tl.constexpr,
    GS: tl.constexpr,
    ROW_GROUP: tl.constexpr,
    OUT_BF16: tl.constexpr,
    ASYM: tl.constexpr,
    STAGES: tl.constexpr,
    GAIN: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # grid: (cdiv(K, BLOCK_K), H). payload and scales are contiguous; out may be strided. With
    # STAGES > 0 each chunk is rotated back (the transform is its own inverse) before the store.
    h = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = rows < K
    in_rows = h * K + rows.to(tl.int64)
    p_rows = p_ptr + in_rows * RB
    o_rows = o_ptr + h * soh + rows.to(tl.int64) * sok
    if ROW_GROUP:
        if ASYM:
            row_scale = tl.load(s_ptr + 2 * in_rows, mask=row_ok, other=0.0).to(tl.float32)
            row_zero = tl.load(s_ptr + 2 * in_rows + 1, mask=row_ok, other=0.0).to(tl.float32)
        else:
            row_scale = tl.load(s_ptr + in_rows, mask=row_ok, other=0.0).to(tl.float32)
    for c0 in range(0, D, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        mask = row_ok[:, None] & (cols < D)[None, :]
        q = _unpack_chunk(p_rows, cols, mask, BITS, not ASYM).to(tl.float32)
        # q * scale is exact in fp32 (an 8-bit code times an fp16 value), so adding the zero
        # rounds once, fused or not.
        if ROW_GROUP:
            x = q * row_scale[:, None]
            if ASYM:
                x = x + row_zero[:, None]
        else:
            at = in_rows[:, None] * G + (cols // GS)[None, :]
            if ASYM:
                s = tl.load(s_ptr + 2 * at, mask=mask, other=0.0).to(tl.float32)
                x = q * s + tl.load(s_ptr + 2 * at + 1, mask=mask, other=0.0).to(tl.float32)
            else:
                x = q * tl.load(s_ptr + at, mask=mask, other=0.0).to(tl.float32)
        if STAGES > 0:
            x = _hadamard(x, STAGES, GAIN, BLOCK_K, BLOCK_C)
        if OUT_BF16:
            y = _to_bf16(x)
        else:
            y = x.to(o_ptr.dtype.element_ty)
        tl.store(o_rows[:, None] + cols[None, :] * sod, y, mask=mask)


def unpack_dequantize(
    payload: torch.Tensor,
    scales: torch.Tensor,
    bits: int,
    group_size: int,
    out: torch.Tensor,
    asymmetric: bool = False,
    rotate: int = 0,
) -> torch.Tensor:
    """Triton version of reference.unpack_dequantize; `out` may be a strided view."""
    heads, n, head_dim = out.shape
    if n == 0 or heads == 0:
        return out
    block_k, block_c = row_blocks(n, head_dim, interpreted())
    if rotate > block_c:  # see quantize_pack
        return reference.unpack_dequantize(payload, scales, bits, group_size, out, asymmetric, rotate)
    payload, scales = payload.contiguous(), scales.contiguous()
    row_group = group_size == head_dim
    grid = (triton.cdiv(n, block_k), heads)
    _unpack_dequantize_kernel[grid](
        payload,
        scales,
        out,
        n,
        head_dim,
        head_dim // group_size,
        payload.shape[2],
        out.stride(0),
        out.stride(1),
        out.stride(2),
        BITS=bits,
        GS=0 if row_group else group_size,
        ROW_GROUP=row_group,
        OUT_BF16=out.dtype == torch.bfloat16,
        ASYM=asymmetric,
        **_rotation_consts(rotate),
        BLOCK_K=block_k,
        BLOCK_C=block_c,
    )
    return out


# ----------------------------------------------------------------------------- q2c scores
#
# Two kernels, both over programs (row block, kv head, key split): the first finds each row's
# softmax max and denominator over the keys of its split, torch merges the splits (a few KB), and
# the second sums the normalised probabilities of the context columns of its split into the
# output with atomics. Splitting the keys keeps a GPU busy even when the question is one row
# block per kv head; no program ever holds more than one [BLOCK_M, BLOCK_N] block of scores.
# The G query heads sharing one kv head are stacked into G * Lq rows (row r = head r // Lq,
# query row r % Lq), so each key block is loaded once per group.

# GPU, fp16/bf16 on tensor cores: 64x64 score tiles at 8 warps, ~115 registers for head_dim 128.
_GPU_MMA_BLOCKS = (64, 64, 8)
# GPU, fp32 on CUDA cores: an IEEE fp32 dot unrolls into FMAs, and 64x64 tiles spill several KB
# per thread; 32x32 at 4 warps fits in ~100 registers.
_GPU_FMA_BLOCKS = (32, 32, 4)
# GPU: 4 key blocks per split gives a 4k prompt 16 (fp16) to 32 (fp32) splits, so a 32-row
# question at 7 query heads per kv head still launches more programs than an H200 has SMs.
_GPU_SPLIT_BLOCKS = 4
# Interpreter: few, large programs; it pays per program and per loop step, not per value.
_INTERP_BLOCK_M, _INTERP_BLOCK_N = 256, 512
_INTERP_SPLIT_BLOCKS = 64


def q2c_config(q_dtype: torch.dtype, k_dtype: torch.dtype, head_dim: int, rows: int, seq: int, interpret: bool) -> dict:
    """Tile sizes and launch options for q2c, for the interpreter or a GPU (also used by tools that
    compile kernels ahead of time)."""
    block_d = max(16, _next_pow2(head_dim))  # tl.dot needs every dimension >= 16
    if interpret:
        block_m = min(_INTERP_BLOCK_M, max(16, _next_pow2(rows)))
        block_n = min(_INTERP_BLOCK_N, max(16, _next_pow2(seq)))
        return dict(
            SPLIT=block_n * _INTERP_SPLIT_BLOCKS, NATIVE_DOT=False, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d
        )
    native = q_dtype == k_dtype and q_dtype in (torch.float16, torch.bfloat16)
    block_m, block_n, warps = _GPU_MMA_BLOCKS if native else _GPU_FMA_BLOCKS
    if block_d > 128:
        block_n //= 2  # head_dim 256: halve the key tile to stay in registers
    return dict(
        SPLIT=block_n * _GPU_SPLIT_BLOCKS,
        NATIVE_DOT=native,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        num_warps=warps,
        num_stages=2,
    )


@triton.jit
def _q2c_rows(
    q_ptr, pos_ptr, Lq, D, R, G, sqh, sql, sqd, NATIVE_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr
):
    # The program's stacked rows: their index, validity, q tile and (clamped) positions.
    r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    r_ok = r < R
    i = r % Lq
    head = tl.program_id(1) * G + r // Lq
    d = tl.arange(0, BLOCK_D)
    q = tl.load(
        q_ptr + head.to(tl.int64)[:, None] * sqh + i.to(tl.int64)[:, None] * sql + d[None, :] * sqd,
        mask=r_ok[:, None] & (d < D)[None, :],
        other=0.0,
    )
    if not NATIVE_DOT:
        q = q.to(tl.float32)
    pos = tl.load(pos_ptr + i, mask=r_ok, other=-1)
    return r, r_ok, q, pos


@triton.jit
def _q2c_block_scores(
    q, k_base, n0, pos, S, D, sks, skd, scale, NATIVE_DOT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr
):
    # Scaled, causally masked scores of the rows against keys n0..n0+BLOCK_N: [BLOCK_M, BLOCK_N].
    n = n0 + tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    k = tl.load(
        k_base + n.to(tl.int64)[:, None] * sks + d[None, :] * skd, mask=(n < S)[:, None] & (d < D)[None, :], other=0.0
    )
    if NATIVE_DOT:
        s = tl.dot(q, tl.trans(k))  # fp16/bf16 products are exact in the fp32 accumulator
    else:
        s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")  # no tf32 shortcut
    # pos was clamped to S - 1 by the launcher, so n <= pos also keeps n inside the keys.
    return tl.where(n[None, :] <= pos[:, None], s * scale, float("-inf"))


@triton.jit
def _q2c_stats_kernel(
    q_ptr,
    k_ptr,
    pos_ptr,
    m_ptr,
    l_ptr,
    Lq,
    S,
    D,
    R,
    G,
    scale,
    sqh,
    sql,
    sqd,
    skh,
    sks,
    skd,
    SPLIT: tl.constexpr,
    NATIVE_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # grid: (cdiv(R, BLOCK_M), Hkv, key splits). Writes each row's online-softmax max and
    # denominator over the keys of this split to m/l: [splits, Hkv, R].
    r, r_ok, q, pos = _q2c_rows(q_ptr, pos_ptr, Lq, D, R, G, sqh, sql, sqd, NATIVE_DOT, BLOCK_M, BLOCK_D)
    kv = tl.program_id(1)
    k_base = k_ptr + kv.to(tl.int64) * skh
    lo = tl.program_id(2) * SPLIT
    hi = tl.minimum(lo + SPLIT, _max(pos, axis=0) + 1)  # keys past every row's position play no part
    # The max starts finite so that a row seeing no key keeps exp(-inf - m) = 0, not nan.
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        s = _q2c_block_scores(q, k_base, n0, pos, S, D, sks, skd, scale, NATIVE_DOT, BLOCK_N, BLOCK_D)
        m_new = tl.maximum(m_i, _max(s, axis=1))
        l_i = l_i * tl.exp(m_i - m_new) + _sum(tl.exp(s - m_new[:, None]), axis=1)
        m_i = m_new
    out = (tl.program_id(2) * tl.num_programs(1) + kv).to(tl.int64) * R + r
    tl.store(m_ptr + out, m_i, mask=r_ok)
    tl.store(l_ptr + out, l_i, mask=r_ok)


@triton.jit
def _q2c_colsum_kernel(
    q_ptr,
    k_ptr,
    pos_ptr,
    m_ptr,
    l_ptr,
    out_ptr,
    Lq,
    S,
    D,
    R,
    G,
    ctx_start,
    ctx_end,
    scale,
    sqh,
    sql,
    sqd,
    skh,
    sks,
    skd,
    SPLIT: tl.constexpr,
    NATIVE_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # grid: (cdiv(R, BLOCK_M), Hkv, context splits). m/l: [Hkv, R], merged over key splits.
    r, r_ok, q, pos = _q2c_rows(q_ptr, pos_ptr, Lq, D, R, G, sqh, sql, sqd, NATIVE_DOT, BLOCK_M, BLOCK_D)
    kv = tl.program_id(1)
    k_base = k_ptr + kv.to(tl.int64) * skh
    stats = kv.to(tl.int64) * R + r
    m_i = tl.load(m_ptr + stats, mask=r_ok, other=0.0)
    inv_l = 1.0 / tl.maximum(tl.load(l_ptr + stats, mask=r_ok, other=0.0), 1.0e-30)  # l == 0: p is 0 anyway
    lo = ctx_start + tl.program_id(2) * SPLIT
    hi = tl.minimum(tl.minimum(lo + SPLIT, ctx_end), _max(pos, axis=0) + 1)
    for n0 in range(lo, hi, BLOCK_N):
        s = _q2c_block_scores(q, k_base, n0, pos, S, D, sks, skd, scale, NATIVE_DOT, BLOCK_N, BLOCK_D)
        col = _sum(tl.exp(s - m_i[:, None]) * inv_l[:, None], axis=0)
        n = n0 + tl.arange(0, BLOCK_N)
        tl.atomic_add(out_ptr + (n - ctx_start), col, mask=n < hi)


def q2c_scores(
    q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor, ctx_start: int, ctx_end: int, scale: float | None = None
) -> torch.Tensor:
    """Triton version of reference.q2c_scores: fp32 [ctx_end - ctx_start]. Column sums use atomics,
    so on GPU the fp32 summation order, and hence the last bits, may vary between runs."""
    q_heads, rows, head_dim = q.shape
    kv_heads, seq, _ = k.shape
    group, scale, out = q2c_prologue(q, k, ctx_start, ctx_end, scale)
    if rows == 0 or ctx_end == ctx_start:
        return out
    pos = q_pos.clamp(-1, seq - 1).to(torch.int32).contiguous()
    total = group * rows
    common = q2c_config(q.dtype, k.dtype, head_dim, total, seq, interpreted())
    split = common["SPLIT"]
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2))
    m_blocks = triton.cdiv(total, common["BLOCK_M"])

    key_splits = triton.cdiv(seq, split)
    m_part = torch.empty(key_splits, kv_heads, total, dtype=torch.float32, device=q.device)
    l_part = torch.empty_like(m_part)
    _q2c_stats_kernel[(m_blocks, kv_heads, key_splits)](
        q, k, pos, m_part, l_part, rows, seq, head_dim, total, group, scale, *strides, **common
    )
    # Merge the splits' softmax statistics: m = max_s m_s, l = sum_s l_s * exp(m_s - m).
    m = m_part.amax(dim=0)
    l_sum = (l_part * torch.exp(m_part - m)).sum(dim=0)

    ctx_splits = triton.cdiv(ctx_end - ctx_start, split)
    _q2c_colsum_kernel[(m_blocks, kv_heads, ctx_splits)](
        q, k, pos, m, l_sum, out, rows, seq, head_dim, total, group, ctx_start, ctx_end, scale, *strides, **common
    )
    return out
