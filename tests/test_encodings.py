"""Every registered tensor encoding, on every axis it takes: bounded error, exact sizes, deterministic
bytes, and a stream round trip; the registry refuses clashes and unknown names; wire codes are frozen.

The matrix is built from the registry, so a new encoding is tested here without a new row; a new
family of encodings needs its error bound in `error_bound`.
"""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from kvwire import kernels
from kvwire.kvcodec.encodings import (
    AsymmetricInt,
    Passthrough,
    SymmetricInt,
    encoding_names,
    encodings,
    get_encoding,
)
from kvwire.kvcodec.encodings.registry import register_encoding
from kvwire.kvcodec.errors import ConfigError, FrameError
from kvwire.kvcodec.profiles import PrecisionProfile
from kvwire.kvcodec.quant import Quantizer
from kvwire.kvcodec.stream import StreamDecoder, StreamEncoder, StreamHeader
from kvwire.kvcodec.wire import CHUNK, HEADER, Reader, pack_frame, parse_frame

# Channel groups tried on every axis; an encoding's own check() decides which it takes.
GROUPS = (0, 16, 32)


def quantizer_matrix() -> list[Quantizer]:
    """Every registered encoding on every axis it takes, with every group of GROUPS it accepts."""
    out = []
    for enc in encodings():
        for axis in enc.axes:
            for group in GROUPS:
                try:
                    out.append(Quantizer(enc.name, axis, group))
                except ConfigError:
                    pass  # this encoding takes no such group on this axis
    return out


QUANTIZERS = quantizer_matrix()


def qid(q: Quantizer) -> str:
    return f"{q.kind}-{q.axis}-{q.group}"


