"""Service-level errors both daemons raise (the codec's own errors live in kvcodec.errors).

Handlers raise these plain exceptions with a message a user can act on; each daemon maps them
to a status code in exactly one place (agent_common/grpc_status.py for gRPC, cloud_agent/errors.py for HTTP).
"""

from __future__ import annotations


class ServiceError(Exception):
    """Base class of the daemons' own errors."""


class OverloadedError(ServiceError):
    """More requests in flight than the configured --max-concurrency: refused at once, never queued."""


class ShuttingDownError(ServiceError):
    """The daemon is draining after SIGTERM/SIGINT and accepts no new requests."""


class EdgeUnavailableError(ServiceError):
    """The edge-agent could not be reached (down, restarting, or the address is wrong)."""


class EdgeBusyError(ServiceError):
    """The edge-agent refused the request because it is at its own concurrency limit."""


class DeadlineExceededError(ServiceError):
    """The request's deadline passed before the edge finished streaming."""


class EdgeFailedError(ServiceError):
    """The edge-agent failed in a way the request did not cause (an internal error there)."""


class UnauthenticatedError(ServiceError):
    """The caller sent no bearer token, or not the one this daemon's auth_token_file holds."""

    def __init__(self, message: str, token_sent: bool = False):
        super().__init__(message)
        self.token_sent = token_sent  # a wrong token (RFC 6750 error="invalid_token") rather than a missing one


class EdgeRefusedTokenError(ServiceError):
    """The edge-agent answered UNAUTHENTICATED: this cloud-agent's edge_token_file does not hold the edge's token."""


class DocumentNotFoundError(ServiceError):
    """No document of this id is registered on the edge (HTTP 404, gRPC NOT_FOUND)."""

    def __init__(self, doc_id: str):
        super().__init__(f"no document {doc_id!r} on the edge (register it with PUT /v1/documents/{doc_id})")
        self.doc_id = doc_id


class StartupConfigError(ServiceError):
    """A setting's file or folder cannot serve (e.g. the edge's document store is locked or corrupt): the
    daemon exits 2 at start-up with the message, which names the setting and the file."""


class LengthRequiredError(ServiceError):
    """A chunked request body: its size is unknown until read, so a size limit could not hold before reading it (411)."""
