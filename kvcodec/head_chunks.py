"""The per-head chunk layout (docs/wire-format.md, section 5b): chunks that carry, per (layer, KV head), the
subset of their positions that head keeps, so each head's K and V rows travel only where that head keeps them.

A stream uses it when its header sets FLAG_HEADS (StreamHeader.head_counts). The chunk lists positions as
a one-set chunk does; a template or question position in it is a row of every head, and each (layer, KV
head) then names which of the chunk's context positions it carries (delta + varint coded indices). A
context position may appear in several chunks, for different heads (anytime order is per entry), never
twice for one head. The one-set layout (section 5) is the compact special case and is written unchanged.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from kvwire.kvcodec.errors import FrameError
from kvwire.kvcodec.quant import Quantizer
from kvwire.kvcodec.wire import Reader, encode_deltas, put_varint

HEAD_LAYOUT = 1  # the header's "head_layout": the revision of this layout a stream was written with
AXIS_CODES = {"token": 0, "channel": 1}
# kind (the encoding's wire code, kvcodec/encodings/), axis, group, scale bytes, payload bytes
TENSOR_HEAD = struct.Struct("<BBHII")


def _sizes(q: Quantizer, n: int, dim: int) -> tuple[int, int]:
    """One head's (scale, payload) bytes for n rows: nothing for a head that carries no row in a chunk."""
    return q.sizes(1, n, dim) if n else (0, 0)


def plan_chunks(
    fixed: Sequence[int], entries: torch.Tensor, specs, kv_heads: int, dim: int, chunk_bytes: int
) -> Iterator[tuple[list[int], list[tuple[int, int, int]]]]:
    """Cut the fixed positions (each a row of every head), then the context entries ([n, 3] rows of layer,
    head, position, most important first) into groups of about chunk_bytes of K and V."""
    row = [sum(sum(q.sizes(1, 1, dim)) for q in pair) for pair in specs]  # one (head, position) row of K and V
    per_fixed = kv_heads * sum(row) + 1
    group_fixed: list[int] = []
    group: list[tuple[int, int, int]] = []
    size = 0
    items = [(p, per_fixed) for p in fixed] + [(tuple(e), row[e[0]] + 2) for e in entries.tolist()]
    for item, cost in items:
        if size and size + cost > chunk_bytes:
            yield group_fixed, group
            group_fixed, group, size = [], [], 0
        if isinstance(item, tuple):
            group.append(item)
        else:
            group_fixed.append(int(item))
        size += cost
    if size:
        yield group_fixed, group


def encode_chunk(
    fixed: Sequence[int], entries: Sequence[tuple[int, int, int]], keys, values, specs, kv_heads: int
) -> bytes:
    """One per-head chunk body. keys/values: per layer [kv_heads, stream_len, head_dim]."""
    ctx = sorted({p for _, _, p in entries})
    index = {p: i for i, p in enumerate(ctx)}
    positions = sorted([*fixed, *ctx])
    members = [[[] for _ in range(kv_heads)] for _ in specs]
    for layer, head, p in entries:
        members[layer][head].append(index[p])
    body = bytearray()
    put_varint(body, len(positions))
    body += encode_deltas(positions, signed=True)
    body += struct.pack("<H", len(specs))
    rows = []
    for layer_members in members:
        layer_rows = []
        for m in layer_members:
            m.sort()
            put_varint(body, len(m))
            body += encode_deltas(m, signed=False)
            layer_rows.append(torch.tensor(sorted([*fixed, *(ctx[i] for i in m)]), dtype=torch.long))
        rows.append(layer_rows)
    for layer, (kq, vq) in enumerate(specs):
        for q, t in ((kq, keys[layer]), (vq, values[layer])):
            scales, payload = bytearray(), bytearray()
            for head, index in enumerate(rows[layer]):
                if len(index):
                    s, p = q.encode(t[head : head + 1].index_select(1, index.to(t.device)))
                    scales += s
                    payload += p
            body += TENSOR_HEAD.pack(q.encoding.code, AXIS_CODES[q.axis], q.group, len(scales), len(payload))
            body += scales + payload
    return bytes(body)


@dataclass
class HeadChunk:
    """A verified per-head chunk, not yet applied: its kept-position slots, each (layer, head)'s rows as
    slots, and per layer and tensor the bytes of every head's rows."""

    slots: torch.Tensor
    rows: list[list[torch.Tensor]]
    parts: list[tuple[int, str, Quantizer, list[tuple[int, bytes, bytes]]]]


