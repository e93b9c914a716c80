"""Pure-torch, vectorized versions of every kernel: the specification and the CPU runtime path.

The Triton kernels in triton_kernels.py must produce the same packed bytes and scales bit for
bit, so every rounding step here is spelled out (fp32 absmax, IEEE division, fp16 scales,
round half to even). Arguments are assumed to have passed kernels.layout's checks.
"""

from __future__ import annotations

import torch

from .layout import q2c_prologue, qrange, rotation_gain

# q2c keeps at most this many fp32 scores (q_heads x rows x keys) alive at once: 16 MiB.
SCORE_BLOCK_ELEMS = 1 << 22
# ... and never more than this many query rows per block, whatever the budget allows.
MAX_ROW_BLOCK = 256


def hadamard(x: torch.Tensor, block: int) -> torch.Tensor:
    """The normalized block-diagonal Walsh-Hadamard transform of x's last dimension, in fp32.

    Butterfly stages h = 1, 2, .., block/2 pair channel i with i + h inside blocks of 2h channels:
    (a, b) -> (a + b, a - b), each one fp32 addition, then one multiplication by rotation_gain(block).
    The transform is orthogonal and its own inverse (up to fp32 rounding); the Triton kernels run the
    same stages in the same order, so both give the same bits. block 0 or 1: x in fp32, unchanged.
    """
    shape = x.shape
    y = x.float()
    if block <= 1:
        return y
    h = 1
    while h < block:
        v = y.reshape(*shape[:-1], shape[-1] // (2 * h), 2, h)
        a, b = v[..., 0, :], v[..., 1, :]
        y = torch.stack((a + b, a - b), dim=-2).reshape(shape)
        h *= 2
    return y * torch.tensor(rotation_gain(block), dtype=torch.float32, device=y.device)


def _quantize(x: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [H, K, D] -> (q int8 [H, K, D], scales fp16 [H, K, D // group_size])."""
    heads, n, head_dim = x.shape
    lo, hi = qrange(bits)
    xf = x.float().reshape(heads, n, head_dim // group_size, group_size)
    scales = (xf.abs().amax(dim=-1) / hi).to(torch.float16)  # fp32 division, then one rounding to fp16
    s = scales.float().unsqueeze(-1)
    # Where s == 0 the fp16 scale underflowed, so every |x| < hi * 2**-24 and round(x / 1) is 0:
    # dividing by 1 gives the specified q = 0 without producing inf or nan.
    y = xf / torch.where(s > 0, s, torch.ones_like(s))
    # Clamping before rounding equals clamping after it, since the bounds are integers.
    q = y.clamp_(lo, hi).round_().to(torch.int8)  # torch.round is round half to even
    return q.reshape(heads, n, head_dim), scales


def _quantize_asym(x: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [H, K, D] -> (q uint8 [H, K, D] in [0, 2**bits - 1], fp16 [H, K, D // group_size, 2] (scale, zero)).

    zero = fp16(min), scale = fp16((max - zero) / (2**bits - 1)), q = clamp(round((x - zero) / scale)):
    code 0 decodes to the group's minimum (to fp16 rounding) and the top code to its maximum.
    """
    heads, n, head_dim = x.shape
    _, hi = qrange(bits, asymmetric=True)
    xf = x.float().reshape(heads, n, head_dim // group_size, group_size)
    zero = xf.amin(dim=-1).to(torch.float16)
    z = zero.float().unsqueeze(-1)
    scale = ((xf.amax(dim=-1, keepdim=True) - z).squeeze(-1) / hi).to(torch.float16)
    s = scale.float().unsqueeze(-1)
    # s <= 0: a constant group (or an fp16 underflow); every x - zero rounds to code 0 (see _quantize).
    y = (xf - z) / torch.where(s > 0, s, torch.ones_like(s))
    q = y.clamp_(0, hi).round_().to(torch.uint8)
    return q.reshape(heads, n, head_dim), torch.stack((scale, zero), dim=-1)


def _pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """q int8 (signed codes) or uint8 (unsigned codes) [H, K, D] -> uint8 [H, K, packed_row_bytes(bits, D)]."""
    heads, n, head_dim = q.shape
    u = q.view(torch.uint8)  # two's complement bytes; the masks below keep the low `bits` bits
    if bits == 8:
        return u
    if bits == 4:
        u = u & 0xF
        return u[..., 0::2] | (u[..., 1::2] << 4)  # even channel in the low nibble
    if bits == 2:
        c = (u & 0x3).view(heads, n, head_dim // 4, 4).unbind(-1)  # code j at bits 2j of its byte
        return c[0] | (c[1] << 2) | (c[2] << 4) | (c[3] << 6)
    # bits == 3: eight 3-bit codes c0..c7 make one little-endian 24-bit word (c_j at bit 3j).
    c = (u & 0x7).view(heads, n, head_dim // 8, 8).unbind(-1)
    b0 = c[0] | (c[1] << 3) | ((c[2] & 0x3) << 6)
    b1 = (c[2] >> 2) | (c[3] << 1) | (c[4] << 4) | ((c[5] & 0x1) << 7)
    b2 = (c[5] >> 1) | (c[6] << 2) | (c[7] << 5)
    return torch.stack((b0, b1, b2), dim=-1).reshape(heads, n, head_dim * 3 // 8)


def _unpack_unsigned(payload: torch.Tensor, bits: int, head_dim: int) -> torch.Tensor:
    """uint8 [H, K, row_bytes] -> the raw codes, uint8 [H, K, head_dim] in [0, 2**bits - 1]."""
    heads, n, _ = payload.shape
    if bits == 8:
        return payload
    if bits == 4:
        return torch.stack((payload & 0xF, payload >> 4), dim=-1).reshape(heads, n, head_dim)
    if bits == 2:
        return torch.stack([(payload >> s) & 0x3 for s in (0, 2, 4, 6)], dim=-1).reshape(heads, n, head_dim)
    b0, b1, b2 = payload.view(heads, n, head_dim // 8, 3).unbind(-1)
    c = (b0, b0 >> 3, (b0 >> 6) | (b1 << 2), b1 >> 1, b1 >> 4, (b1 >> 7) | (b2 << 1), b2 >> 2, b2 >> 5)
    return torch.stack(c, dim=-1).reshape(heads, n, head_dim) & 0x7


def _unpack(payload: torch.Tensor, bits: int, head_dim: int) -> torch.Tensor:
    """uint8 [H, K, row_bytes] -> q int8 [H, K, head_dim] (sign-extended)."""
    u = _unpack_unsigned(payload, bits, head_dim)
    if bits == 8:
        return u.view(torch.int8)
    half = 1 << (bits - 1)
    return (u ^ half).view(torch.int8) - half  # sign-extend the code


def quantize_pack(
    x: torch.Tensor,
    index: torch.Tensor | None,
    bits: int,
    group_size: int,
    asymmetric: bool = False,
    rotate: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather positions `index` of x: [H, S, D], rotate them and quantize them to `bits` bits.

    rotate: 0, or the block of the normalized Hadamard transform (hadamard) applied to each row
    first. Symmetric: one scale per (head, position, group of `group_size` channels), fp16(absmax /
    qmax); asymmetric: a (scale, zero) pair per group (_quantize_asym) and unsigned codes. Returns
    (payload uint8 [H, K, packed_row_bytes(bits, D)], scales fp16 layout.scale_shape(...)), both
    contiguous. Non-finite inputs give unspecified codes.
    """
    xs = x if index is None else x.index_select(1, index)
    if rotate:
        xs = hadamard(xs, rotate)
    q, scales = (_quantize_asym if asymmetric else _quantize)(xs, bits, group_size)
    return _pack(q, bits).contiguous(), scales.contiguous()


def unpack_dequantize(
    payload: torch.Tensor,
    scales: torch.Tensor,
    bits: int,
    group_size: int,
    out: torch.Tensor,
    asymmetric: bool = False,
    rotate: int = 0,
) -> torch.Tensor:
    """Decode payload/scales (as made by quantize_pack) into out: [H, K, D]; returns out.

    x_hat = q * scale (+ zero) is computed in fp32 (the product exactly: an 8-bit code times an fp16
    value), rotated back when `rotate` is set (the transform is its own inverse), and then rounded
    once to out's dtype.
    """
    heads, n, head_dim = out.shape
    shape = (heads, n, head_dim // group_size, group_size)
    if asymmetric:
        q = _unpack_unsigned(payload, bits, head_dim).float().view(shape)
        sz = scales.float()
        x_hat = q * sz[..., 0:1] + sz[..., 1:2]
    else:
        q = _unpack(payload, bits, head_dim).float().view(shape)
        x_hat = q * scales.float().unsqueeze(-1)
    x_hat = x_hat.view(heads, n, head_dim)
    if rotate:
        x_hat = hadamard(x_hat, rotate)
    return out.copy_(x_hat)


def q2c_scores(
    q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor, ctx_start: int, ctx_end: int, scale: float | None = None
) -> torch.Tensor:
    """Attention mass the query rows put on each context key, summed over rows and query heads.

    q: [Hq, Lq, D], k: [Hkv, S, D] (both after RoPE; query head h reads kv head h // (Hq // Hkv)),
    q_pos: [Lq] absolute positions; row i sees keys 0..q_pos[i] (a row with q_pos < 0 sees none).
    Each row's softmax is normalised over every key it sees, then restricted to the context
    columns. Returns fp32 [ctx_end - ctx_start]. Rows are processed in blocks, so at most
    SCORE_BLOCK_ELEMS scores exist at a time.
    """
    q_heads, rows, head_dim = q.shape
    kv_heads, seq, _ = k.shape
    group, scale, out = q2c_prologue(q, k, ctx_start, ctx_end, scale)
    if rows == 0 or ctx_end == ctx_start:
        return out
    pos = q_pos.to(torch.int64)
    seen = pos >= 0  # a row that sees no key contributes nothing: drop it (its softmax would be nan)
    if not bool(seen.all()):
        q, pos = q[:, seen], pos[seen]
        rows = pos.shape[0]
    kf = k.float()
    qf = q.float().reshape(kv_heads, group, rows, head_dim)
    keys = torch.arange(seq, device=q.device)
    block = max(1, min(MAX_ROW_BLOCK, SCORE_BLOCK_ELEMS // (q_heads * seq)))
    for r0 in range(0, rows, block):
        p_blk = pos[r0 : r0 + block]
        hi = min(seq, int(p_blk.max()) + 1)  # keys past every row's position play no part
        if hi <= ctx_start:
            continue
        n = p_blk.shape[0]
        # scores: [Hkv, G * n, hi] -> [Hkv, G, n, hi]
        scores = torch.matmul(
            qf[:, :, r0 : r0 + n].reshape(kv_heads, group * n, head_dim), kf[:, :hi].transpose(1, 2)
        ).view(kv_heads, group, n, hi)
        scores.mul_(scale).masked_fill_(keys[:hi] > p_blk[:, None], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        c_hi = min(ctx_end, hi)
        out[: c_hi - ctx_start] += probs[..., ctx_start:c_hi].sum(dim=(0, 1, 2))
    return out
