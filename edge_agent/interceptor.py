"""The edge's per-request wrapper: request id for the logs, in-flight gauge, outcome counter, and
the one place where errors become gRPC status codes."""

from __future__ import annotations

import logging

import grpc

from kvwire.agent_common.errors import UnauthenticatedError
from kvwire.agent_common.grpc_status import status_of
from kvwire.agent_common.logs import clean_request_id, log_event, request_id_var
from kvwire.agent_common.metrics import Metrics
from kvwire.agent_common.security import bearer_matches
from kvwire.kvcodec.modes import streamed_mode_names

log = logging.getLogger("kvwire.edge_agent")

SERVICE_PREFIX = "/kvwire.v1.EdgeService/"


class RequestInterceptor(grpc.ServerInterceptor):
    """Wraps every EdgeService streaming handler; other services (health) pass through untouched."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if (
            handler is None
            or handler.unary_stream is None
            or not handler_call_details.method.startswith(SERVICE_PREFIX)
        ):
            return handler
        inner = handler.unary_stream
        metrics = self.metrics

        def wrapped(request, context):
            mode = request.mode if request.mode in streamed_mode_names() else "invalid"  # bounded label values
            request.request_id = clean_request_id(request.request_id, fresh_prefix="edge-")
            request_id_var.set(request.request_id)
            metrics.inflight.inc()
            outcome = "cancelled"  # unless the stream runs to its end or raises
            try:
                yield from inner(request, context)
                # a handler that returns early because the caller went away (e.g. while waiting for the model) is no "ok"
                outcome = "ok" if context.is_active() else "cancelled"
            except Exception as exc:
                code, outcome, message = status_of(exc)
                if code == grpc.StatusCode.INTERNAL:
                    log.exception("prefill_failed", extra={"mode": mode})
                else:
                    log_event(log, "prefill_refused", logging.WARNING, mode=mode, status=code.name, reason=message)
                context.abort(code, message)
            finally:
                metrics.inflight.dec()
                metrics.requests.labels(mode, outcome).inc()
                if outcome == "cancelled":
                    log_event(log, "prefill_cancelled", mode=mode)
                request_id_var.set(None)

        return grpc.unary_stream_rpc_method_handler(
            wrapped, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
        )


class TokenInterceptor(grpc.ServerInterceptor):
    """Refuses EdgeService calls that do not carry `authorization: Bearer <token>` with UNAUTHENTICATED,
    before the request is even deserialized (so mode="unknown" in kvwire_requests_total).

    grpc.health.v1 stays open: load balancers and the cloud's /readyz probe it without a token, and it
    reveals nothing but SERVING / NOT_SERVING.
    """

    def __init__(self, token: str, metrics: Metrics):
        self._token = token
        self.metrics = metrics

    def intercept_service(self, continuation, handler_call_details):
        if not handler_call_details.method.startswith(SERVICE_PREFIX):
            return continuation(handler_call_details)
        sent = [v for k, v in (handler_call_details.invocation_metadata or ()) if k == "authorization"]
        if len(sent) == 1 and bearer_matches(sent[0], self._token):
            return continuation(handler_call_details)
        if sent:
            reason = "edge-agent refused the call: its bearer token is not the one in this edge's auth_token_file"
        else:
            reason = "edge-agent requires authorization metadata 'Bearer <token>' (its auth_token_file); the call carried none"
        exc = UnauthenticatedError(reason, token_sent=bool(sent))
        code, outcome, message = status_of(exc)
        self.metrics.requests.labels("unknown", outcome).inc()
        log_event(log, "prefill_refused", logging.WARNING, mode="unknown", status=code.name, reason=message)
        handler = continuation(handler_call_details)

        def refuse(request, context):
            context.abort(code, message)

        if handler is not None and handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(refuse)
        return grpc.unary_unary_rpc_method_handler(refuse)
