from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PrefillRequest(_message.Message):
    __slots__ = ("request_id", "mode", "context", "question", "selector", "retention", "profile", "compress", "chunk_bytes", "confirm", "doc_id", "template_kv", "question_kv", "scout_prefill", "heads")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    QUESTION_FIELD_NUMBER: _ClassVar[int]
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    RETENTION_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    COMPRESS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    CONFIRM_FIELD_NUMBER: _ClassVar[int]
    DOC_ID_FIELD_NUMBER: _ClassVar[int]
    TEMPLATE_KV_FIELD_NUMBER: _ClassVar[int]
    QUESTION_KV_FIELD_NUMBER: _ClassVar[int]
    SCOUT_PREFILL_FIELD_NUMBER: _ClassVar[int]
    HEADS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    mode: str
    context: str
    question: str
    selector: str
    retention: float
    profile: str
    compress: bool
    chunk_bytes: int
    confirm: bool
    doc_id: str
    template_kv: str
    question_kv: str
    scout_prefill: str
    heads: str
    def __init__(self, request_id: _Optional[str] = ..., mode: _Optional[str] = ..., context: _Optional[str] = ..., question: _Optional[str] = ..., selector: _Optional[str] = ..., retention: _Optional[float] = ..., profile: _Optional[str] = ..., compress: _Optional[bool] = ..., chunk_bytes: _Optional[int] = ..., confirm: _Optional[bool] = ..., doc_id: _Optional[str] = ..., template_kv: _Optional[str] = ..., question_kv: _Optional[str] = ..., scout_prefill: _Optional[str] = ..., heads: _Optional[str] = ...) -> None: ...

class DocumentRequest(_message.Message):
    __slots__ = ("request_id", "doc_id", "include_text")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    DOC_ID_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_TEXT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    doc_id: str
    include_text: bool
    def __init__(self, request_id: _Optional[str] = ..., doc_id: _Optional[str] = ..., include_text: _Optional[bool] = ...) -> None: ...

class DocumentReply(_message.Message):
    __slots__ = ("doc_id", "version", "etag", "tokens", "bytes", "cached", "text")
    DOC_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ETAG_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    doc_id: str
    version: int
    etag: str
    tokens: int
    bytes: int
    cached: bool
    text: str
    def __init__(self, doc_id: _Optional[str] = ..., version: _Optional[int] = ..., etag: _Optional[str] = ..., tokens: _Optional[int] = ..., bytes: _Optional[int] = ..., cached: _Optional[bool] = ..., text: _Optional[str] = ...) -> None: ...

class Receipt(_message.Message):
    __slots__ = ("stream_id", "frame_bytes")
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    FRAME_BYTES_FIELD_NUMBER: _ClassVar[int]
    stream_id: bytes
    frame_bytes: int
    def __init__(self, stream_id: _Optional[bytes] = ..., frame_bytes: _Optional[int] = ...) -> None: ...

class ReceiptReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PrefillReply(_message.Message):
    __slots__ = ("request_id", "frame", "timings")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    FRAME_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    frame: bytes
    timings: EdgeTimings
    def __init__(self, request_id: _Optional[str] = ..., frame: _Optional[bytes] = ..., timings: _Optional[_Union[EdgeTimings, _Mapping]] = ...) -> None: ...

class EdgeTimings(_message.Message):
    __slots__ = ("stage_ms",)
    class StageMsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    STAGE_MS_FIELD_NUMBER: _ClassVar[int]
    stage_ms: _containers.ScalarMap[str, float]
    def __init__(self, stage_ms: _Optional[_Mapping[str, float]] = ...) -> None: ...
