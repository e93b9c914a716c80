"""Frames: the byte-level wire format (see docs/wire-format.md). Independent of gRPC.

Every frame is  MAGIC | version | type | flags | stream id | seq | body length | body | CRC32C.
This module packs and parses single frames and their bodies; kvcodec.stream strings them into
a stream (header, chunks, trailer) and checks the sequence.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import google_crc32c
import zstandard

from kvwire.kvcodec.errors import FrameError

MAGIC = b"KVWF"
VERSION = 2  # 2: headers carry only the token ids the receiver needs (docs/wire-format.md)
HEADER, CHUNK, TRAILER = 1, 2, 3
FRAME_TYPES = {HEADER: "header", CHUNK: "chunk", TRAILER: "trailer"}
FLAG_ZSTD = 0x1
# the per-head layout (docs/wire-format.md, section 5b): set on the header and every chunk of a stream whose
# chunks carry a position set per (layer, KV head); a decoder that does not know it refuses the header (bad_flags)
FLAG_HEADS = 0x2
_FLAGS = {HEADER: FLAG_ZSTD | FLAG_HEADS, CHUNK: FLAG_ZSTD | FLAG_HEADS, TRAILER: FLAG_ZSTD}
_PREFIX = struct.Struct("<4sBBH16sII")  # magic, version, type, flags, stream id, seq, body length
PREFIX_SIZE = _PREFIX.size  # 32
CRC_SIZE = 4
# Hard cap on one frame's body, checked before anything is read or allocated: far above the
# encoder's chunk target (1 MiB) and still below gRPC's default 4 MiB message cap.
MAX_BODY = 3 * 1024 * 1024
MAX_JSON = 64 * 1024  # a header's JSON (fingerprints, geometry, profile) is a few KB


@dataclass(frozen=True)
class Frame:
    kind: int
    stream_id: bytes
    seq: int
    body: bytes  # uncompressed
    wire_size: int  # bytes this frame took on the wire
    heads: bool = False  # FLAG_HEADS: the per-head layout


def crc32c(data: bytes) -> int:
    return google_crc32c.value(data)


def pack_frame(
    kind: int, stream_id: bytes, seq: int, body: bytes, compress: bool = False, heads: bool = False
) -> bytes:
    """One frame's bytes. With compress, the body is zstd-compressed when that makes it smaller; heads sets
    FLAG_HEADS (a header or chunk of a per-head stream)."""
    if heads and kind == TRAILER:
        raise ValueError("a trailer has no per-head layout")
    flags = FLAG_HEADS if heads else 0
    if compress:
        packed = zstandard.ZstdCompressor(level=3).compress(body)
        if len(packed) < len(body):
            body, flags = packed, flags | FLAG_ZSTD
    if len(body) > MAX_BODY:
        raise ValueError(f"frame body of {len(body)} bytes exceeds the {MAX_BODY}-byte cap: use smaller chunks")
    head = _PREFIX.pack(MAGIC, VERSION, kind, flags, stream_id, seq, len(body))
    return head + body + struct.pack("<I", crc32c(head + body))


def _peek_prefix(data: bytes) -> tuple | None:
    """The unverified prefix fields of a frame (None if it has no KVWire prefix)."""
    if len(data) < PREFIX_SIZE or data[: len(MAGIC)] != MAGIC:
        return None
    return _PREFIX.unpack_from(data)


def peek_type(data: bytes) -> str:
    """header/chunk/trailer from a frame's type byte, without verifying the frame ("unknown" if it has none).

    For counting and logging bytes by kind; only parse_frame() says whether a frame is valid.
    """
    prefix = _peek_prefix(data)
    return "unknown" if prefix is None else FRAME_TYPES.get(prefix[2], "unknown")


def peek_stream_id(data: bytes) -> bytes | None:
    """The 16-byte stream id of a frame, without verifying it (None if it has no KVWire prefix)."""
    prefix = _peek_prefix(data)
    return None if prefix is None else prefix[4]


def parse_frame(data: bytes) -> Frame:
    """Parse and verify one frame; FrameError with a precise reason on anything wrong."""
    if len(data) < PREFIX_SIZE + CRC_SIZE:
        raise FrameError(
            "truncated", f"frame of {len(data)} bytes is shorter than the {PREFIX_SIZE + CRC_SIZE}-byte minimum"
        )
    magic, version, kind, flags, stream_id, seq, length = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise FrameError("bad_magic", f"frame starts with {magic!r}, not {MAGIC!r}")
    if version != VERSION:
        raise FrameError(
            "bad_version",
            f"frame version {version}; this decoder reads version {VERSION} only (edge and cloud must run "
            "kvwire releases of one wire version)",
        )
    if kind not in FRAME_TYPES:
        raise FrameError("bad_type", f"unknown frame type {kind}")
    if flags & ~_FLAGS[kind]:
        raise FrameError("bad_flags", f"frame flags 0x{flags:04x} are not valid on a {FRAME_TYPES[kind]}")
    if length > MAX_BODY:
        raise FrameError("oversized", f"body length {length} exceeds the {MAX_BODY}-byte cap")
    expected = PREFIX_SIZE + length + CRC_SIZE
    if len(data) != expected:
        reason = "truncated" if len(data) < expected else "trailing_bytes"
        raise FrameError(reason, f"frame is {len(data)} bytes; its header says {expected}")
    (crc,) = struct.unpack_from("<I", data, PREFIX_SIZE + length)
    if crc != crc32c(data[: PREFIX_SIZE + length]):
        raise FrameError("checksum", f"CRC32C mismatch in {FRAME_TYPES[kind]} frame seq {seq}")
    body = bytes(data[PREFIX_SIZE : PREFIX_SIZE + length])
    if flags & FLAG_ZSTD:
        try:
            # decompress() honours max_output_size only when the zstd header declares no content
            # size; a declared size is allocated as is, so it is checked against the cap first.
            declared = zstandard.frame_content_size(body)
            if declared > MAX_BODY:
                raise FrameError("oversized", f"zstd body declares {declared} bytes, over the {MAX_BODY}-byte cap")
            body = zstandard.ZstdDecompressor().decompress(body, max_output_size=MAX_BODY)
        except zstandard.ZstdError as exc:
            raise FrameError("bad_compression", f"zstd body does not decompress: {exc}") from None
    return Frame(kind, stream_id, seq, body, len(data), heads=bool(flags & FLAG_HEADS))


def read_frames(stream) -> Iterator[bytes]:
    """Split a byte stream (a file, a socket's makefile) into frames, checking each length against
    the cap before reading its body. Frames are verified later by parse_frame."""
    while True:
        head = stream.read(PREFIX_SIZE)
        if not head:
            return
        if len(head) < PREFIX_SIZE:
            raise FrameError("truncated", f"byte stream ends inside a frame prefix ({len(head)} bytes)")
        length = _PREFIX.unpack(head)[6]
        if length > MAX_BODY:
            raise FrameError("oversized", f"body length {length} exceeds the {MAX_BODY}-byte cap")
        rest = stream.read(length + CRC_SIZE)
        if len(rest) < length + CRC_SIZE:
            raise FrameError(
                "truncated", f"byte stream ends inside a frame body ({len(rest)} of {length + CRC_SIZE} bytes)"
            )
        yield head + rest


# ---- varints -------------------------------------------------------------------------------


def put_varint(out: bytearray, value: int) -> None:
    if value < 0:
        raise ValueError("varint must be non-negative")
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def encode_deltas(values, signed: bool) -> bytes:
    """Delta + varint coding. signed=True zigzags the deltas (positions in any order)."""
    out = bytearray()
    prev = 0
    for v in values:
        d = int(v) - prev
        prev = int(v)
        if signed:
            d = (d << 1) ^ (d >> 63)
        put_varint(out, d)
    return bytes(out)


class Reader:
    """Bounds-checked reader over a frame body: every read names what it wanted on failure."""

    def __init__(self, data: bytes, what: str):
        self.data, self.pos, self.what = data, 0, what

    def take(self, n: int, field: str) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise FrameError("malformed", f"{self.what}: {field} needs {n} bytes, {len(self.data) - self.pos} left")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def unpack(self, fmt: str, field: str):
        s = struct.Struct("<" + fmt)
        return s.unpack(self.take(s.size, field))

    def varint(self, field: str) -> int:
        value = shift = 0
        while True:
            (byte,) = self.take(1, field)
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return value
            shift += 7
            if shift >= 63:  # nine 7-bit groups: anything longer is not a 64-bit value
                raise FrameError("malformed", f"{self.what}: {field} varint is longer than 64 bits")

    def _fits(self, count: int, field: str) -> None:
        if count > len(self.data) - self.pos:  # each varint takes at least one byte
            raise FrameError(
                "malformed", f"{self.what}: {count} {field} cannot fit in {len(self.data) - self.pos} bytes"
            )

    def deltas(self, count: int, signed: bool, field: str) -> list[int]:
        self._fits(count, field)
        out, prev = [], 0
        for _ in range(count):
            d = self.varint(field)
            if signed:
                d = (d >> 1) ^ -(d & 1)
            prev += d
            out.append(prev)
        return out

    def varints(self, count: int, field: str) -> list[int]:
        """`count` unsigned varints; refused up front when they cannot fit in the bytes left."""
        self._fits(count, field)
        return [self.varint(field) for _ in range(count)]

    def done(self) -> None:
        if self.pos != len(self.data):
            raise FrameError("malformed", f"{self.what}: {len(self.data) - self.pos} unexpected trailing bytes")


def pack_json(obj: dict) -> bytes:
    raw = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    if len(raw) > MAX_JSON:
        raise ValueError(f"header JSON of {len(raw)} bytes exceeds {MAX_JSON}")
    return struct.pack("<I", len(raw)) + raw


def read_json(r: Reader) -> dict:
    (n,) = r.unpack("I", "json length")
    if n > MAX_JSON:
        raise FrameError("malformed", f"{r.what}: JSON length {n} exceeds {MAX_JSON}")
    try:
        obj = json.loads(r.take(n, "json").decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FrameError("malformed", f"{r.what}: JSON does not parse: {exc}") from None
    if not isinstance(obj, dict):
        raise FrameError("malformed", f"{r.what}: JSON is not an object")
    return obj
