"""Kernels: Triton (under the CPU interpreter) against the torch reference, and the reference
against naive per-element definitions; plus the dispatcher's backend choice and argument checks.

Packed bytes, scales and dequantized values must be bit-identical; q2c scores agree to fp32
rounding. The shape/dtype/bits matrix is covered pairwise, not as a full cross product, so the
interpreted kernels stay fast.
"""

from __future__ import annotations

import importlib
import itertools
import math
import os
import re
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

# The interpreter mode is fixed when @triton.jit runs, so the variable must be set before
# kernels.triton_kernels is imported; it is put back afterwards and set again around each test
# (triton reads it lazily at launch time too) so that other test modules never see it.
_saved_interpret = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"
try:
    from kvwire import kernels
    from kvwire.kernels import dispatch, layout, reference
    from kvwire.kernels import triton_kernels as tk

    if not tk.interpreted():  # imported earlier in this process without the interpreter
        tk = importlib.reload(tk)
        dispatch._loaded.pop("triton", None)
finally:
    if _saved_interpret is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = _saved_interpret


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("KVWIRE_KERNELS", raising=False)


# Every code width the kernels implement: a new width gets every test below.
BITS = list(layout.SUPPORTED_BITS)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# (rtol, atol) for q2c scores, by input dtype; both sides compute in fp32, so these only absorb
# summation order (looser for half inputs, whose GPU path multiplies in tensor cores).
Q2C_TOL = {"fp32": (1e-5, 1e-6), "fp16": (5e-5, 1e-5), "bf16": (5e-5, 1e-5)}


def pairwise(factors: dict[str, list]) -> list[dict]:
    """Greedy all-pairs covering: every pair of values of any two factors appears in some case."""
    names = list(factors)

    def key(a, va, b, vb):
        return (a, va, b, vb) if names.index(a) < names.index(b) else (b, vb, a, va)

    todo = {key(a, va, b, vb) for a, b in itertools.combinations(names, 2) for va in factors[a] for vb in factors[b]}
    cases = []
    while todo:
        a, va, b, vb = min(todo, key=repr)
        case = {a: va, b: vb}
        for n in names:
            if n not in case:
                case[n] = max(factors[n], key=lambda v: sum(key(m, case[m], n, v) in todo for m in case))
        todo -= {key(a, case[a], b, case[b]) for a, b in itertools.combinations(names, 2)}
        cases.append({n: case[n] for n in names})
    return cases


def case_id(case: dict) -> str:
    return "-".join(f"{k}{v}" for k, v in case.items())


# ----------------------------------------------------------------------------- helpers


def make_x(heads: int, seq: int, head_dim: int, dtype: torch.dtype, layout_kind: str, seed: int) -> torch.Tensor:
    """x: [H, S, D]: contiguous, or a [0] slice of a [1, S, H, D] cache transposed to heads-first."""
    g = torch.Generator().manual_seed(seed)
    if layout_kind == "strided":
        cache = torch.randn(1, seq, heads, head_dim, generator=g).to(dtype)
        x = cache.transpose(1, 2)[0]
        assert not x.is_contiguous() or heads == 1 or seq == 1
        return x
    return (torch.randn(heads, seq, head_dim, generator=g) * 3).to(dtype)


def group_for(kind: str, head_dim: int) -> int:
    return head_dim if kind == "row" else (32 if head_dim % 32 == 0 else 16)


