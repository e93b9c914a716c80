"""Malformed, truncated, reordered, duplicated or corrupted streams are always rejected with the
codec's own FrameError — never another exception, never a cache."""

import io
import json
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvwire.kvcodec.errors import FrameError
from kvwire.kvcodec.pipeline import Edge, EdgeRequest
from kvwire.kvcodec.stream import StreamDecoder
from kvwire.kvcodec.wire import (
    CRC_SIZE,
    MAX_BODY,
    PREFIX_SIZE,
    crc32c,
    pack_frame,
    parse_frame,
    peek_stream_id,
    peek_type,
    read_frames,
)

CONTEXT = "The Normans gave their name to Normandy, a region in France. Their leader was Rollo."
QUESTION = "Who was the leader?"
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def streams(tiny_loaded):
    edge = Edge(tiny_loaded)
    kv = list(edge.stream(EdgeRequest(CONTEXT, QUESTION, "kv", "q2c", 0.5, "mixed-int4", chunk_bytes=1500)))
    zkv = list(edge.stream(EdgeRequest(CONTEXT, QUESTION, "kv", "q2c", 1.0, "int8", compress=True, chunk_bytes=3000)))
    scout = list(edge.stream(EdgeRequest(CONTEXT, QUESTION, "scout", "q2c", 0.5)))
    # wire v2 headers: fixed segments left to the cloud (no template/question positions, the question's ids
    # as the header's tail), and a full scout's header carrying every id after the template
    both = EdgeRequest(CONTEXT, QUESTION, "kv", "q2c", 0.5, "int8", chunk_bytes=1500)
    both.template_kv = both.question_kv = "cloud"
    kvc = list(edge.stream(both))
    full = EdgeRequest(CONTEXT, QUESTION, "scout", "q2c", 0.5, template_kv="cloud", scout_prefill="full")
    scout_full = list(edge.stream(full))
    assert len(kv) >= 5 and len(kvc) >= 3
    return {"kv": kv, "zkv": zkv, "scout": scout, "kvc": kvc, "scout_full": scout_full}


def decode(frames):
    """Feed frames; return the result or raise FrameError. Any other exception fails the test."""
    dec = StreamDecoder()
    try:
        for f in frames:
            dec.feed(f)
        return dec.result()
    except FrameError:
        with pytest.raises(FrameError):
            dec.result()  # no complete cache from a rejected or unfinished stream
        if dec.failed is not None:
            with pytest.raises(FrameError):
                dec.partial()  # a rejected stream yields nothing, not even the chunks before the bad one
        raise


def recrc(frame: bytes) -> bytes:
    """Fix the CRC after a mutation: what a buggy or hostile sender would produce."""
    body = frame[:-CRC_SIZE]
    return body + struct.pack("<I", crc32c(body))


def test_valid_streams_decode(streams):
    for frames in streams.values():
        assert decode(frames).complete


def test_peek_type_names_each_frame_and_never_raises(streams):
    for frames in streams.values():
        kinds = [peek_type(f) for f in frames]
        assert kinds[0] == "header" and kinds[-1] == "trailer" and set(kinds[1:-1]) <= {"chunk"}
    assert [peek_type(b) for b in (b"", b"KVWF", b"XXXX" + bytes(40))] == ["unknown"] * 3
    for frames in streams.values():
        assert len({peek_stream_id(f) for f in frames}) == 1 and len(peek_stream_id(frames[0])) == 16
    assert peek_stream_id(b"XXXX" + bytes(40)) is None


@FUZZ
@given(data=st.data())
def test_flipped_bits_are_rejected(streams, data):
    name = data.draw(st.sampled_from(sorted(streams)))
    frames = list(streams[name])
    i = data.draw(st.integers(0, len(frames) - 1))
    pos = data.draw(st.integers(0, len(frames[i]) - 1))
    bit = data.draw(st.integers(0, 7))
    fix_crc = data.draw(st.booleans())
    mutated = bytearray(frames[i])
    mutated[pos] ^= 1 << bit
    frames[i] = recrc(bytes(mutated)) if fix_crc and pos < len(mutated) - CRC_SIZE else bytes(mutated)
    with pytest.raises(FrameError):
        decode(frames)


@FUZZ
@given(data=st.data())
def test_truncated_frames_and_streams_are_rejected(streams, data):
    frames = list(streams[data.draw(st.sampled_from(sorted(streams)))])
    if data.draw(st.booleans()):
        i = data.draw(st.integers(0, len(frames) - 1))
        frames[i] = frames[i][: data.draw(st.integers(0, len(frames[i]) - 1))]
    else:
        frames = frames[: data.draw(st.integers(0, len(frames) - 1))]
    with pytest.raises(FrameError):
        decode(frames)


