"""The one place where the cloud's errors become HTTP status codes (and request outcome labels)."""

from __future__ import annotations

import logging

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from kvwire.agent_common.errors import (
    DeadlineExceededError,
    DocumentNotFoundError,
    EdgeBusyError,
    EdgeFailedError,
    EdgeRefusedTokenError,
    EdgeUnavailableError,
    LengthRequiredError,
    OverloadedError,
    ServiceError,
    ShuttingDownError,
    UnauthenticatedError,
)
from kvwire.agent_common.security import www_authenticate
from kvwire.kvcodec.errors import ConfigError, FrameError, GeometryMismatchError, PromptTooLongError

log = logging.getLogger("kvwire.cloud_agent")


class RequestTooLargeError(ServiceError):
    """The request body is larger than --max-body-bytes."""


class BodyEncodingError(ServiceError):
    """The request body is not UTF-8 (a JSON body must be)."""


# (error class, HTTP status, outcome label of kvwire_requests_total) — most specific first
STATUS_TABLE: tuple[tuple[type[BaseException], int, str], ...] = (
    (UnauthenticatedError, 401, "unauthenticated"),
    (PromptTooLongError, 413, "too_long"),
    (RequestTooLargeError, 413, "too_long"),
    (LengthRequiredError, 411, "invalid"),
    (ConfigError, 422, "invalid"),
    (BodyEncodingError, 422, "invalid"),
    (RequestValidationError, 422, "invalid"),
    (GeometryMismatchError, 409, "mismatch"),
    (DocumentNotFoundError, 404, "not_found"),
    (FrameError, 502, "frame_error"),
    (OverloadedError, 429, "overloaded"),
    (EdgeBusyError, 503, "edge_busy"),
    (EdgeUnavailableError, 503, "edge_unavailable"),
    (ShuttingDownError, 503, "shutting_down"),
    (DeadlineExceededError, 504, "deadline"),
    (EdgeRefusedTokenError, 502, "edge_unauthenticated"),
    (EdgeFailedError, 502, "edge_error"),
)
RETRY_LATER = {429, 503}


def classify(exc: BaseException) -> tuple[int, str]:
    """(HTTP status, outcome label); anything unexpected is a 500."""
    if isinstance(exc, HTTPException):  # the framework's own (404 unknown path, 405 method): its status
        return exc.status_code, "invalid"
    for cls, status, outcome in STATUS_TABLE:
        if isinstance(exc, cls):
            return status, outcome
    return 500, "error"


def outcome_labels() -> list[str]:
    """Every outcome label of kvwire_requests_total on the cloud: its series start at 0 (agent_common/metrics.py)."""
    return ["ok", "cancelled", *dict.fromkeys(outcome for _, _, outcome in STATUS_TABLE), "error"]


def error_statuses() -> dict[int, str]:
    """Every status an error can get, with its outcome labels: the /answer route's declared responses."""
    statuses: dict[int, list[str]] = {}
    for _, status, outcome in STATUS_TABLE:
        statuses.setdefault(status, [])
        if outcome not in statuses[status]:
            statuses[status].append(outcome)
    statuses[500] = ["error"]
    return {status: "error: " + ", ".join(outcomes) for status, outcomes in sorted(statuses.items())}


def from_framework(exc: Exception) -> Exception:
    """A framework error the table names better: a body that is not UTF-8 is the caller's (422), not a bare 400."""
    if isinstance(exc, HTTPException) and exc.status_code == 400 and isinstance(exc.__cause__, UnicodeDecodeError):
        return BodyEncodingError(
            f"the request body is not valid UTF-8 ({exc.__cause__.reason} at byte {exc.__cause__.start}); send UTF-8 JSON"
        )
    return exc


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        if err.get("type") == "json_invalid":
            parts.append(f"the request body is not valid JSON ({err.get('ctx', {}).get('error', err.get('msg'))})")
            continue
        where = ".".join(str(x) for x in err.get("loc", ())[1:]) or "body"
        parts.append(f"{where}: {err.get('msg')}")
    return "; ".join(parts) or "invalid request"


def message_of(exc: BaseException) -> str:
    if isinstance(exc, RequestValidationError):
        return _validation_message(exc)
    if isinstance(exc, HTTPException):
        return str(exc.detail)
    if isinstance(exc, FrameError):
        return f"the edge's stream was rejected: {exc}"
    if classify(exc)[0] == 500:
        return f"internal error ({type(exc).__name__}); see the cloud-agent log for this request id"
    return str(exc)


def error_response(exc: BaseException, request_id: str | None) -> JSONResponse:
    """{"detail": message, "error": outcome, "request_id": id} with the mapped status."""
    status, outcome = classify(exc)
    if status == 500:
        log.error("internal_error", exc_info=exc)
    headers = {"Retry-After": "1"} if status in RETRY_LATER else None
    if isinstance(exc, UnauthenticatedError):  # RFC 6750: the scheme, and invalid_token when a token was sent but wrong
        headers = www_authenticate(exc)
    return JSONResponse(
        {"detail": message_of(exc), "error": outcome, "request_id": request_id}, status_code=status, headers=headers
    )