def assert_same_quantization(x, index, bits, group, asym=False, rotate=0):
    """Triton and reference agree on payload, scales, and the dequantized tensor."""
    p_ref, s_ref = reference.quantize_pack(x, index, bits, group, asym, rotate)
    p_tri, s_tri = tk.quantize_pack(x, index, bits, group, asym, rotate)
    assert p_ref.dtype == torch.uint8 and s_ref.dtype == torch.float16
    assert p_tri.shape == p_ref.shape == (x.shape[0], p_ref.shape[1], kernels.packed_row_bytes(bits, x.shape[2]))
    want_scales = layout.scale_shape(x.shape[0], p_ref.shape[1], x.shape[2] // group, asym)
    assert s_tri.shape == s_ref.shape == want_scales
    assert p_tri.is_contiguous() and s_tri.is_contiguous()
    assert torch.equal(s_tri, s_ref), "scales differ"
    assert torch.equal(p_tri, p_ref), "packed bytes differ"
    out_ref = torch.empty(x.shape[0], p_ref.shape[1], x.shape[2], dtype=x.dtype)
    out_tri = torch.full_like(out_ref, float("nan"))
    reference.unpack_dequantize(p_ref, s_ref, bits, group, out_ref, asym, rotate)
    assert tk.unpack_dequantize(p_ref, s_ref, bits, group, out_tri, asym, rotate) is out_tri
    assert torch.equal(out_tri, out_ref), "dequantized values differ"
    return p_ref, s_ref, out_ref


# ----------------------------------------------------------------------------- quantize: triton vs reference

QUANT_CASES = pairwise(
    {
        "D": [64, 80, 96, 128],
        "H": [1, 2, 3, 4, 8],
        "K": [1, 37, 1000],
        "dtype": list(DTYPES),
        "bits": BITS,
        "group": ["row", "32"],
        "index": ["all", "perm"],
        "x": ["contig", "strided"],
    }
)


@pytest.mark.parametrize("case", QUANT_CASES, ids=[case_id(c) for c in QUANT_CASES])
def test_quantize_pack_triton_matches_reference(case):
    d, h, n = case["D"], case["H"], case["K"]
    seq = n + 5 if case["index"] == "perm" else n
    x = make_x(h, seq, d, DTYPES[case["dtype"]], case["x"], seed=d * 1000 + h * 10 + n)
    index = torch.randperm(seq, generator=torch.Generator().manual_seed(n))[:n] if case["index"] == "perm" else None
    assert_same_quantization(x, index, case["bits"], group_for(case["group"], d))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group", ["row", "16"])
def test_quantize_pack_chunked_rows(monkeypatch, bits, group):
    """Rows wider than one channel chunk (channel-axis codes of long chunks) loop over chunks."""
    monkeypatch.setattr(tk, "_INTERP_MAX_CHUNK", 32)
    x = make_x(2, 45, 136, torch.float32, "contig", seed=bits)  # 136 = 4 chunks of 32 + 8
    assert_same_quantization(x, None, bits, 136 if group == "row" else 8)
    assert_same_quantization(x[:, :, :128], None, bits, 128 if group == "row" else 16)


@pytest.mark.parametrize("head_dim,group", [(96, 48), (80, 40), (16, 16), (8, 8), (16, 8)])
def test_quantize_pack_odd_groups_and_small_heads(head_dim, group):
    """Groups that are not a power of two (reference fallback) and tiny head_dims (tiny test models)."""
    x = make_x(3, 37, head_dim, torch.bfloat16, "strided", seed=head_dim)
    for bits in BITS:
        assert_same_quantization(x, None, bits, group)


def test_quantize_pack_strided_index_with_repeats():
    x = make_x(2, 90, 64, torch.float16, "strided", seed=4)
    index = torch.arange(80).flip(0).view(40, 2)[:, 1]  # a strided view: 78, 76, ..., 0
    index[5] = index[6]  # a position gathered twice
    assert not index.is_contiguous()
    assert_same_quantization(x, index, 4, 32)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("bits", BITS)
def test_all_zero_rows(dtype, bits):
    x = make_x(2, 37, 64, DTYPES[dtype], "contig", seed=1)
    x[:, ::3] = 0
    x[1, 4, :32] = 0  # one zero group inside a non-zero row
    p, s, out = assert_same_quantization(x, None, bits, 32)
    assert torch.all(s[:, ::3] == 0) and torch.all(out[:, ::3] == 0)
    assert s[1, 4, 0] == 0 and torch.all(out[1, 4, :32] == 0)
    assert torch.all(p[:, ::3] == 0)  # code 0 packs to zero bits at every width


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_exact_half_ties_round_to_even(bits, dtype):
    """x / s == k + 0.5 exactly: codes round to the even neighbour, in the kernel and the reference."""
    qmax = (1 << (bits - 1)) - 1
    s = 2.0**-3  # exact in every dtype, and qmax * s is the row's absmax so the scale is exactly s
    halves = sorted((k + 0.5 for k in range(-qmax, qmax)), key=abs)  # +-0.5, +-1.5, ... +-(qmax - 0.5)
    halves = (halves[:61] + halves[-2:]) if len(halves) > 63 else halves
    row = torch.tensor(([qmax] + halves) * 64, dtype=torch.float64)[:64]
    x = (row * s).to(DTYPES[dtype]).reshape(1, 1, 64).repeat(2, 3, 1)
    assert torch.equal(x.double() / s, row.expand(2, 3, 64))  # the ties survived the dtype
    p, scales, _ = assert_same_quantization(x, None, bits, 64)
    assert torch.all(scales.float() == s)
    expected = torch.tensor([round(v) for v in row.tolist()], dtype=torch.int32)  # Python rounds half to even
    assert torch.equal(reference._unpack(p, bits, 64).to(torch.int32), expected.expand(2, 3, 64))
    # qmax 1 (int2): the only ties are +-0.5, both to 0
    assert set(expected.tolist()) >= ({0, 2, -2} if qmax > 1 else {0, 1})


# ----------------------------------------------------------------------------- quantize: reference vs naive


def naive_quantize_pack(x: torch.Tensor, bits: int, group: int) -> tuple[bytes, list[float]]:
    """Per element, straight from the definition, with numpy fp32 scalars for the division."""
    import numpy as np

    qmax = (1 << (bits - 1)) - 1
    codes, scales = [], []
    for row in x.float().reshape(-1, x.shape[-1]).tolist():
        for g0 in range(0, len(row), group):
            vals = [np.float32(v) for v in row[g0 : g0 + group]]
            scale = np.float16(np.float32(max(abs(v) for v in vals)) / np.float32(qmax))
            scales.append(float(scale))
            for v in vals:
                q = round(float(v / np.float32(scale))) if scale > 0 else 0
                codes.append(min(max(q, -qmax - 1), qmax))
    # docs/wire-format.md: each unit of u codes is one little-endian word, code j at bit bits * j
    # (int8: a byte per code; int4: the first code in the low nibble; int3: eight codes in three bytes)
    out, u, mask = bytearray(), layout.unit_values(bits), (1 << bits) - 1
    for i in range(0, len(codes), u):
        word = sum((c & mask) << (bits * j) for j, c in enumerate(codes[i : i + u]))
        out.extend(word.to_bytes(u * bits // 8, "little"))
    return bytes(out), scales


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group", [16, 8])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_reference_matches_naive_definition(bits, group, dtype):
    x = make_x(2, 3, 16, DTYPES[dtype], "contig", seed=bits * group)
    x[0, 1, :8] = 0
    want_bytes, want_scales = naive_quantize_pack(x, bits, group)
    p, s = reference.quantize_pack(x, None, bits, group)
    assert p.numpy().tobytes() == want_bytes
    assert s.float().flatten().tolist() == want_scales


@settings(max_examples=60, deadline=None)
@given(
    bits=st.sampled_from(BITS),
    dtype=st.sampled_from(list(DTYPES)),
    units=st.integers(1, 6),
    groups=st.sampled_from([1, 2, 4]),
    rows=st.integers(1, 5),
    log_mag=st.integers(-30, 12),
    seed=st.integers(0, 2**16),
)
def test_reference_error_bound(bits, dtype, units, groups, rows, log_mag, seed):
    """Every element decodes to within half a scale step, plus the fp16 underflow of tiny scales."""
    head_dim = 8 * units * groups
    x = torch.randn(2, rows, head_dim, generator=torch.Generator().manual_seed(seed)) * 2.0**log_mag
    x = x.to(DTYPES[dtype])
    group = head_dim // groups
    p, s = reference.quantize_pack(x, None, bits, group)
    out = torch.empty(x.shape, dtype=torch.float32)
    reference.unpack_dequantize(p, s, bits, group, out)
    step = s.float().repeat_interleave(group, dim=-1)
    qmax = (1 << (bits - 1)) - 1
    bound = step / 2 * (1 + 1e-6) + qmax * 2.0**-24
    assert torch.all((x.float() - out).abs() <= bound)


def test_unpack_writes_strided_out_in_model_dtype():
    x = make_x(3, 37, 64, torch.float16, "contig", seed=5)
    p, s = reference.quantize_pack(x, None, 4, 32)
    want = torch.empty(3, 37, 64, dtype=torch.bfloat16)
    reference.unpack_dequantize(p, s, 4, 32, want)
    for fn in (reference.unpack_dequantize, tk.unpack_dequantize):
        cache = torch.zeros(1, 37, 3, 64, dtype=torch.bfloat16)
        out = cache.transpose(1, 2)[0]  # [H, K, D] view into a seq-major cache
        assert fn(p, s, 4, 32, out) is out
        assert torch.equal(out, want)


# ----------------------------------------------------------------------------- asymmetric codes and rotation

AFFINE_CASES = pairwise(
    {
        "D": [64, 80, 96, 128],
        "H": [1, 3],
        "K": [1, 37],
        "dtype": list(DTYPES),
        "bits": BITS,
        "group": ["row", "16"],
        "asym": [True, False],
        "rot": [True, False],
        "x": ["contig", "strided"],
    }
)


@pytest.mark.parametrize("case", AFFINE_CASES, ids=[case_id(c) for c in AFFINE_CASES])
def test_asymmetric_and_rotated_triton_matches_reference(case):
    """Scale + zero point codes and the (block-diagonal where D is not a power of two) Hadamard
    rotation: the same bytes and the same dequantized values on both backends."""
    d, n = case["D"], case["K"]
    x = make_x(case["H"], n + 3, d, DTYPES[case["dtype"]], case["x"], seed=d + n)
    index = torch.randperm(n + 3, generator=torch.Generator().manual_seed(d))[:n]
    group = d if case["group"] == "row" else 16
    rotate = layout.rotation_block(d) if case["rot"] else 0
    assert_same_quantization(x, index, case["bits"], group, case["asym"], rotate)


@pytest.mark.parametrize("bits", [4, 2])
def test_asymmetric_and_rotated_chunked_rows(monkeypatch, bits):
    """Rows wider than one chunk: the row's min and max gather over chunks, and every chunk starts
    on a rotation block; a rotation block wider than a chunk falls back to the reference."""
    monkeypatch.setattr(tk, "_INTERP_MAX_CHUNK", 32)
    x = make_x(2, 45, 136, torch.float32, "contig", seed=bits)  # 136 = 4 chunks of 32 + 8; blocks of 8
    x[0, 2] = -5.0  # a constant row: zero point -5, scale 0
    for asym, rotate in ((True, 0), (True, 8), (False, 8)):
        assert_same_quantization(x, None, bits, 136, asym, rotate)
        assert_same_quantization(x, None, bits, 8, asym, rotate)
    assert_same_quantization(x[:, :, :64], None, bits, 64, True, 64)  # 64 > the 32-channel chunk


def test_hadamard_is_the_normalized_sylvester_matrix_per_block():
    """reference.hadamard equals x @ blockdiag(H_b) / sqrt(b) (H_b Sylvester's Hadamard matrix), is
    orthogonal (norms kept) and its own inverse, to fp32 rounding."""
    for head_dim in (8, 64, 80, 96):
        block = layout.rotation_block(head_dim)
        h = torch.ones(1, 1, dtype=torch.float64)
        while h.shape[0] < block:
            h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
        dense = torch.block_diag(*[h] * (head_dim // block)) / math.sqrt(block)
        x = make_x(2, 5, head_dim, torch.float32, "contig", seed=head_dim)
        y = reference.hadamard(x, block)
        torch.testing.assert_close(y.double(), x.double() @ dense, rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(reference.hadamard(y, block), x, rtol=1e-6, atol=1e-5)
    assert (layout.rotation_block(80), layout.rotation_block(96), layout.rotation_block(128)) == (16, 32, 128)


def naive_quantize_asym(x: torch.Tensor, bits: int, group: int) -> tuple[list[int], list[float]]:
    """Asymmetric codes per element, from the definition, with numpy fp32/fp16 scalars."""
    import numpy as np

    qmax = (1 << bits) - 1
    codes, pairs = [], []
    for row in x.float().reshape(-1, x.shape[-1]).tolist():
        for g0 in range(0, len(row), group):
            vals = [np.float32(v) for v in row[g0 : g0 + group]]
            zero = np.float16(min(vals))
            scale = np.float16((np.float32(max(vals)) - np.float32(zero)) / np.float32(qmax))
            pairs += [float(scale), float(zero)]
            for v in vals:
                q = round(float((v - np.float32(zero)) / np.float32(scale))) if scale > 0 else 0
                codes.append(min(max(q, 0), qmax))
    return codes, pairs


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_asymmetric_reference_matches_naive_definition(bits, dtype):
    x = make_x(2, 3, 16, DTYPES[dtype], "contig", seed=bits)
    x[0, 1, :8] = 0.25  # a constant group
    want_codes, want_pairs = naive_quantize_asym(x, bits, 8)
    p, s = reference.quantize_pack(x, None, bits, 8, asymmetric=True)
    assert reference._unpack_unsigned(p, bits, 16).flatten().tolist() == want_codes
    assert s.float().flatten().tolist() == want_pairs
    out = reference.unpack_dequantize(p, s, bits, 8, torch.empty(x.shape), asymmetric=True)
    assert torch.all(out[0, 1, :8] == 0.25)  # a constant group decodes exactly (0.25 is an fp16)


def test_int2_packs_four_codes_a_byte_first_in_the_low_bits():
    x = torch.tensor([[[1.0, -2.0, 0.0, -1.0, 1.0, 1.0, 1.0, 1.0]]])  # scale 2 / 1: codes 0, -1, 0, 0 ...
    p, s = reference.quantize_pack(x, None, 2, 8)
    assert float(s) == 2.0
    codes = [round(v / 2) for v in x.flatten().tolist()]  # 0.5 ties to even: 0, -1, 0, 0 (-0.5), 0, ...
    want = bytes(sum((c & 3) << (2 * j) for j, c in enumerate(codes[i : i + 4])) for i in (0, 4))
    assert p.numpy().tobytes() == want
    assert_same_quantization(x, None, 2, 8)


# ----------------------------------------------------------------------------- q2c


def naive_q2c(q, k, q_pos, ctx_start, ctx_end, scale=None):
    """Dense float64 softmax per (query head, row), straight from the definition."""
    hq, lq, d = q.shape
    group = hq // k.shape[0]
    scale = 1 / math.sqrt(d) if scale is None else scale
    out = torch.zeros(ctx_end - ctx_start, dtype=torch.float64)
    for h in range(hq):
        for i in range(lq):
            visible = min(int(q_pos[i]), k.shape[1] - 1) + 1
            if visible <= 0:
                continue
            logits = k[h // group, :visible].double() @ q[h, i].double() * scale
            probs = torch.softmax(logits, dim=0)
            for j in range(ctx_start, min(ctx_end, visible)):
                out[j - ctx_start] += probs[j]
    return out


def make_q2c(hkv, ratio, lq, seq, d, dtype, pos_kind, seed):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(hkv * ratio, lq, d, generator=g) * 1.5).to(dtype)
    k = (torch.randn(hkv, seq, d, generator=g) * 1.5).to(dtype)
    if pos_kind == "suffix":  # question rows at the end of the prompt
        q_pos = torch.arange(seq - lq, seq).clamp_min(0)
    else:  # arbitrary rows (snapkv / h2o observation rows), unsorted, repeats allowed
        q_pos = torch.randint(0, seq, (lq,), generator=g)
    return q, k, q_pos


def ctx_range(kind, seq):
    return {"all": (0, seq), "middle": (seq // 4, max(seq // 4, 3 * seq // 4)), "tail": (seq - 1, seq)}[kind]


Q2C_CASES = pairwise(
    {
        "D": [64, 80, 96, 128],
        "Hkv": [1, 2, 3, 4, 8],
        "ratio": [1, 3, 7],
        "S": [1, 37, 1000],
        "Lq": [1, 37],
        "dtype": list(DTYPES),
        "ctx": ["all", "middle", "tail"],
        "pos": ["suffix", "random"],
    }
)


@pytest.mark.parametrize("case", Q2C_CASES, ids=[case_id(c) for c in Q2C_CASES])
def test_q2c_triton_matches_reference(case):
    q, k, q_pos = make_q2c(
        case["Hkv"],
        case["ratio"],
        case["Lq"],
        case["S"],
        case["D"],
        DTYPES[case["dtype"]],
        case["pos"],
        seed=case["D"] + case["S"],
    )
    c0, c1 = ctx_range(case["ctx"], case["S"])
    want = reference.q2c_scores(q, k, q_pos, c0, c1)
    got = tk.q2c_scores(q, k, q_pos, c0, c1)
    assert got.dtype == torch.float32 and got.shape == (c1 - c0,)
    rtol, atol = Q2C_TOL[case["dtype"]]
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)


def test_q2c_triton_many_rows_strided_and_scale():
    """A snapkv/h2o-sized row set (several row blocks), strided q/k views, an explicit scale."""
    qc = torch.randn(1, 300, 6, 64).transpose(1, 2)[0]  # [6, 300, 64] view: 900 rows per kv head
    kc = torch.randn(1, 600, 2, 64).transpose(1, 2)[0]
    q_pos = torch.randint(-2, 800, (300,))  # out-of-range positions: none / all keys visible
    for c0, c1 in ((0, 600), (100, 512), (5, 5)):
        want = reference.q2c_scores(qc, kc, q_pos, c0, c1, scale=0.3)
        torch.testing.assert_close(tk.q2c_scores(qc, kc, q_pos, c0, c1, scale=0.3), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_q2c_triton_small_blocks_and_key_splits(monkeypatch, dtype):
    """GPU-like tiling: many row blocks, and keys split across programs whose softmax
    statistics are merged before the column pass (the GPU launch shape, scaled down)."""
    monkeypatch.setattr(tk, "_INTERP_BLOCK_M", 32)
    monkeypatch.setattr(tk, "_INTERP_BLOCK_N", 16)
    monkeypatch.setattr(tk, "_INTERP_SPLIT_BLOCKS", 3)  # splits of 48 keys: not a power of two
    q, k, q_pos = make_q2c(2, 3, 21, 160, 64, DTYPES[dtype], "random", seed=11)
    q_pos[:3] = torch.tensor([-1, 0, 159])
    for c0, c1 in ((0, 160), (47, 49), (50, 150)):
        torch.testing.assert_close(
            tk.q2c_scores(q, k, q_pos, c0, c1), reference.q2c_scores(q, k, q_pos, c0, c1), rtol=1e-5, atol=1e-6
        )


@pytest.mark.parametrize("ratio", [1, 3])
@pytest.mark.parametrize("pos_kind", ["suffix", "random"])
@pytest.mark.parametrize("ctx", ["all", "middle", "tail"])
def test_q2c_reference_matches_dense_softmax(monkeypatch, ratio, pos_kind, ctx):
    monkeypatch.setattr(reference, "SCORE_BLOCK_ELEMS", 1)  # one row per block: exercise the blocking
    q, k, q_pos = make_q2c(2, ratio, 5, 23, 16, torch.float32, pos_kind, seed=ratio)
    c0, c1 = ctx_range(ctx, 23)
    want = naive_q2c(q, k, q_pos, c0, c1)
    got = reference.q2c_scores(q, k, q_pos, c0, c1)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    if ctx == "all" and pos_kind == "suffix":  # every row's probabilities sum to one
        assert got.sum().item() == pytest.approx(2 * ratio * 5, rel=1e-5)


def test_q2c_reference_blocking_is_invisible(monkeypatch):
    q, k, q_pos = make_q2c(2, 3, 40, 60, 32, torch.float32, "random", seed=3)
    whole = reference.q2c_scores(q, k, q_pos, 10, 50)
    monkeypatch.setattr(reference, "SCORE_BLOCK_ELEMS", 6 * 60 * 7)  # 7-row blocks
    torch.testing.assert_close(reference.q2c_scores(q, k, q_pos, 10, 50), whole, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- dispatcher and checks


def test_default_backend_on_cpu_is_torch():
    assert dispatch.select_backend(torch.device("cpu")).name == "torch"


def test_env_var_forces_backend_at_call_time(monkeypatch):
    x = make_x(2, 37, 64, torch.float16, "contig", seed=9)
    monkeypatch.setenv("KVWIRE_KERNELS", "triton")
    assert dispatch.select_backend(x.device).name == "triton"
    p_tri, s_tri = kernels.quantize_pack(x, None, 4, 32)
    monkeypatch.setenv("KVWIRE_KERNELS", "torch")
    assert dispatch.select_backend(x.device).name == "torch"
    p_ref, s_ref = kernels.quantize_pack(x, None, 4, 32)
    assert torch.equal(p_tri, p_ref) and torch.equal(s_tri, s_ref)


def test_forced_triton_without_a_device_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("KVWIRE_KERNELS", "triton")
    monkeypatch.setattr(tk, "interpreted", lambda: False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        kernels.q2c_scores(torch.zeros(1, 1, 16), torch.zeros(1, 4, 16), torch.zeros(1, dtype=torch.int64), 0, 4)


def test_explicit_backend_overrides_the_environment(monkeypatch):
    monkeypatch.setenv("KVWIRE_KERNELS", "triton")
    assert dispatch.select_backend(torch.device("cpu"), forced="torch").name == "torch"
    monkeypatch.setenv("KVWIRE_KERNELS", " ")
    assert dispatch.forced_backend() is None
    assert dispatch.select_backend(torch.device("cpu"), forced="triton").name == "triton"


def test_interpreted_reports_how_the_kernels_were_built(monkeypatch):
    """Unset TRITON_INTERPRET after the import: the kernels keep the mode they were built in, and
    interpreted() reports that mode, not the variable."""
    assert tk.interpreted()
    monkeypatch.delenv("TRITON_INTERPRET")
    assert tk.interpreted() and tk.runs_on(torch.device("cpu"))


def test_unknown_and_duplicate_backends(monkeypatch):
    monkeypatch.setenv("KVWIRE_KERNELS", "cuda")
    with pytest.raises(ValueError, match="unknown kernel backend 'cuda'; known: torch, triton"):
        kernels.quantize_pack(torch.zeros(1, 1, 8), None, 8, 8)
    with pytest.raises(ValueError, match="already registered"):
        dispatch.register_backend("torch", dispatch._load_torch)


def test_torch_path_never_imports_triton():
    code = (
        "import sys, torch\n"
        "from kvwire import kernels\n"
        "x = torch.randn(2, 5, 16)\n"
        "p, s = kernels.quantize_pack(x, None, 3, 8)\n"
        "kernels.unpack_dequantize(p, s, 3, 8, torch.empty(2, 5, 16))\n"
        "kernels.q2c_scores(x, x, torch.arange(5), 0, 5)\n"
        "assert 'triton' not in sys.modules and 'kvwire.kernels.triton_kernels' not in sys.modules\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "KVWIRE_KERNELS")}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=600)


def test_interpreter_works_when_triton_was_imported_first():
    """transformers imports triton before any test sets TRITON_INTERPRET: the kernels must not
    call triton's own @jit helpers (tl.max, tl.sum, tl.zeros), which are then compiled-only."""
    code = (
        "import os, torch, triton.language\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "from kvwire.kernels import reference as R, triton_kernels as T\n"
        "x = torch.randn(2, 9, 32)\n"
        "for bits, g, asym, rot in ((8, 32, 0, 0), (4, 16, 0, 0), (3, 8, 0, 0), (2, 8, 1, 32), (4, 32, 0, 32)):\n"
        "    p, s = T.quantize_pack(x, None, bits, g, asym, rot)\n"
        "    assert torch.equal(p, R.quantize_pack(x, None, bits, g, asym, rot)[0])\n"
        "    out = T.unpack_dequantize(p, s, bits, g, torch.empty_like(x), asym, rot)\n"
        "    assert torch.equal(out, R.unpack_dequantize(p, s, bits, g, torch.empty_like(x), asym, rot))\n"
        "pos = torch.tensor([8, 3, 5])\n"
        "torch.testing.assert_close(T.q2c_scores(x[:, :3], x, pos, 1, 7), R.q2c_scores(x[:, :3], x, pos, 1, 7))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=600)


@pytest.mark.parametrize("bits,head_dim,want", [(8, 80, 80), (4, 80, 40), (3, 96, 36), (3, 128, 48)])
def test_packed_row_bytes(bits, head_dim, want):
    assert kernels.packed_row_bytes(bits, head_dim) == want


@pytest.mark.parametrize(
    "bits,head_dim,match",
    [
        (9, 64, re.escape(f"bits must be one of {layout.SUPPORTED_BITS}, got 9")),
        (4, 63, "4-bit packing needs head_dim divisible by 2, got 63"),
        (3, 36, "3-bit packing needs head_dim divisible by 8, got 36"),
        (8, 0, "head_dim must be positive"),
    ],
)
def test_packed_row_bytes_rejects(bits, head_dim, match):
    with pytest.raises(ValueError, match=match):
        kernels.packed_row_bytes(bits, head_dim)


def test_quantize_pack_rejects_bad_arguments():
    x = torch.zeros(2, 5, 64)
    with pytest.raises(ValueError, match="group_size 48 must be positive and divide head_dim 64"):
        kernels.quantize_pack(x, None, 8, 48)
    with pytest.raises(ValueError, match="x must be"):
        kernels.quantize_pack(x[0], None, 8, 64)
    with pytest.raises(ValueError, match="x dtype"):
        kernels.quantize_pack(x.double(), None, 8, 64)
    with pytest.raises(ValueError, match="index must be a 1-D int64"):
        kernels.quantize_pack(x, torch.arange(3, dtype=torch.int32), 8, 64)
    with pytest.raises(ValueError, match="3-bit packing"):
        kernels.quantize_pack(torch.zeros(2, 5, 20), None, 3, 20)


def test_rotation_and_asymmetric_arguments_are_checked():
    x = torch.randn(2, 5, 80)
    with pytest.raises(
        ValueError, match=r"rotate must be 0 \(none\) or a power of two >= 2 dividing head_dim 80, got 32 "
    ):
        kernels.quantize_pack(x, None, 4, 80, rotate=32)
    with pytest.raises(ValueError, match="got 3"):
        kernels.quantize_pack(x, None, 4, 80, rotate=3)
    p, s = kernels.quantize_pack(x, None, 4, 16, asymmetric=True, rotate=16)
    assert s.shape == (2, 5, 5, 2)
    with pytest.raises(ValueError, match=r"scales must be float16 \[2, 5, 5\] for group_size 16, got"):
        kernels.unpack_dequantize(p, s, 4, 16, torch.empty(2, 5, 80))
    with pytest.raises(ValueError, match=r"scales must be float16 \[2, 5, 5, 2\] for group_size 16 \(scale, zero"):
        kernels.unpack_dequantize(p, s[..., 0], 4, 16, torch.empty(2, 5, 80), asymmetric=True)
    out = kernels.unpack_dequantize(p, s, 4, 16, torch.empty(2, 5, 80), asymmetric=True, rotate=16)
    assert float(((out - x) ** 2).mean() / (x**2).mean()) < 0.02  # 4-bit codes of Gaussian data


def test_unpack_dequantize_rejects_mismatched_shapes():
    out = torch.empty(2, 5, 64, dtype=torch.float16)
    p, s = kernels.quantize_pack(torch.randn(2, 5, 64), None, 4, 32)
    with pytest.raises(
        ValueError,
        match=r"payload must be uint8 \[2, 5, 32\] for 4-bit rows of head_dim 64, "
        r"got torch.uint8 \[2, 4, 32\]",
    ):
        kernels.unpack_dequantize(p[:, :4], s, 4, 32, out)
    with pytest.raises(
        ValueError,
        match=r"scales must be float16 \[2, 5, 1\] for group_size 64, "
        r"got torch.float16 \[2, 5, 2\]",
    ):
        kernels.unpack_dequantize(p, s, 4, 64, out)
    with pytest.raises(ValueError, match=r"payload must be uint8 \[2, 5, 24\]"):
        kernels.unpack_dequantize(p, s, 3, 32, out)
    with pytest.raises(ValueError, match="out dtype"):
        kernels.unpack_dequantize(p, s, 4, 32, out.double())
    assert kernels.unpack_dequantize(p, s, 4, 32, out) is out


def test_q2c_rejects_bad_arguments():
    q, k, pos = torch.zeros(6, 3, 16), torch.zeros(4, 10, 16), torch.arange(3)
    with pytest.raises(ValueError, match="q heads 6 must be a multiple of kv heads 4"):
        kernels.q2c_scores(q, k, pos, 0, 10)
    k = torch.zeros(3, 10, 16)
    with pytest.raises(ValueError, match=r"context range \[4, 11\) must lie within the 10 keys"):
        kernels.q2c_scores(q, k, pos, 4, 11)
    with pytest.raises(ValueError, match=r"q_pos must be an int64 tensor \[3\]"):
        kernels.q2c_scores(q, k, pos[:2], 0, 10)
    with pytest.raises(ValueError, match="head_dim"):
        kernels.q2c_scores(q, k[..., :8], pos, 0, 10)
    assert kernels.q2c_scores(q, k, pos, 3, 3).shape == (0,)


@pytest.mark.parametrize("head_dim", [128, 96])
def test_kernels_bench_cases_run_on_the_triton_path(head_dim):
    """Every kernel `kvwire bench kernels` times on a GPU runs here through the same launcher calls
    (bench/kernels_bench.run_case), interpreted, and gives the reference's bytes and values."""
    from kvwire.bench import kernels_bench

    x = make_x(2, 9, head_dim, torch.bfloat16, "strided", seed=head_dim)
    cases = kernels_bench.quantize_cases(head_dim)
    assert {c["rotate"] for _, c in cases} == {0, layout.rotation_block(head_dim)}
    assert {(c["bits"], c["asymmetric"]) for _, c in cases if c["rotate"]} == {
        (b, a) for b in (4, 3, 2) for a in (False, True)
    }
    for _, case in cases:
        for got, want in zip(kernels_bench.run_case(tk, x, case), kernels_bench.run_case(reference, x, case)):
            assert torch.equal(got, want)