@FUZZ
@given(data=st.data())
def test_reordered_dropped_and_duplicated_frames_are_rejected(streams, data):
    frames = list(streams[data.draw(st.sampled_from(["kv", "zkv", "kvc"]))])
    op = data.draw(st.sampled_from(["swap", "drop", "dup", "shuffle"]))
    i = data.draw(st.integers(0, len(frames) - 1))
    j = data.draw(st.integers(0, len(frames) - 1).filter(lambda j: j != i))
    if op == "swap":
        frames[i], frames[j] = frames[j], frames[i]
    elif op == "drop":
        del frames[i]
    elif op == "dup":
        frames.insert(j, frames[i])
    else:
        perm = data.draw(st.permutations(range(len(frames))).filter(lambda p: list(p) != sorted(p)))
        frames = [frames[k] for k in perm]
    with pytest.raises(FrameError):
        decode(frames)


@FUZZ
@given(garbage=st.binary(min_size=0, max_size=200))
def test_garbage_is_rejected(garbage):
    with pytest.raises(FrameError):
        decode([garbage])


@FUZZ
@given(data=st.data())
def test_body_mutations_with_valid_crc_are_rejected(streams, data):
    """Rewrite bytes inside a body and fix the CRC: the parser must still fail cleanly (bounds,
    lengths, positions, digest), not crash or allocate from the bad length."""
    frames = list(streams[data.draw(st.sampled_from(["kv", "kvc", "scout_full"]))])
    i = data.draw(st.integers(0, len(frames) - 1))
    frame = bytearray(frames[i])
    body_len = len(frame) - PREFIX_SIZE - CRC_SIZE
    start = PREFIX_SIZE + data.draw(st.integers(0, body_len - 1))
    patch = data.draw(st.binary(min_size=1, max_size=8))
    frame[start : start + len(patch)] = patch
    frame = frame[: PREFIX_SIZE + body_len]
    if bytes(frame[: PREFIX_SIZE + body_len]) == frames[i][:-CRC_SIZE]:
        return  # the patch changed nothing
    frames[i] = recrc(bytes(frame))
    with pytest.raises(FrameError):
        decode(frames)


@FUZZ
@given(data=st.data())
def test_header_id_and_position_sections_mutated_with_valid_crc_are_rejected(streams, data):
    """The v2 header's kept positions and token ids (everything after the JSON): any rewrite with a valid
    CRC that changes the bytes is refused, since the trailer's digest covers the header as sent."""
    name = data.draw(st.sampled_from(["kv", "kvc", "scout", "scout_full"]))
    frames = list(streams[name])
    body = parse_frame(frames[0]).body
    (n,) = struct.unpack_from("<I", body)
    tail = bytearray(body[4 + n :])
    cut = data.draw(st.integers(0, len(tail)))
    patch = data.draw(st.binary(min_size=0, max_size=6))
    new_tail = bytes(tail[:cut]) + patch + bytes(tail[cut + data.draw(st.integers(0, 3)) :])
    if new_tail == bytes(tail):
        return
    frames[0] = pack_frame(1, parse_frame(frames[0]).stream_id, 0, body[: 4 + n] + new_tail)
    with pytest.raises(FrameError):
        decode(frames)


def test_oversized_length_is_rejected_before_reading():
    frame = bytearray(pack_frame(2, b"\0" * 16, 1, b"x"))
    struct.pack_into("<I", frame, 28, MAX_BODY + 1)
    with pytest.raises(FrameError, match="oversized"):
        parse_frame(bytes(frame))
    with pytest.raises(FrameError, match="oversized"):
        list(read_frames(io.BytesIO(bytes(frame))))


def test_precise_messages(streams):
    frames = streams["kv"]
    bad = bytearray(frames[1])
    bad[40] ^= 0xFF
    with pytest.raises(FrameError, match="checksum: CRC32C mismatch in chunk frame seq 1"):
        decode([frames[0], bytes(bad)])
    with pytest.raises(FrameError, match="duplicated: frame seq 1 where seq 2 was expected"):
        decode([frames[0], frames[1], frames[1]])
    with pytest.raises(FrameError, match="out_of_order: the first frame of a stream must be its header"):
        decode(frames[1:])
    with pytest.raises(FrameError, match="incomplete: stream ended before its trailer"):
        decode(frames[:-1])
    with pytest.raises(FrameError, match="bad_magic"):
        decode([b"XXXX" + frames[0][4:]])


def test_byte_stream_roundtrip(streams):
    """Frames stored back to back (a file) split and decode again."""
    blob = b"".join(streams["kv"])
    assert decode(list(read_frames(io.BytesIO(blob)))).complete
    with pytest.raises(FrameError, match="truncated"):
        decode(list(read_frames(io.BytesIO(blob[:-3]))))


