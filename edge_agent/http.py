"""The edge's HTTP side: /healthz (process alive), /readyz (model loaded, not draining), /metrics, and the
documents API (/v1/documents, docs/documents.md) with the one table that maps its errors to HTTP statuses."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from starlette.convertors import Convertor, register_url_convertor

from kvwire.agent_common.errors import LengthRequiredError, ServiceError, UnauthenticatedError
from kvwire.agent_common.logs import clean_request_id, log_event, request_id_var
from kvwire.agent_common.metrics import CONTENT_TYPE, Metrics
from kvwire.agent_common.security import bearer_refusal, www_authenticate
from kvwire.edge_agent.documents import (
    DocumentMeta,
    DocumentNotFoundError,
    DocumentStore,
    DocumentTooLargeError,
    InvalidDocumentError,
    InvalidDocumentIdError,
    StoreFullError,
)

log = logging.getLogger("kvwire.edge_agent")

# Probes and scrapers carry no token; every other path (the documents API) needs it when auth is on.
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
DOCUMENTS = "/v1/documents"
# A PUT body is the document itself, as UTF-8 text; JSON would be stored as a document that is JSON.
TEXT_TYPES = frozenset({"text/plain", "application/octet-stream"})


class BodyTooLargeError(ServiceError):
    """A PUT whose Content-Length is over max_document_bytes: refused before a byte is read."""


class UnsupportedMediaTypeError(ServiceError):
    """A PUT body that is not text/plain (UTF-8) or application/octet-stream."""


class _AnyDocumentId(Convertor):
    """Every id a URL can carry, slashes and control characters included (Starlette's `path` stops at a
    newline): whatever the caller sent reaches the store's id check and gets its 422, never a bare 404."""

    regex = "(?s:.*)"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("any_document_id", _AnyDocumentId())


# (error class, HTTP status, error label) — most specific first
STATUS_TABLE: tuple[tuple[type[BaseException], int, str], ...] = (
    (UnauthenticatedError, 401, "unauthenticated"),
    (DocumentNotFoundError, 404, "not_found"),
    (LengthRequiredError, 411, "invalid"),
    (BodyTooLargeError, 413, "too_long"),
    (DocumentTooLargeError, 413, "too_long"),
    (UnsupportedMediaTypeError, 415, "invalid"),
    (InvalidDocumentIdError, 422, "invalid"),
    (InvalidDocumentError, 422, "invalid"),
    (StoreFullError, 507, "store_full"),
)


def classify(exc: BaseException) -> tuple[int, str]:
    """(HTTP status, error label); anything unexpected is a 500."""
    for cls, status, label in STATUS_TABLE:
        if isinstance(exc, cls):
            return status, label
    return 500, "error"


def error_response(exc: BaseException, request_id: str | None) -> JSONResponse:
    """{"detail": message, "error": label, "request_id": id}, the shape the cloud's errors have."""
    status, label = classify(exc)
    if status == 500:
        log.error("internal_error", exc_info=exc)
        message = f"internal error ({type(exc).__name__}); see the edge-agent log for this request id"
    else:
        message = str(exc)
    headers = None
    if isinstance(exc, UnauthenticatedError):
        headers = www_authenticate(exc)
    return JSONResponse(
        {"detail": message, "error": label, "request_id": request_id}, status_code=status, headers=headers
    )