def read_chunk(
    r: Reader, seq: int, header, specs, slot_of: dict[int, int], received: torch.Tensor, head_got: torch.Tensor
) -> HeadChunk:
    """Parse and check a per-head chunk body against the stream's state: every length and index is
    checked before anything is decoded (FrameError otherwise), and nothing is applied here."""
    g = header.geometry
    layers, kv_heads, dim = g["num_layers"], g["kv_heads"], g["head_dim"]
    start, end = header.context_span
    n = r.varint("position count")
    if not 1 <= n <= len(header.kept):
        raise FrameError("malformed", f"chunk seq {seq} carries {n} positions")
    positions = r.deltas(n, signed=True, field="positions")
    fixed, ctx, seen = [], [], set()
    for p in positions:
        slot = slot_of.get(p)
        if slot is None:
            raise FrameError("bad_position", f"position {p} is not among the stream's kept positions")
        if slot in seen:
            raise FrameError("duplicated", f"position {p} is listed twice in chunk seq {seq}")
        seen.add(slot)
        if start <= p < end:
            ctx.append(slot)
        elif received[slot]:  # a template or question position is a row of every head: it arrives once
            raise FrameError("duplicated", f"position {p} arrived twice")
        else:
            fixed.append(slot)
    (count,) = r.unpack("H", "layer count")
    if count != layers:
        raise FrameError("malformed", f"chunk has {count} layers, the header says {layers}")
    ctx_slots = torch.tensor(ctx, dtype=torch.long)
    fixed_slots = torch.tensor(fixed, dtype=torch.long)
    covered = torch.zeros(len(ctx), dtype=torch.bool)
    rows = []
    for layer in range(layers):
        layer_rows = []
        for head in range(kv_heads):
            m = r.varint(f"layer {layer} head {head} count")
            if m > len(ctx):
                raise FrameError("malformed", f"layer {layer} head {head}: {m} entries of {len(ctx)} context positions")
            index = r.deltas(m, signed=False, field=f"layer {layer} head {head} entries")
            if any(b <= a for a, b in zip(index, index[1:])) or (index and index[-1] >= len(ctx)):
                raise FrameError(
                    "malformed", f"layer {layer} head {head}: entries are not ascending indices below {len(ctx)}"
                )
            mine = ctx_slots[torch.tensor(index, dtype=torch.long)]
            if bool(head_got[layer, head, mine].any()):
                raise FrameError("duplicated", f"layer {layer} head {head}: a context entry arrived twice")
            covered[index] = True
            layer_rows.append(torch.sort(torch.cat([fixed_slots, mine])).values)
        rows.append(layer_rows)
    if not bool(covered.all()):
        raise FrameError("malformed", f"chunk seq {seq} lists a context position that no head carries")
    parts = []
    for layer, pair in enumerate(specs):
        for name, q in zip("kv", pair):
            kind, axis, group, ns, npay = r.unpack(TENSOR_HEAD.format[1:], f"layer {layer} {name} encoding")
            if (kind, axis, group) != (q.encoding.code, AXIS_CODES[q.axis], q.group):
                raise FrameError("bad_encoding", f"layer {layer} {name}: encoding differs from the header's profile")
            sizes = [_sizes(q, len(rows[layer][h]), dim) for h in range(kv_heads)]
            want = (sum(s for s, _ in sizes), sum(p for _, p in sizes))
            if (ns, npay) != want:
                raise FrameError("bad_length", f"layer {layer} {name}: {ns}+{npay} bytes, expected {want[0]}+{want[1]}")
            scales, payload = r.take(ns, "scales"), r.take(npay, "payload")
            heads, a, b = [], 0, 0
            for h, (s, p) in enumerate(sizes):
                if s or p:
                    heads.append((h, scales[a : a + s], payload[b : b + p]))
                a, b = a + s, b + p
            parts.append((layer, name, q, heads))
    r.done()
    return HeadChunk(torch.tensor(sorted(seen), dtype=torch.long), rows, parts)


def apply_chunk(chunk: HeadChunk, keys, values, received: torch.Tensor, head_got: torch.Tensor, dim: int) -> None:
    """Decode a verified chunk into the decoder's buffers (per layer [kv_heads, n_kept, head_dim])."""
    for layer, name, q, heads in chunk.parts:
        buf = (keys if name == "k" else values)[layer]
        for head, scales, payload in heads:
            index = chunk.rows[layer][head]
            tmp = torch.empty(1, len(index), dim, dtype=buf.dtype, device=buf.device)
            q.decode(scales, payload, tmp)
            buf[head].index_copy_(0, index.to(buf.device), tmp[0])
    for layer, layer_rows in enumerate(chunk.rows):
        for head, index in enumerate(layer_rows):
            head_got[layer, head, index] = True
    received[chunk.slots] = True