def _rewrite_header(frame: bytes, edit) -> bytes:
    """Re-encode a header frame after `edit(meta)` changes its JSON, with a valid CRC."""
    body = parse_frame(frame).body
    (n,) = struct.unpack_from("<I", body)
    meta = json.loads(body[4 : 4 + n])
    edit(meta)
    raw = json.dumps(meta).encode()
    head = parse_frame(frame)
    return pack_frame(1, head.stream_id, 0, struct.pack("<I", len(raw)) + raw + body[4 + n :])


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m.update(retention="x"),
        lambda m: m.update(retention=True),
        lambda m: m["profile"].update(layers=[1]),
        lambda m: m["profile"]["default"]["k"].update(group=None),
        lambda m: m["profile"]["default"]["k"].update(kind=["int8"]),
        lambda m: m.update(context_span=[True, 5]),
        lambda m: m.update(geometry=[]),
        lambda m: m["geometry"].update(num_layers=1024, kv_heads=1024, head_dim=1024),
    ],
    ids=[
        "retention-str",
        "retention-bool",
        "layers-list",
        "group-null",
        "kind-list",
        "span-bool",
        "geometry-list",
        "huge-geometry",
    ],
)
def test_wrongly_typed_or_huge_header_fields_are_frame_errors(streams, edit):
    frames = [_rewrite_header(streams["kv"][0], edit)] + streams["kv"][1:]
    with pytest.raises(FrameError, match="bad_header|oversized"):
        decode(frames)


def test_receiver_check_runs_before_allocation(streams):
    class Refused(Exception):
        pass

    def refuse(header):
        raise Refused("wrong model")

    dec = StreamDecoder(on_header=refuse)
    with pytest.raises(Refused):
        dec.feed(streams["kv"][0])
    assert dec.header is None and not hasattr(dec, "_k")
    with pytest.raises(FrameError, match="stream_failed"):
        dec.feed(streams["kv"][1])


def test_zstd_body_declaring_a_huge_size_is_refused():
    import zstandard

    from kvwire.kvcodec.wire import _PREFIX, FLAG_ZSTD, MAGIC, VERSION

    body = zstandard.ZstdCompressor().compress(b"\0" * (MAX_BODY + 1))  # ~100 bytes declaring > MAX_BODY
    head = _PREFIX.pack(MAGIC, VERSION, 2, FLAG_ZSTD, b"\0" * 16, 1, len(body))
    frame = head + body + struct.pack("<I", crc32c(head + body))
    with pytest.raises(FrameError, match="oversized: zstd body declares"):
        parse_frame(frame)


def test_many_positions_are_checked_in_linear_time(streams):
    """A crafted chunk repeating one position 30,000 times is refused at once."""
    import time

    from kvwire.kvcodec.wire import encode_deltas, put_varint

    body = bytearray()
    put_varint(body, 30000)
    body += encode_deltas([parse_header_first_kept(streams)] * 30000, signed=True)
    head = parse_frame(streams["kv"][0])
    started = time.perf_counter()
    with pytest.raises(FrameError, match="duplicated|malformed"):
        decode([streams["kv"][0], pack_frame(2, head.stream_id, 1, bytes(body))])
    # a guard against quadratic checking only: linear takes ~10 ms here, a quadratic check of 30,000 positions
    # (9e8 Python steps) minutes; 30 s holds on any loaded host and still catches the quadratic case
    assert time.perf_counter() - started < 30.0


def parse_header_first_kept(streams) -> int:
    dec = StreamDecoder()
    dec.feed(streams["kv"][0])
    return dec.header.kept[0]


def test_models_with_many_layers_encode(tmp_path):
    """The chunk's layer count field is 16 bits: 300 layers round-trip."""
    from kvwire.kvcodec.profiles import get_profile
    from kvwire.kvcodec.stream import StreamEncoder, StreamHeader

    layers, heads, dim, n = 300, 1, 8, 6
    keys = [torch.randn(heads, n, dim) for _ in range(layers)]
    header = StreamHeader(
        mode="kv",
        prompt_ids=list(range(n + 1)),
        context_span=(1, 4),
        kept=list(range(n)),
        geometry={"num_layers": layers, "kv_heads": heads, "head_dim": dim, "rope": {}},
        profile=get_profile("int8"),
    )
    enc = StreamEncoder(header)
    frames = [enc.header_frame(), *enc.chunk_frames(keys, keys, torch.arange(n)), enc.trailer_frame()]
    out = decode(frames)
    assert len(out.keys) == 300 and torch.allclose(out.keys[299][0], keys[299], atol=0.05)
