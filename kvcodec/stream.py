"""KV streams: header frame, chunk frames (any subset of kept positions), trailer frame.

StreamEncoder turns a prefilled KV cache, a Selection and a PrecisionProfile into frames.
StreamDecoder verifies frames one by one and, only once the trailer checks out, yields a
DecodedKV (or, for anytime use, `partial()` yields the positions received so far).
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from kvwire.kvcodec.errors import ConfigError, FrameError
from kvwire.kvcodec.fingerprint import ids_digest
from kvwire.kvcodec.head_chunks import AXIS_CODES as _AXIS_CODES
from kvwire.kvcodec.head_chunks import HEAD_LAYOUT, apply_chunk, encode_chunk, plan_chunks, read_chunk
from kvwire.kvcodec.head_chunks import TENSOR_HEAD as _TENSOR_HEAD
from kvwire.kvcodec.modes import get_mode, streamed_mode_names
from kvwire.kvcodec.profiles import PrecisionProfile
from kvwire.kvcodec.wire import (
    CHUNK,
    FRAME_TYPES,
    HEADER,
    MAX_BODY,
    TRAILER,
    Frame,
    Reader,
    encode_deltas,
    pack_frame,
    pack_json,
    parse_frame,
    put_varint,
    read_json,
)

MAX_PROMPT = 1 << 20  # a header may announce at most this many prompt tokens
MAX_LAYERS, MAX_HEADS, MAX_HEAD_DIM = 1024, 1024, 1024
DEFAULT_MAX_KV_BYTES = 16 << 30  # decoded KV a header may ask a receiver to hold (16 GiB)
DEFAULT_CHUNK_BYTES = 1 << 20  # 1 MiB: well under gRPC's 4 MiB cap, large enough that framing is noise


# where a fixed segment's KV comes from: the edge streams it, or the cloud computes it itself
FIXED_SOURCES = ("stream", "cloud")
# the defaults of a request's template_kv and question_kv (chosen by `kvwire eval`: docs/results.md)
DEFAULT_TEMPLATE_KV = "stream"
DEFAULT_QUESTION_KV = "stream"
# which token ids a header carries: "kept" the kept positions' (sparse scout), "all" every position the cloud
# prefills (full scout), "tail" none of the kept ones (kv); each then adds the tail the cloud computes
ID_LAYOUTS = ("kept", "all", "tail")
_HASH_DIGITS = 16


@dataclass
class StreamHeader:
    """What a receiver needs before any KV arrives (the header frame's content).

    The sender builds it from the whole prompt (`prompt_ids`); the header carries only the ids the
    receiver needs (`token_ids`, position -> id: see `id_positions`), so a decoded header has
    `prompt_ids` None and `n_prompt` set. template / question: whether the template prefix
    [0, context_start) and the question + template suffix [context_end, n_prompt - 1) are streamed
    (kept positions) or computed by the cloud (never among the kept positions).
    """

    mode: str
    prompt_ids: list[int] | None
    context_span: tuple[int, int]
    kept: list[int]  # ascending streamed positions the receiver will hold
    geometry: dict
    model: str = ""
    tokenizer: str = ""
    dtype: str = ""
    profile: PrecisionProfile | None = None
    selector: str = ""
    retention: float = 1.0
    stream_id: bytes = field(default_factory=lambda: os.urandom(16))
    template: str = "stream"
    question: str = "stream"
    ids: str = ""  # an ID_LAYOUTS entry; "" picks the mode's: kept (scout) or tail (kv)
    template_hash: str = ""  # ids_digest of the template prefix (set from prompt_ids when they are given)
    n_prompt: int = 0  # set from prompt_ids when they are given
    token_ids: dict[int, int] = field(default_factory=dict)  # set from prompt_ids when they are given
    # a per-head stream (FLAG_HEADS, docs/wire-format.md 5b): per layer, per KV head, how many context
    # positions that head keeps (kept is then their union); None: one set serves every layer and head
    head_counts: list[list[int]] | None = None

    def __post_init__(self):
        if not self.ids:
            self.ids = "tail" if get_mode(self.mode).carries_kv else "kept"
        if self.prompt_ids is not None:
            self.n_prompt = len(self.prompt_ids)
            self.template_hash = ids_digest(self.prompt_ids[: self.context_span[0]])
            self.token_ids = {p: int(self.prompt_ids[p]) for p in self.id_positions()}

    @property
    def prompt_len(self) -> int:
        return self.n_prompt

    @property
    def per_head(self) -> bool:
        return self.head_counts is not None

    @property
    def tail_start(self) -> int:
        """First position whose id the header carries as the tail: the cloud computes [tail_start, n_prompt)."""
        return self.context_span[1] if self.question == "cloud" else self.n_prompt - 1

    def cloud_positions(self) -> list[int]:
        """Positions the cloud computes before generating (the template and the question when they are the
        cloud's, not the last prompt token, which it feeds as its first decoding step)."""
        start, end = self.context_span
        return [*(range(start) if self.template == "cloud" else ()), *range(self.tail_start, self.n_prompt - 1)]

    @property
    def n_ids(self) -> int:
        """How many token ids the header carries (len(id_positions()), without building the list)."""
        tail = self.n_prompt - self.tail_start
        if self.ids == "kept":
            return len(self.kept) + tail
        if self.ids == "all":
            return self.n_prompt - (self.context_span[0] if self.template == "cloud" else 0)
        return tail

    def id_positions(self) -> list[int]:
        """The positions whose token ids the header carries, in the order it writes them."""
        tail = range(self.tail_start, self.n_prompt)
        if self.ids == "kept":
            return [*self.kept, *tail]
        if self.ids == "all":
            return list(range(self.context_span[0] if self.template == "cloud" else 0, self.n_prompt))
        return list(tail)

    def ids_at(self, positions) -> list[int]:
        """The token ids at `positions`; FrameError("bad_header") names a position the header does not carry."""
        try:
            return [self.token_ids[int(p)] for p in positions]
        except KeyError as exc:
            raise FrameError(
                "bad_header", f"the header carries no token id for position {exc.args[0]} (ids {self.ids!r})"
            ) from None


def _varints(values) -> bytes:
    out = bytearray()
    for v in values:
        put_varint(out, int(v))
    return bytes(out)


def encode_header(h: StreamHeader) -> bytes:
    meta = {
        "mode": h.mode,
        "geometry": h.geometry,
        "model": h.model,
        "tokenizer": h.tokenizer,
        "dtype": h.dtype,
        "profile": h.profile.to_dict() if h.profile else None,
        "selector": h.selector,
        "retention": h.retention,
        "context_span": list(h.context_span),
        "n_prompt": h.n_prompt,
        "n_kept": len(h.kept),
        "template": h.template,
        "template_hash": h.template_hash,
        "question": h.question,
        "ids": h.ids,
    }
    counts = b""
    if h.per_head:
        meta["head_layout"] = HEAD_LAYOUT
        counts = _varints(c for layer in h.head_counts for c in layer)
    return pack_json(meta) + encode_deltas(h.kept, signed=False) + counts + _varints(h.ids_at(h.id_positions()))


def _int(meta: dict, key: str, lo: int, hi: int, where: str = "header") -> int:
    v = meta.get(key)
    if type(v) is not int or not lo <= v <= hi:
        raise FrameError("bad_header", f"{where}: {key}={v!r} is not an integer in [{lo}, {hi}]")
    return v


def _choice(meta: dict, key: str, allowed: tuple[str, ...]) -> str:
    v = meta.get(key)
    if v not in allowed:
        raise FrameError("bad_header", f"{key}={v!r} is not one of {', '.join(allowed)}")
    return v


def decode_header(frame: Frame) -> StreamHeader:
    """Parse a header frame; any malformed field is a FrameError("bad_header"), whatever its type."""
    try:
        return _decode_header(frame)
    except FrameError:
        raise
    except (ValueError, TypeError, AttributeError, KeyError, OverflowError) as exc:
        raise FrameError("bad_header", f"malformed header field: {exc}") from None


def _check_kept(kept: list[int], n_prompt: int, span: tuple[int, int], template: str, question: str) -> None:
    """Kept positions: strictly ascending below n_prompt - 1, every template position iff the template is
    streamed, every question position iff the question is, never one the cloud computes."""
    if any(b <= a for a, b in zip(kept, kept[1:])) or kept[-1] >= n_prompt - 1:
        raise FrameError("bad_header", "kept positions are not strictly ascending inside [0, prompt_len - 1)")
    in_template = sum(1 for p in kept if p < span[0])
    in_question = sum(1 for p in kept if p >= span[1])
    if in_template != (span[0] if template == "stream" else 0):
        what = "drop template positions" if template == "stream" else "include template positions the cloud computes"
        raise FrameError("bad_header", f"kept positions {what}")
    if in_question != (n_prompt - 1 - span[1] if question == "stream" else 0):
        what = "drop question positions" if question == "stream" else "include question positions the cloud computes"
        raise FrameError("bad_header", f"kept positions {what}")
    if in_template + in_question == len(kept):
        raise FrameError("bad_header", "kept positions hold no context position")


def _decode_header(frame: Frame) -> StreamHeader:
    r = Reader(frame.body, "header")
    meta = read_json(r)
    mode = meta.get("mode")
    if mode not in streamed_mode_names():
        raise FrameError("bad_header", f"mode {mode!r} is not a streamed mode ({', '.join(streamed_mode_names())})")
    geo = meta.get("geometry")
    if not isinstance(geo, dict):
        raise FrameError("bad_header", "geometry is missing")
    _int(geo, "num_layers", 1, MAX_LAYERS, "geometry")
    _int(geo, "kv_heads", 1, MAX_HEADS, "geometry")
    _int(geo, "head_dim", 1, MAX_HEAD_DIM, "geometry")
    n_prompt = _int(meta, "n_prompt", 2, MAX_PROMPT)
    n_kept = _int(meta, "n_kept", 1, n_prompt - 1)
    span = meta.get("context_span")
    if not (
        isinstance(span, list)
        and len(span) == 2
        and all(type(x) is int for x in span)
        and 0 <= span[0] < span[1] <= n_prompt - 1
    ):
        raise FrameError("bad_header", f"context_span {span!r} is not a non-empty span inside the prompt")
    template, question = _choice(meta, "template", FIXED_SOURCES), _choice(meta, "question", FIXED_SOURCES)
    ids = _choice(meta, "ids", ID_LAYOUTS if get_mode(mode).carries_kv else ("kept", "all"))
    template_hash = meta.get("template_hash")
    if not (isinstance(template_hash, str) and len(template_hash) == _HASH_DIGITS):
        raise FrameError("bad_header", f"template_hash {template_hash!r} is not {_HASH_DIGITS} hex digits")
    kept = r.deltas(n_kept, signed=False, field="kept positions")
    _check_kept(kept, n_prompt, (span[0], span[1]), template, question)
    head_counts = _head_counts(r, meta, frame.heads, geo, sum(1 for p in kept if span[0] <= p < span[1]))
    header = StreamHeader(
        mode=mode,
        prompt_ids=None,
        context_span=(span[0], span[1]),
        kept=kept,
        geometry=geo,
        model=str(meta.get("model", "")),
        tokenizer=str(meta.get("tokenizer", "")),
        dtype=str(meta.get("dtype", "")),
        selector=str(meta.get("selector", "")),
        retention=_retention(meta.get("retention")),
        stream_id=frame.stream_id,
        template=template,
        question=question,
        ids=ids,
        template_hash=template_hash,
        n_prompt=n_prompt,
        head_counts=head_counts,
    )
    ids_list = r.varints(header.n_ids, "token ids")  # counted from the JSON, checked to fit before anything is built
    header.token_ids = dict(zip(header.id_positions(), ids_list))
    r.done()
    if get_mode(mode).carries_kv:
        if not isinstance(meta.get("profile"), dict):
            raise FrameError("bad_header", "kv stream without a precision profile")
        try:
            header.profile = PrecisionProfile.from_dict(meta["profile"])
            header.profile.resolve(geo["num_layers"], geo["head_dim"])
        except ConfigError as exc:
            raise FrameError("bad_header", f"profile: {exc}") from None
    return header


def _head_counts(r: Reader, meta: dict, flagged: bool, geo: dict, context_kept: int) -> list[list[int]] | None:
    """A per-head header's context entries per (layer, KV head): each at most the kept context positions,
    together enough to carry every one of them; None for a one-set header."""
    layout = meta.get("head_layout")
    if not flagged:
        if layout is not None:
            raise FrameError("bad_header", "head_layout in a header without the per-head flag")
        return None
    if type(layout) is not int or layout != HEAD_LAYOUT:
        raise FrameError("bad_header", f"head_layout {layout!r}: this decoder reads layout {HEAD_LAYOUT}")
    if not get_mode(meta["mode"]).carries_kv:
        raise FrameError("bad_header", f"a {meta['mode']} stream has no per-head layout")
    layers, heads = geo["num_layers"], geo["kv_heads"]
    flat = r.varints(layers * heads, "per-head counts")
    if max(flat) > context_kept or sum(flat) < context_kept:
        raise FrameError(
            "bad_header",
            f"per-head counts (largest {max(flat)}, sum {sum(flat)}) do not fit {context_kept} kept context positions",
        )
    return [flat[i * heads : (i + 1) * heads] for i in range(layers)]


def _retention(value) -> float:
    if type(value) not in (int, float) or not 0.0 < value <= 1.0:
        raise FrameError("bad_header", f"retention {value!r} is not a number in (0, 1]")
    return float(value)


class StreamEncoder:
    """Frames for one stream. kv mode: `header()`, then `chunks()`, then `trailer()`; scout: header + trailer."""

    def __init__(self, header: StreamHeader, compress: bool = False, chunk_bytes: int = DEFAULT_CHUNK_BYTES):
        if not get_mode(header.mode).streamed:
            raise ConfigError(f"mode {header.mode!r} is not streamed; streamed: {', '.join(streamed_mode_names())}")
        if header.prompt_ids is None:
            raise ConfigError("a stream is encoded from a header built with the prompt's ids (prompt_ids)")
        self.header, self.compress = header, compress
        self.chunk_bytes = min(chunk_bytes, MAX_BODY // 2)
        self.seq, self.total, self.digest = 0, 0, hashlib.sha256()

    def _emit(self, kind: int, body: bytes) -> bytes:
        heads = self.header.per_head and kind != TRAILER
        frame = pack_frame(kind, self.header.stream_id, self.seq, body, self.compress, heads)
        self.seq += 1
        self.total += len(frame)
        self.digest.update(frame)
        return frame

    def header_frame(self) -> bytes:
        return self._emit(HEADER, encode_header(self.header))

    def chunk_frames(self, keys: list[torch.Tensor], values: list[torch.Tensor], order: torch.Tensor):
        """Yield chunk frames of positions in `order` (most important first).

        keys/values: per layer [kv_heads, stream_len, head_dim] (a prefill cache's layers with [0]).
        """
        if self.header.per_head:
            raise ConfigError("a per-head stream's chunks come from head_chunk_frames")
        geo = self.header.geometry
        specs = self.header.profile.resolve(geo["num_layers"], geo["head_dim"])
        heads, dim = geo["kv_heads"], geo["head_dim"]
        per_pos = sum(
            k.sizes(heads, 1, dim)[0]
            + k.sizes(heads, 1, dim)[1]
            + v.sizes(heads, 1, dim)[0]
            + v.sizes(heads, 1, dim)[1]
            for k, v in specs
        )
        n_per_chunk = max(1, self.chunk_bytes // max(1, per_pos + 4 * len(specs)))
        for start in range(0, len(order), n_per_chunk):
            positions = torch.sort(order[start : start + n_per_chunk]).values  # sorted: small deltas
            index = positions.to(keys[0].device)
            body = bytearray()
            put_varint(body, len(positions))
            body += encode_deltas(positions.tolist(), signed=True)
            body += struct.pack("<H", len(specs))
            for layer, (kq, vq) in enumerate(specs):
                for q, t in ((kq, keys[layer]), (vq, values[layer])):
                    scales, payload = q.encode(t.index_select(1, index))
                    body += _TENSOR_HEAD.pack(q.encoding.code, _AXIS_CODES[q.axis], q.group, len(scales), len(payload))
                    body += scales + payload
            yield self._emit(CHUNK, bytes(body))

    def head_chunk_frames(self, keys: list[torch.Tensor], values: list[torch.Tensor], fixed, entries: torch.Tensor):
        """Yield the chunk frames of a per-head stream: the template and question positions in `fixed`
        (each a row of every head) first, then the context entries, [n, 3] rows of (layer, KV head,
        position) most important first (Selection.entry_order), about chunk_bytes of K and V a chunk."""
        if not self.header.per_head:
            raise ConfigError("head_chunk_frames needs a per-head header (head_counts)")
        geo = self.header.geometry
        specs = self.header.profile.resolve(geo["num_layers"], geo["head_dim"])
        for group_fixed, group in plan_chunks(
            [int(p) for p in fixed], entries, specs, geo["kv_heads"], geo["head_dim"], self.chunk_bytes
        ):
            yield self._emit(CHUNK, encode_chunk(group_fixed, group, keys, values, specs, geo["kv_heads"]))

    def trailer_frame(self) -> bytes:
        frames, total, digest = self.seq, self.total, self.digest.digest()
        return self._emit(TRAILER, struct.pack("<IQ", frames, total) + digest)


@dataclass
class DecodedKV:
    """Decoded KV of the positions received; keys/values per layer [1, kv_heads, n, head_dim]."""

    header: StreamHeader
    positions: torch.Tensor
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    complete: bool
    wire_bytes: int
    frames: int
    # a per-head stream: per layer, per KV head, the ascending indices into `positions` that head holds
    head_slots: tuple[tuple[torch.Tensor, ...], ...] | None = None

    @property
    def held(self) -> int:
        """Positions an answer from this stream holds: those that arrived plus those the cloud computes."""
        return len(self.positions) + len(self.header.cloud_positions())

    @property
    def context_kept(self) -> int:
        """Context positions an answer attends to: those that arrived, or for a per-head stream the context
        entries that arrived per (layer, KV head), on average (rounded)."""
        start, end = self.header.context_span
        in_context = (self.positions >= start) & (self.positions < end)
        if self.head_slots is None:
            return int(in_context.sum())
        total = sum(int(in_context[s].sum()) for layer in self.head_slots for s in layer)
        return round(total / sum(len(layer) for layer in self.head_slots))

    @property
    def missing_fixed(self) -> int:
        """Template and question positions of the header that have not arrived: an anytime answer from
        a partial stream needs them all (selection never drops them, so the edge sends them first)."""
        start, end = self.header.context_span
        fixed = sum(1 for p in self.header.kept if not start <= p < end)
        return fixed - int(((self.positions < start) | (self.positions >= end)).sum())


class StreamDecoder:
    """Verify and decode one stream frame by frame.

    Any error is a FrameError and leaves the decoder failed: later frames are refused, and no
    cache is ever built from a stream that failed. `result()` needs a verified trailer.
    """

    def __init__(
        self,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        max_prompt: int = MAX_PROMPT,
        max_kv_bytes: int = DEFAULT_MAX_KV_BYTES,
        on_header: Callable[[StreamHeader], None] | None = None,
    ):
        """on_header runs after the header is verified and before anything is allocated: a receiver
        checks there that the stream fits its model (it may raise its own error type).
        max_kv_bytes caps the decoded KV a header may ask this decoder to hold."""
        self.dtype, self.device, self.max_prompt = dtype, torch.device(device), max_prompt
        self.max_kv_bytes, self.on_header = max_kv_bytes, on_header
        self.header: StreamHeader | None = None
        self.seq = 0
        self.wire_bytes = 0
        self.digest = hashlib.sha256()
        self.finished = False
        self.failed: FrameError | None = None
        self._received: torch.Tensor | None = None
        self._slot: dict[int, int] = {}

    def feed(self, data: bytes) -> int:
        """Verify one frame and apply it; returns its type (HEADER, CHUNK or TRAILER)."""
        if self.failed is not None:
            raise FrameError("stream_failed", f"stream already rejected ({self.failed})")
        try:
            return self._feed(data)
        except FrameError as exc:
            self.failed = exc
            raise

    def _feed(self, data: bytes) -> int:
        if self.finished:
            raise FrameError("after_trailer", "frame received after the trailer")
        frame = parse_frame(data)
        if self.header is None and frame.kind != HEADER:
            raise FrameError(
                "out_of_order",
                f"the first frame of a stream must be its header, got a {FRAME_TYPES[frame.kind]} (seq {frame.seq})",
            )
        if frame.seq != self.seq:
            what = "duplicated" if frame.seq < self.seq else "out_of_order"
            raise FrameError(what, f"frame seq {frame.seq} where seq {self.seq} was expected")
        if self.header is None:
            self._start(decode_header(frame))
        elif frame.stream_id != self.header.stream_id:
            raise FrameError("wrong_stream", "frame belongs to another stream")
        elif frame.kind == CHUNK:
            if not get_mode(self.header.mode).carries_kv:
                raise FrameError("out_of_order", "a scout stream carries no chunks")
            if frame.heads != self.header.per_head:
                raise FrameError("bad_flags", f"chunk seq {frame.seq}: per-head flag differs from the header's")
            if self.header.per_head:
                g = self.header.geometry
                r = Reader(frame.body, f"chunk seq {frame.seq}")
                chunk = read_chunk(r, frame.seq, self.header, self._specs, self._slot, self._received, self._head_got)
                apply_chunk(chunk, self._k, self._v, self._received, self._head_got, g["head_dim"])
            else:
                self._chunk(frame)
        elif frame.kind == TRAILER:
            self._trailer(frame)
        else:
            raise FrameError("duplicated", "second header in one stream")
        self.seq += 1
        self.wire_bytes += frame.wire_size
        self.digest.update(data)
        return frame.kind

    def _start(self, header: StreamHeader) -> None:
        if header.prompt_len > self.max_prompt:
            raise FrameError(
                "oversized", f"stream announces {header.prompt_len} prompt tokens; the limit is {self.max_prompt}"
            )
        if get_mode(header.mode).carries_kv:
            g = header.geometry
            need = (
                2
                * g["num_layers"]
                * g["kv_heads"]
                * len(header.kept)
                * g["head_dim"]
                * torch.finfo(self.dtype).bits
                // 8
            )
            if need > self.max_kv_bytes:
                raise FrameError(
                    "oversized", f"stream needs {need} bytes of decoded KV; this receiver allows {self.max_kv_bytes}"
                )
        if self.on_header is not None:
            try:
                self.on_header(header)
            except Exception as exc:  # the receiver's own error type goes up unchanged
                self.failed = FrameError("incompatible", str(exc))
                raise
        self.header = header
        self._slot = {p: i for i, p in enumerate(header.kept)}
        self._received = torch.zeros(len(header.kept), dtype=torch.bool)
        if get_mode(header.mode).carries_kv:
            g = header.geometry
            self._specs = header.profile.resolve(g["num_layers"], g["head_dim"])
            shape = (g["kv_heads"], len(header.kept), g["head_dim"])
            self._k = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(g["num_layers"])]
            self._v = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(g["num_layers"])]
        if header.per_head:  # which (layer, head) holds which kept slot: a bool per KV entry, not per element
            self._head_got = torch.zeros(g["num_layers"], g["kv_heads"], len(header.kept), dtype=torch.bool)

    def _chunk(self, frame: Frame) -> None:
        g = self.header.geometry
        r = Reader(frame.body, f"chunk seq {frame.seq}")
        n = r.varint("position count")
        if not 1 <= n <= len(self.header.kept):
            raise FrameError("malformed", f"chunk seq {frame.seq} carries {n} positions")
        positions = r.deltas(n, signed=True, field="positions")
        slots, seen = [], set()
        for p in positions:
            slot = self._slot.get(p)
            if slot is None:
                raise FrameError("bad_position", f"position {p} is not among the stream's kept positions")
            if slot in seen or self._received[slot]:
                raise FrameError("duplicated", f"position {p} arrived twice")
            seen.add(slot)
            slots.append(slot)
        (layers,) = r.unpack("H", "layer count")
        if layers != g["num_layers"]:
            raise FrameError("malformed", f"chunk has {layers} layers, the header says {g['num_layers']}")
        parts = []  # validate everything before decoding anything
        for layer, specs in enumerate(self._specs):
            for name, q in zip("kv", specs):
                kind, axis, group, ns, npay = r.unpack(_TENSOR_HEAD.format[1:], f"layer {layer} {name} encoding")
                if (kind, axis, group) != (q.encoding.code, _AXIS_CODES[q.axis], q.group):
                    raise FrameError(
                        "bad_encoding", f"layer {layer} {name}: encoding differs from the header's profile"
                    )
                want = q.sizes(g["kv_heads"], n, g["head_dim"])
                if (ns, npay) != want:
                    raise FrameError(
                        "bad_length", f"layer {layer} {name}: {ns}+{npay} bytes, expected {want[0]}+{want[1]}"
                    )
                parts.append((layer, name, q, r.take(ns, "scales"), r.take(npay, "payload")))
        r.done()
        index = torch.tensor(slots, dtype=torch.long, device=self.device)
        tmp = torch.empty(g["kv_heads"], n, g["head_dim"], dtype=self.dtype, device=self.device)
        for layer, name, q, scales, payload in parts:
            q.decode(scales, payload, tmp)
            (self._k if name == "k" else self._v)[layer].index_copy_(1, index, tmp)
        self._received[index.cpu()] = True

    def _trailer(self, frame: Frame) -> None:
        r = Reader(frame.body, "trailer")
        frames, total = r.unpack("IQ", "counts")
        digest = r.take(32, "digest")
        r.done()
        if frames != self.seq or total != self.wire_bytes:
            raise FrameError(
                "bad_trailer", f"trailer counts {frames} frames/{total} bytes; received {self.seq}/{self.wire_bytes}"
            )
        if digest != self.digest.digest():
            raise FrameError("bad_trailer", "stream digest mismatch")
        if get_mode(self.header.mode).carries_kv and not bool(self._received.all()):
            missing = int((~self._received).sum())
            raise FrameError("incomplete", f"trailer arrived with {missing} kept positions never sent")
        if self.header.per_head:
            start, end = self.header.context_span
            kept = torch.tensor(self.header.kept)
            got = self._head_got[:, :, (kept >= start) & (kept < end)].sum(dim=2)
            if got.tolist() != self.header.head_counts:
                raise FrameError("incomplete", "trailer arrived before every head's context entries")
        self.finished = True

    def _decoded(self, complete: bool) -> DecodedKV:
        h = self.header
        if not get_mode(h.mode).carries_kv:
            return DecodedKV(h, torch.tensor(h.kept), [], [], complete, self.wire_bytes, self.seq)
        got = self._received.nonzero().flatten()
        if complete:
            keys, values = [k[None] for k in self._k], [v[None] for v in self._v]
        else:
            keys = [k.index_select(1, got.to(self.device))[None] for k in self._k]
            values = [v.index_select(1, got.to(self.device))[None] for v in self._v]
        heads = None
        if h.per_head:
            rank = torch.cumsum(self._received.long(), 0) - 1  # kept slot -> index among the arrived ones
            heads = tuple(
                tuple(rank[(held & self._received).nonzero().flatten()] for held in layer) for layer in self._head_got
            )
        return DecodedKV(h, torch.tensor(h.kept)[got], keys, values, complete, self.wire_bytes, self.seq, heads)

    def result(self) -> DecodedKV:
        """The whole stream; FrameError unless the trailer has been verified."""
        if self.failed is not None:
            raise FrameError("stream_failed", str(self.failed))
        if not self.finished:
            raise FrameError("incomplete", "stream ended before its trailer")
        return self._decoded(complete=True)

    def partial(self) -> DecodedKV:
        """The positions whose chunks arrived intact so far (anytime use: a deadline cut the stream)."""
        if self.failed is not None:
            raise FrameError("stream_failed", str(self.failed))
        if self.header is None:
            raise FrameError("incomplete", "no header received")
        if self.finished:
            return self.result()
        return self._decoded(complete=False)