def admission(request: Request, token: str | None, max_body_bytes: int) -> ServiceError | None:
    """Why a request is refused before its body is read (None: it goes on). The token comes first."""
    if request.url.path in OPEN_PATHS:
        return None
    refused = bearer_refusal(request.headers.get("authorization"), token, "edge-agent")
    if refused is not None or request.method != "PUT":
        return refused
    length = request.headers.get("content-length")
    if "transfer-encoding" in request.headers or length is None:
        return LengthRequiredError(
            f"send the document with a Content-Length header (at most {max_body_bytes} bytes, "
            "--max-document-bytes), not chunked"
        )
    if not length.isdigit() or int(length) > max_body_bytes:
        return BodyTooLargeError(
            f"the document is {length} bytes; this edge-agent stores at most {max_body_bytes} per document "
            "(--max-document-bytes)"
        )
    kind, _, params = request.headers.get("content-type", "text/plain").partition(";")
    charset = params.strip().lower().removeprefix("charset=").strip('"') if "charset" in params.lower() else "utf-8"
    if kind.strip().lower() not in TEXT_TYPES or charset not in ("utf-8", "utf8", "us-ascii"):
        return UnsupportedMediaTypeError(
            f"send the document's text itself as the body, Content-Type: text/plain; charset=utf-8 "
            f"(not {request.headers.get('content-type')!r})"
        )
    return None


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def create_app(
    servicer,
    metrics: Metrics,
    model_source: str,
    store: DocumentStore | None = None,
    auth_token: str | None = None,
    cached: Callable[[DocumentMeta], bool] | None = None,
) -> FastAPI:
    """The app. With `store`, the documents API; with `auth_token`, every path but OPEN_PATHS answers 401
    unless it carries `Authorization: Bearer <auth_token>`. `cached(meta)` fills each document's `cached`
    field (the prefix cache's answer; none: false)."""
    app = FastAPI(title="kvwire edge-agent", docs_url=None, redoc_url=None, openapi_url=None)
    max_body = store.limits.max_document_bytes if store is not None else 0
    is_cached = cached or (lambda meta: False)

    def described(meta: DocumentMeta) -> dict:
        return {
            "id": meta.id,
            "version": meta.version,
            "etag": meta.etag,
            "bytes": meta.bytes,
            "tokens": meta.tokens,
            "created_at": _iso(meta.created_at),
            "updated_at": _iso(meta.updated_at),
            "cached": bool(is_cached(meta)),
        }

    @app.middleware("http")
    async def request_context(request: Request, call_next):
        rid = clean_request_id(request.headers.get("x-request-id"))
        rid_token = request_id_var.set(rid)
        started = time.perf_counter()
        try:
            refused = admission(request, auth_token, max_body)
            response = error_response(refused, rid) if refused is not None else await call_next(request)
            response.headers["X-Request-ID"] = rid
            if request.url.path not in OPEN_PATHS:
                log_event(
                    log,
                    "http_request",
                    method=request.method,
                    path=request.url.path[:200],
                    status=response.status_code,
                    ms=round((time.perf_counter() - started) * 1000, 2),
                )
            return response
        finally:
            request_id_var.reset(rid_token)

    async def handle_error(request: Request, exc: Exception) -> JSONResponse:
        return error_response(exc, request_id_var.get())

    for cls in (ServiceError, Exception):
        app.add_exception_handler(cls, handle_error)

    @app.head("/healthz", include_in_schema=False)  # probes that send HEAD
    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}

    @app.head("/readyz", include_in_schema=False)
    @app.get("/readyz")
    def readyz():
        if servicer.draining:
            return JSONResponse({"ready": False, "reason": "shutting down"}, status_code=503)
        return {"ready": True, "model": model_source}

    @app.head("/metrics", include_in_schema=False)
    @app.get("/metrics")
    def metrics_route():
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    if store is None:
        return app

    # The store's calls block (SQLite, the tokenizer): they run in worker threads, never on the event loop.

    @app.get(DOCUMENTS)
    async def list_documents():
        metas = await asyncio.to_thread(store.list)
        return {"documents": [described(m) for m in metas], "count": len(metas), "bytes": sum(m.bytes for m in metas)}

    @app.get(DOCUMENTS + "/{doc_id:any_document_id}/text")
    async def get_text(doc_id: str):
        doc = await asyncio.to_thread(store.get, doc_id)
        return Response(doc.text, media_type="text/plain; charset=utf-8", headers={"ETag": f'"{doc.etag}"'})

    @app.get(DOCUMENTS + "/{doc_id:any_document_id}")
    async def get_document(doc_id: str):
        meta = await asyncio.to_thread(store.meta, doc_id)
        return JSONResponse(described(meta), headers={"ETag": f'"{meta.etag}"'})

    @app.put(DOCUMENTS + "/{doc_id:any_document_id}")
    async def put_document(doc_id: str, request: Request):
        body = await request.body()
        if len(body) > max_body:  # Content-Length was checked; this holds if a body ever arrives without one
            raise BodyTooLargeError(f"the document is over {max_body} bytes (--max-document-bytes)")
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidDocumentError(
                f"the body is not UTF-8 text (byte {exc.start} is {body[exc.start]:#04x}); send the document as UTF-8"
            ) from None
        doc, created = await asyncio.to_thread(store.put_reporting, doc_id, text)
        return JSONResponse(described(doc.meta), status_code=201 if created else 200, headers={"ETag": f'"{doc.etag}"'})

    @app.delete(DOCUMENTS + "/{doc_id:any_document_id}")
    async def delete_document(doc_id: str):
        if not await asyncio.to_thread(store.delete, doc_id):
            raise DocumentNotFoundError(doc_id)
        return Response(status_code=204)

    return app
