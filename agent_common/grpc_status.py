"""EdgeService's one status table: the error the edge answers with each gRPC status code, and the
error the cloud's EdgeClient raises when it receives that code. The edge's interceptor reads it one
way (edge_agent/interceptor.py), the client the other (agent_common/edge_client.py)."""

from __future__ import annotations

from typing import NamedTuple

import grpc

from kvwire.agent_common.errors import (
    DocumentNotFoundError,
    EdgeBusyError,
    EdgeRefusedTokenError,
    EdgeUnavailableError,
    OverloadedError,
    ShuttingDownError,
    UnauthenticatedError,
)
from kvwire.kvcodec.errors import ConfigError, PromptTooLongError


class GrpcStatus(NamedTuple):
    edge_error: type[BaseException]  # raised while the edge serves a request
    code: grpc.StatusCode  # what the edge aborts the call with
    outcome: str  # the edge's outcome label of kvwire_requests_total
    cloud_error: type[Exception]  # what the cloud's client raises for the code


# most specific first: the edge takes the first row whose error class matches
STATUS_TABLE: tuple[GrpcStatus, ...] = (
    GrpcStatus(PromptTooLongError, grpc.StatusCode.OUT_OF_RANGE, "too_long", PromptTooLongError),
    GrpcStatus(ConfigError, grpc.StatusCode.INVALID_ARGUMENT, "invalid", ConfigError),
    GrpcStatus(DocumentNotFoundError, grpc.StatusCode.NOT_FOUND, "not_found", DocumentNotFoundError),
    # the edge's own concurrency limit; to the cloud a busy edge is a 503, not its own 429
    GrpcStatus(OverloadedError, grpc.StatusCode.RESOURCE_EXHAUSTED, "overloaded", EdgeBusyError),
    GrpcStatus(ShuttingDownError, grpc.StatusCode.UNAVAILABLE, "shutting_down", EdgeUnavailableError),
    GrpcStatus(UnauthenticatedError, grpc.StatusCode.UNAUTHENTICATED, "unauthenticated", EdgeRefusedTokenError),
)
CLOUD_ERRORS: dict[grpc.StatusCode, type[Exception]] = {row.code: row.cloud_error for row in STATUS_TABLE}


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str, str]:
    """(status code, outcome label, message) the edge answers an exception raised while serving with."""
    for row in STATUS_TABLE:
        if isinstance(exc, row.edge_error):
            return row.code, row.outcome, str(exc)
    return grpc.StatusCode.INTERNAL, "error", f"edge-agent internal error: {type(exc).__name__}: {exc}"