def kv(heads=3, n=37, dim=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(heads, n, dim, generator=g) * 2
    if n > 3:
        x[:, 3] = 0.0  # an all-zero row
    return x


def block_ranges(q: Quantizer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(min, max) of each element's quantization block, shaped like x: [heads, n, head_dim]."""
    if q.axis == "token":
        g = q.group or x.shape[-1]
        xb = x.reshape(*x.shape[:2], -1, g)
        lo, hi = xb.amin(-1, keepdim=True), xb.amax(-1, keepdim=True)
        return lo.expand_as(xb).reshape(x.shape), hi.expand_as(xb).reshape(x.shape)
    n = x.shape[1]
    full = n // q.group * q.group if q.group else 0  # full groups of positions, then the tail
    cuts = list(range(0, full, q.group)) + [full] if q.group else [0]
    lo, hi = torch.empty_like(x), torch.empty_like(x)
    for a, b in zip(cuts, cuts[1:] + [n]):
        if b > a:
            lo[:, a:b] = x[:, a:b].amin(1, keepdim=True)
            hi[:, a:b] = x[:, a:b].amax(1, keepdim=True)
    return lo, hi


def code_bound(q: Quantizer, x: torch.Tensor) -> torch.Tensor:
    """Half a quantization step per element (from the fp16 scale of its block), plus the fp16
    rounding of an asymmetric block's zero point and scale."""
    lo, hi = block_ranges(q, x)
    enc = q.encoding
    if isinstance(enc, AsymmetricInt):
        qmax = 2**enc.bits - 1
        s = ((hi - lo.half().float()) / qmax).half().float()
        return s / 2 * (1 + 1e-3) + 2.0**-10 * (lo.abs() + hi - lo) + 1e-6
    qmax = 2 ** (enc.bits - 1) - 1
    s = (torch.maximum(lo.abs(), hi.abs()) / qmax).half().float()
    return s / 2 * (1 + 1e-3) + 1e-6


def error_bound(q: Quantizer, x: torch.Tensor) -> torch.Tensor:
    """The largest |decoded - x| each element may show, by the encoding's family."""
    enc = q.encoding
    if isinstance(enc, Passthrough):
        # a cast rounds to nearest: relative error below eps; none at all in x's own dtype
        eps = 0.0 if enc.dtype == x.dtype else torch.finfo(enc.dtype).eps
        return torch.full_like(x, eps * float(x.abs().max()))
    if isinstance(enc, (SymmetricInt, AsymmetricInt)):
        if not enc.rotate:
            return code_bound(q, x)
        # The codes are of the rotated rows y = Hx, each within its bound b; H is orthogonal per
        # block, so the error of a block of x has the L2 norm of the error of y: no element's error
        # exceeds the L2 norm of its block's bounds (plus fp32 rounding of the two transforms).
        block = kernels.rotation_block(x.shape[-1])
        b = code_bound(q, kernels.hadamard(x, block)).reshape(*x.shape[:2], -1, block)
        norm = b.square().sum(-1, keepdim=True).sqrt().expand_as(b).reshape(x.shape)
        return norm + 1e-5 * float(x.abs().max())
    raise AssertionError(f"no error bound for the {type(enc).__name__} family: add one to error_bound")


def test_matrix_covers_every_encoding_and_axis():
    assert {q.kind for q in QUANTIZERS} == set(encoding_names())
    assert {(q.kind, q.axis) for q in QUANTIZERS} == {(e.name, a) for e in encodings() for a in e.axes}
    # what the issue found untested through a stream: int3, bf16 and channel-axis profiles
    assert {"int3", "bf16"} <= {q.kind for q in QUANTIZERS}
    assert any(q.axis == "channel" for q in QUANTIZERS)
    # issue 12: asymmetric codes, KIVI's position groups on the channel axis, rotation, int2
    assert {("asym2", "channel", 16), ("asym4_rot", "token", 16), ("int2_rot", "token", 0)} <= {
        (q.kind, q.axis, q.group) for q in QUANTIZERS
    }


@pytest.mark.parametrize("q", QUANTIZERS, ids=qid)
@pytest.mark.parametrize("n", [1, 37])
def test_roundtrip_error_and_sizes(q, n):
    x = kv(n=n)
    scales, payload = q.encode(x)
    assert (len(scales), len(payload)) == q.sizes(3, n, 64)
    out = torch.empty_like(x)
    q.decode(scales, payload, out)
    err = (out - x).abs()
    bound = error_bound(q, x)
    assert bool((err <= bound).all()), float((err - bound).max())
    if n > 3 and not (isinstance(q.encoding, AsymmetricInt) and q.axis == "channel"):
        # zero rows stay exactly zero (an asymmetric channel block has no code for 0 unless 0 is its min)
        assert bool((out[:, 3] == 0).all())
    again = q.encode(x.clone())
    assert again == (scales, payload)  # deterministic bytes


# ----------------------------------------------------------------------------- through a stream

# A tiny stream: 13 prompt ids, 12 streamed positions, context [2, 9), two context positions dropped.
GEOMETRY = {"num_layers": 2, "kv_heads": 2, "head_dim": 32}  # head_dim: every group of GROUPS divides it
LAYERS, HEADS, DIM = GEOMETRY.values()
PROMPT = list(range(10, 23))
SPAN = (2, 9)
KEPT = [0, 1, 2, 3, 5, 6, 8, 9, 10, 11]


def stream_kv(seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (HEADS, len(PROMPT) - 1, DIM)  # [kv_heads, stream_len, head_dim] per layer
    keys = [torch.randn(shape, generator=g) * 2 for _ in range(LAYERS)]
    values = [torch.randn(shape, generator=g) for _ in range(LAYERS)]
    return keys, values


def stream_frames(profile, keys, values, chunk_bytes=1 << 20, profile_dict=None):
    header = StreamHeader("kv", PROMPT, SPAN, KEPT, GEOMETRY, profile=profile)
    if profile_dict is not None:  # a sender's header naming what it likes
        header.profile = SimpleNamespace(to_dict=lambda: profile_dict)
    enc = StreamEncoder(header, chunk_bytes=chunk_bytes)
    frames = [enc.header_frame()]
    if profile_dict is None:
        frames += list(enc.chunk_frames(keys, values, torch.tensor(KEPT)))
        frames.append(enc.trailer_frame())
    return frames


def roundtrip(q: Quantizer, x: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(x)
    return q.decode(*q.encode(x), out)


@pytest.mark.parametrize("q", QUANTIZERS, ids=qid)
@pytest.mark.parametrize("chunking", ["one-chunk", "several-chunks"])
def test_stream_roundtrip(q, chunking):
    """Each chunk decodes to exactly the quantizer round trip of its own positions (channel-axis
    scales are per chunk), in the receiver's slot of each position; layer 1 mixes in fp16 keys."""
    profile = PrecisionProfile("matrix", (q, q), {1: (Quantizer("fp16"), q)})
    keys, values = stream_kv()
    frames = stream_frames(profile, keys, values, chunk_bytes=1 << 20 if chunking == "one-chunk" else 300)
    chunks = frames[1:-1]
    assert (len(chunks) == 1) == (chunking == "one-chunk")
    dec = StreamDecoder(dtype=torch.float32)
    dec.feed(frames[0])
    want_k = [torch.full((HEADS, len(KEPT), DIM), float("nan")) for _ in range(LAYERS)]
    want_v = [torch.full((HEADS, len(KEPT), DIM), float("nan")) for _ in range(LAYERS)]
    seen: set[int] = set()
    for frame in chunks:
        dec.feed(frame)
        got = set(dec.partial().positions.tolist())
        new = sorted(got - seen)  # the chunk's positions, in the order the encoder sorted them
        seen = got
        slots = torch.tensor([KEPT.index(p) for p in new])
        for layer, (kq, vq) in enumerate(profile.resolve(LAYERS, DIM)):
            want_k[layer][:, slots] = roundtrip(kq, keys[layer][:, new])
            want_v[layer][:, slots] = roundtrip(vq, values[layer][:, new])
    dec.feed(frames[-1])
    out = dec.result()
    assert out.complete and out.positions.tolist() == KEPT
    for layer in range(LAYERS):
        assert torch.equal(out.keys[layer][0], want_k[layer]), f"layer {layer} keys"
        assert torch.equal(out.values[layer][0], want_v[layer]), f"layer {layer} values"


@pytest.mark.parametrize("q", QUANTIZERS, ids=qid)
def test_tensor_heads_carry_the_wire_code(q):
    frames = stream_frames(PrecisionProfile("one", (q, q)), *stream_kv())
    r = Reader(parse_frame(frames[1]).body, "chunk")
    n = r.varint("count")
    r.deltas(n, signed=True, field="positions")
    assert r.unpack("H", "layers") == (LAYERS,)
    kind, axis, group, ns, npay = r.unpack("BBHII", "tensor head")
    assert (kind, axis, group) == (q.encoding.code, ("token", "channel").index(q.axis), q.group)
    assert (ns, npay) == q.sizes(HEADS, n, DIM)


# ----------------------------------------------------------------------------- wire codes

# The kind byte of each encoding that has shipped: frames already written use these, forever.
SHIPPED_WIRE_CODES = {
    "fp16": 1,
    "bf16": 2,
    "int8": 3,
    "int4": 4,
    "int3": 5,
    "fp32": 6,
    "int2": 7,
    "asym4": 8,
    "asym3": 9,
    "asym2": 10,
    "int4_rot": 11,
    "int3_rot": 12,
    "int2_rot": 13,
    "asym4_rot": 14,
    "asym3_rot": 15,
    "asym2_rot": 16,
}


def test_shipped_wire_codes_never_change():
    assert {name: get_encoding(name).code for name in SHIPPED_WIRE_CODES} == SHIPPED_WIRE_CODES


def test_wire_format_doc_lists_every_registered_code():
    doc = (Path(__file__).parent.parent / "docs" / "wire-format.md").read_text()
    (row,) = [line for line in doc.splitlines() if line.startswith("| 0 | 1 | kind:")]
    documented = {int(code): name for code, name in re.findall(r"`(\d+)` (\w+)", row)}
    assert documented == {e.code: e.name for e in encodings()}


# ----------------------------------------------------------------------------- unknown names and clashes


def test_unknown_kind_is_a_config_error_listing_the_names():
    message = f"unknown tensor encoding 'int5'; known: {', '.join(encoding_names())}"
    with pytest.raises(ConfigError, match=re.escape(message)):
        Quantizer("int5")
    with pytest.raises(ConfigError, match=re.escape(message)):
        get_encoding("int5")
    with pytest.raises(ConfigError, match="unknown tensor encoding"):
        get_encoding(["int4"])  # a JSON list where a name belongs: not a TypeError


def test_unknown_kind_on_the_sender_side_is_a_config_error():
    """A sender's profile is checked where it is built, before any StreamEncoder exists."""
    with pytest.raises(ConfigError, match="default.k: unknown tensor encoding 'int5'; known: "):
        PrecisionProfile.from_dict({"default": {"k": {"kind": "int5"}, "v": {"kind": "int4"}}})


def test_unknown_kind_from_a_sender_is_a_frame_error_naming_it():
    """A header whose profile names an unregistered encoding: the receiver rejects the header (never a
    KeyError), with the ConfigError's message, before allocating anything."""
    bad = {"name": "x", "default": {"k": {"kind": "int5"}, "v": {"kind": "int4"}}, "layers": {}}
    (header,) = stream_frames(None, [], [], profile_dict=bad)
    dec = StreamDecoder()
    with pytest.raises(FrameError, match="bad_header: profile: default.k: unknown tensor encoding 'int5'; known: "):
        dec.feed(header)


def test_unregistered_wire_code_in_a_chunk_is_a_frame_error():
    q = Quantizer("int4")
    frames = stream_frames(PrecisionProfile("one", (q, q)), *stream_kv())
    chunk = parse_frame(frames[1])
    r = Reader(chunk.body, "chunk")
    r.deltas(r.varint("count"), signed=True, field="positions")
    r.unpack("H", "layers")
    assert 255 not in {e.code for e in encodings()}
    body = bytearray(chunk.body)
    body[r.pos] = 255  # the first tensor head's kind byte
    dec = StreamDecoder()
    assert dec.feed(frames[0]) == HEADER
    with pytest.raises(FrameError, match="bad_encoding: layer 0 k: encoding differs"):
        dec.feed(pack_frame(CHUNK, chunk.stream_id, chunk.seq, bytes(body)))


def test_duplicate_names_and_codes_are_refused_at_registration():
    before = encodings()
    with pytest.raises(ValueError, match=r"tensor encoding 'int4' is already registered \(wire code 4\)"):
        register_encoding(SymmetricInt("int4", code=200, bits=4))
    with pytest.raises(ValueError, match="encoding 'half': wire code 1 is already taken by 'fp16'"):
        register_encoding(Passthrough("half", code=1, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"wire code 256 is not a byte value in \[1, 255\]"):
        register_encoding(Passthrough("wide", code=256, dtype=torch.float16))
    supported = ", ".join(map(str, kernels.SUPPORTED_BITS))
    with pytest.raises(ValueError, match=re.escape(f"the kernels pack no 9-bit codes (supported: {supported})")):
        SymmetricInt("int9", code=254, bits=9)
    assert encodings() == before  # nothing half-registered


# ----------------------------------------------------------------------------- the low-bit encodings


def test_rotation_and_channel_groups_are_checked():
    with pytest.raises(ConfigError, match="int4_rot is rotated: it takes the token axis only"):
        Quantizer("int4_rot", "channel")
    with pytest.raises(ConfigError, match=r"group must be 0 \(the whole chunk\) or a multiple of 8, got 12"):
        Quantizer("asym3", "channel", 12)
    Quantizer("asym2", "channel", 12)  # 2-bit codes pack four positions a byte
    with pytest.raises(ConfigError, match="head_dim 63 is odd"):
        SymmetricInt("int8_rot", code=250, bits=8, rotate=True).check_head_dim("token", 0, 63)


def outlier_kv(seed=0) -> torch.Tensor:
    """Keys as real models have them: a few channels far larger than the rest."""
    x = kv(heads=2, n=64, dim=64, seed=seed)
    x[:, :, [5, 40]] *= 20
    return x


def rel_mse(q: Quantizer, x: torch.Tensor) -> float:
    return float(((roundtrip(q, x) - x) ** 2).mean() / (x**2).mean())


@pytest.mark.parametrize("bits", [4, 3, 2])
def test_rotation_and_channel_scales_tame_outlier_channels(bits):
    """What the encodings are for: on keys with outlier channels, the Hadamard rotation beats plain
    per-token codes at every width (symmetric ones down to 3 bits: symmetric 2-bit codes have the
    levels -2s, -s, 0, s with s the absmax, and a rotated row, Gaussian-like, rounds mostly to 0),
    and asymmetric per-channel codes over groups of positions (KIVI's keys) beat asymmetric
    per-token codes."""
    x = outlier_kv()
    if bits > 2:
        assert rel_mse(Quantizer(f"int{bits}_rot"), x) < 0.5 * rel_mse(Quantizer(f"int{bits}"), x)
    assert rel_mse(Quantizer(f"asym{bits}_rot"), x) < 0.5 * rel_mse(Quantizer(f"asym{bits}"), x)
    assert rel_mse(Quantizer(f"asym{bits}", "channel", 16), x) < 0.5 * rel_mse(Quantizer(f"asym{bits}"), x)


def test_channel_groups_cut_the_chunk_into_full_groups_and_a_tail():
    """37 positions in groups of 16: two full groups and a tail of 5 (padded to 8 for 3-bit codes)."""
    q = Quantizer("asym3", "channel", 16)
    assert q.sizes(3, 37, 64) == (3 * 64 * 3 * 4, 3 * 64 * (kernels.packed_row_bytes(3, 32) + 3))
    x = kv(n=37)
    c = float(x[:, 32:34].mean())
    x[:, 32:] = c  # a constant tail; its padding repeats the last value, so the range stays [c, c]
    out = roundtrip(q, x)
    assert float((out[:, 32:] - c).abs().max()) <= 2**-10 * abs(c)  # zero padding would give c / 14
