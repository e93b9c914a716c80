"""The cloud's HTTP API: POST /answer, the OpenAI-compatible /v1 routes, /healthz, /readyz, /metrics."""

from __future__ import annotations

import logging
import time

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException

from kvwire.agent_common.errors import ServiceError
from kvwire.agent_common.logs import clean_request_id, log_event, request_id_var
from kvwire.agent_common.metrics import CONTENT_TYPE, Metrics
from kvwire.agent_common.security import bearer_refusal
from kvwire.cloud_agent.api import DEFAULT_MAX_NEW_TOKENS, AnswerRequest, AnswerResponse, ErrorBody
from kvwire.cloud_agent.errors import (
    BodyEncodingError,
    LengthRequiredError,
    RequestTooLargeError,
    classify,
    error_response,
    error_statuses,
    from_framework,
)
from kvwire.cloud_agent.openai_api import PREFIX as OPENAI_PREFIX
from kvwire.cloud_agent.openai_api import openai_error_response, openai_router
from kvwire.cloud_agent.service import AnswerService
from kvwire.cloud_agent.streaming import answer_events
from kvwire.kvcodec.errors import KVWireError

log = logging.getLogger("kvwire.cloud_agent")

# Probes and scrapers (kubelet, load balancers, Prometheus) carry no token; these pages say only whether
# the daemon is up and how it performs. Every other path, /answer and the API docs included, needs the token.
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
COUNTED_PATHS = frozenset({"/answer", "/v1/chat/completions"})  # their refusals count in kvwire_requests_total


def is_openai(request: Request) -> bool:
    """The request is on an OpenAI-compatible route, whose errors take OpenAI's shape."""
    return request.url.path.startswith(OPENAI_PREFIX)


def admission(request: Request, auth_token: str | None, max_body_bytes: int) -> ServiceError | None:
    """Why a request is refused before any handler reads it (None: it goes on). The token comes first: a
    caller without it learns nothing about limits. Bodies must declare their length so that the limit
    holds before a byte is read (a chunked body could otherwise grow without bound)."""
    if request.url.path not in OPEN_PATHS:
        refused = bearer_refusal(request.headers.get("authorization"), auth_token, "cloud-agent")
        if refused is not None:
            return refused
    if "transfer-encoding" in request.headers:
        return LengthRequiredError(
            f"send the request body with a Content-Length header (at most {max_body_bytes} bytes, "
            "--max-body-bytes), not chunked"
        )
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > max_body_bytes:
        return RequestTooLargeError(
            f"the request body is {length} bytes; this cloud-agent accepts at most {max_body_bytes} (--max-body-bytes)"
        )
    return None


def create_app(service: AnswerService, metrics: Metrics, max_body_bytes: int, auth_token: str | None = None) -> FastAPI:
    """The app; with `auth_token`, every path but OPEN_PATHS answers 401 unless the request carries `Authorization: Bearer <auth_token>`."""
    app = FastAPI(
        title="kvwire cloud-agent",
        summary="Answers questions about a context with KV or scout positions from an edge-agent.",
    )

    @app.middleware("http")
    async def request_context(request: Request, call_next):
        rid = clean_request_id(request.headers.get("x-request-id"))
        rid_token = request_id_var.set(rid)
        started = time.perf_counter()
        try:
            refused = admission(request, auth_token, max_body_bytes)
            if refused is not None:
                metrics.requests.labels("unknown", classify(refused)[1]).inc()  # refused before a mode was known
                response = (openai_error_response if is_openai(request) else error_response)(refused, rid)
            else:
                response = await call_next(request)
            response.headers["X-Request-ID"] = rid
            level = logging.INFO if request.url.path == "/answer" else logging.DEBUG
            log_event(
                log,
                "http_request",
                level,
                method=request.method,
                path=request.url.path,
                status=response.status_code,
                ms=round((time.perf_counter() - started) * 1000, 2),
            )
            return response
        finally:
            request_id_var.reset(rid_token)

    async def handle_error(request: Request, exc: Exception) -> JSONResponse:
        exc = from_framework(exc)
        # refused before the service saw the request (it counts its own): no mode known yet
        if (
            isinstance(exc, RequestValidationError | HTTPException | BodyEncodingError)
            and request.url.path in COUNTED_PATHS
        ):
            metrics.requests.labels("unknown", classify(exc)[1]).inc()
        if is_openai(request):
            return openai_error_response(exc, request_id_var.get())
        return error_response(exc, request_id_var.get())

    for cls in (KVWireError, ServiceError, RequestValidationError, HTTPException, Exception):
        app.add_exception_handler(cls, handle_error)

    error_responses = {status: {"model": ErrorBody, "description": words} for status, words in error_statuses().items()}

    # with `stream: true` the 200 is server-sent events instead of the JSON body (docs/openai.md)
    sse = {"description": "the answer; text/event-stream with stream: true", "content": {"text/event-stream": {}}}

    @app.post("/answer", response_model=AnswerResponse, responses={200: sse, **error_responses})
    async def answer(body: AnswerRequest) -> AnswerResponse:
        """Answer `question` about `context` in kv, scout or text mode; returns the answer with byte and latency
        figures, or with `stream: true` server-sent events: a `token` event per generated token, then `answer`."""
        if body.stream:
            return answer_events(await service.answer_stream(body, request_id_var.get()), request_id_var.get())
        return await service.answer(body, request_id_var.get())

    app.include_router(openai_router(service))

    @app.head("/healthz", include_in_schema=False)  # probes that send HEAD
    @app.get("/healthz")
    async def healthz():
        """The process is up and serving HTTP."""
        return {"status": "ok"}

    @app.head("/readyz", include_in_schema=False)  # probes that send HEAD
    @app.get("/readyz")
    async def readyz():
        """Ready: the model is loaded and the edge-agent answers its health check (503 otherwise)."""
        ready, info = await service.ready()
        return JSONResponse({"ready": ready, **info}, status_code=200 if ready else 503)

    @app.head("/metrics", include_in_schema=False)
    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics_route():
        """Prometheus text exposition of this daemon's metrics."""
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    framework_openapi = app.openapi

    def openapi() -> dict:
        """The framework's schema with the limits this cloud-agent enforces (its --max-new-tokens)."""
        if app.openapi_schema is None:
            spec = framework_openapi()
            fields = spec["components"]["schemas"]["AnswerRequest"]["properties"]
            limit = service.settings.max_new_tokens
            fields["max_new_tokens"].update(maximum=limit, default=min(limit, DEFAULT_MAX_NEW_TOKENS))
        return app.openapi_schema

    app.openapi = openapi
    return app
