"""The cloud's HTTP API: POST /answer, /healthz, /readyz, /metrics."""
from __future__ import annotations

import logging
import time
import uuid

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from agent_common.errors import ServiceError
from agent_common.logs import log_event, request_id_var
from agent_common.metrics import CONTENT_TYPE, Metrics
from cloud_agent.api import AnswerRequest, AnswerResponse
from cloud_agent.errors import RequestTooLargeError, classify, error_response
from cloud_agent.service import AnswerService
from kvcodec.errors import KVWireError

log = logging.getLogger("cloud_agent")


def request_id_from(header: str | None) -> str:
    """The caller's X-Request-ID if it is short and printable, else a fresh one."""
    if header and len(header) <= 64 and all(c.isalnum() or c in "-_.:" for c in header):
        return header
    return uuid.uuid4().hex


def create_app(service: AnswerService, metrics: Metrics, max_body_bytes: int) -> FastAPI:
    app = FastAPI(title="kvwire cloud-agent", summary="Answers questions about a context with KV or scout positions from an edge-agent.")

    @app.middleware("http")
    async def request_context(request: Request, call_next):
        rid = request_id_from(request.headers.get("x-request-id"))
        token = request_id_var.set(rid)
        started = time.perf_counter()
        try:
            length = request.headers.get("content-length")
            if length and length.isdigit() and int(length) > max_body_bytes:
                response = error_response(RequestTooLargeError(
                    f"the request body is {length} bytes; this cloud-agent accepts at most {max_body_bytes} (--max-body-bytes)"), rid)
            else:
                response = await call_next(request)
            response.headers["X-Request-ID"] = rid
            level = logging.INFO if request.url.path == "/answer" else logging.DEBUG
            log_event(log, "http_request", level, method=request.method, path=request.url.path, status=response.status_code,
                      ms=round((time.perf_counter() - started) * 1000, 2))
            return response
        finally:
            request_id_var.reset(token)

    async def handle_error(request: Request, exc: Exception) -> JSONResponse:
        if isinstance(exc, RequestValidationError) and request.url.path == "/answer":
            metrics.requests.labels("unknown", classify(exc)[1]).inc()  # refused before a mode was known
        return error_response(exc, request_id_var.get())

    for cls in (KVWireError, ServiceError, RequestValidationError, Exception):
        app.add_exception_handler(cls, handle_error)

    @app.post("/answer", response_model=AnswerResponse)
    async def answer(body: AnswerRequest) -> AnswerResponse:
        """Answer `question` about `context` in kv, scout or text mode; returns the answer with byte and latency figures."""
        return await service.answer(body, request_id_var.get())

    @app.get("/healthz")
    async def healthz():
        """The process is up and serving HTTP."""
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        """Ready: the model is loaded and the edge-agent answers its health check (503 otherwise)."""
        ready, info = await service.ready()
        return JSONResponse({"ready": ready, **info}, status_code=200 if ready else 503)

    @app.get("/metrics")
    async def metrics_route():
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    return app
