"""EdgeService messages as domain dataclasses: protobuf stops here (to_pb/from_pb).

The codec never sees these; it produces and consumes the frame bytes they carry.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvwire.proto import kvwire_pb2


@dataclass
class PrefillRequest:
    """What the cloud asks the edge to prefill and stream."""

    request_id: str
    mode: str
    context: str
    question: str
    selector: str = "q2c"
    retention: float = 1.0
    profile: str = ""  # empty: the edge's configured profile
    compress: bool = False
    chunk_bytes: int = 0  # 0: the edge's configured chunk size
    confirm: bool = False  # the caller sends a Receipt (EdgeService.Confirm) once the timings message arrived
    doc_id: str = ""  # a document registered on the edge instead of `context` (exactly one of the two)
    template_kv: str = ""  # "stream" or "cloud" (empty: "stream"); docs/codec.md, "Fixed positions"
    question_kv: str = ""
    scout_prefill: str = ""  # scout: "sparse" or "full" (empty: "sparse")
    heads: str = ""  # kv: "" one position set; "global" or "layer": a set per (layer, KV head) under that budget

    def to_pb(self) -> kvwire_pb2.PrefillRequest:
        return kvwire_pb2.PrefillRequest(
            request_id=self.request_id,
            mode=self.mode,
            context=self.context,
            question=self.question,
            selector=self.selector,
            retention=self.retention,
            profile=self.profile,
            compress=self.compress,
            chunk_bytes=self.chunk_bytes,
            confirm=self.confirm,
            doc_id=self.doc_id,
            template_kv=self.template_kv,
            question_kv=self.question_kv,
            scout_prefill=self.scout_prefill,
            heads=self.heads,
        )

    @classmethod
    def from_pb(cls, pb: kvwire_pb2.PrefillRequest) -> PrefillRequest:
        return cls(
            request_id=pb.request_id,
            mode=pb.mode,
            context=pb.context,
            question=pb.question,
            selector=pb.selector,
            retention=pb.retention,
            profile=pb.profile,
            compress=pb.compress,
            chunk_bytes=pb.chunk_bytes,
            confirm=pb.confirm,
            doc_id=pb.doc_id,
            template_kv=pb.template_kv,
            question_kv=pb.question_kv,
            scout_prefill=pb.scout_prefill,
            heads=pb.heads,
        )


@dataclass
class PrefillReply:
    """One message of a Prefill stream: a codec frame, or (last) the edge's stage timings in ms."""

    request_id: str
    frame: bytes | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)

    def to_pb(self) -> kvwire_pb2.PrefillReply:
        if self.frame is not None:
            return kvwire_pb2.PrefillReply(request_id=self.request_id, frame=self.frame)
        return kvwire_pb2.PrefillReply(
            request_id=self.request_id, timings=kvwire_pb2.EdgeTimings(stage_ms=self.timings_ms)
        )

    @classmethod
    def from_pb(cls, pb: kvwire_pb2.PrefillReply) -> PrefillReply:
        if pb.WhichOneof("body") == "frame":
            return cls(request_id=pb.request_id, frame=pb.frame)
        return cls(request_id=pb.request_id, timings_ms=dict(pb.timings.stage_ms))


@dataclass
class DocumentInfo:
    """A document registered on the edge, as GetDocument describes it (text only when asked for)."""

    doc_id: str
    version: int
    etag: str
    tokens: int
    bytes: int
    cached: bool = False  # the edge holds its prefix KV now
    text: str | None = None

    def to_pb(self) -> kvwire_pb2.DocumentReply:
        return kvwire_pb2.DocumentReply(
            doc_id=self.doc_id,
            version=self.version,
            etag=self.etag,
            tokens=self.tokens,
            bytes=self.bytes,
            cached=self.cached,
            text=self.text or "",
        )

    @classmethod
    def from_pb(cls, pb: kvwire_pb2.DocumentReply, with_text: bool) -> DocumentInfo:
        return cls(pb.doc_id, pb.version, pb.etag, pb.tokens, pb.bytes, pb.cached, pb.text if with_text else None)
