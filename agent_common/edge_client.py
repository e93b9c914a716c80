"""EdgeClient: the cloud's side of EdgeService. gRPC stops here: callers get PrefillReply objects
and domain errors (agent_common.errors, kvcodec.errors), never grpc.RpcError."""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvwire.agent_common.edge_messages import DocumentInfo, PrefillReply, PrefillRequest
from kvwire.agent_common.errors import (
    DeadlineExceededError,
    DocumentNotFoundError,
    EdgeBusyError,
    EdgeFailedError,
    EdgeRefusedTokenError,
    EdgeUnavailableError,
)
from kvwire.agent_common.grpc_status import CLOUD_ERRORS
from kvwire.kvcodec.wire import peek_stream_id
from kvwire.proto import kvwire_pb2_grpc
from kvwire.proto.kvwire_pb2 import DocumentRequest, Receipt

KEEPALIVE_TIME_MS = 5000  # ping the edge after this long without reading anything from it
KEEPALIVE_TIMEOUT_MS = 3000  # and drop the connection if the ping's answer takes longer
CONFIRM_TIMEOUT_S = 5.0  # the longest a receipt may take (it is one small unary call)
# gRPC's words for a stream the transport lost (its status then is UNKNOWN or INTERNAL, not UNAVAILABLE)
TRANSPORT_FAILURES = ("Stream removed", "Failed parsing HTTP/2", "Connection reset", "Socket closed")


class EdgeClient:
    """One channel to one edge-agent, opened lazily and reconnected by gRPC as needed.

    With `credentials` (agent_common.security.channel_credentials) the channel speaks TLS, checking the
    edge's certificate against `server_name` when given, else against the host in `address`. With a
    `token`, every Prefill carries `authorization: Bearer <token>`; health checks carry none (the edge
    keeps them open).
    """

    def __init__(
        self,
        address: str,
        max_message_bytes: int = 8 << 20,
        credentials: grpc.ChannelCredentials | None = None,
        server_name: str | None = None,
        token: str | None = None,
    ):
        self.address = address
        self.tls = credentials is not None
        self.sends_token = token is not None
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            # an edge that restarts is found again within a second or two, not after gRPC's default 2-minute backoff cap
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.min_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 2000),
            # a connection that went silent (a dead link, a host gone without a FIN) is dropped after
            # KEEPALIVE_TIME_MS + KEEPALIVE_TIMEOUT_MS and reconnected, instead of holding every later
            # request until TCP gives up after minutes; the edge permits these pings (edge_agent/main.py)
            ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
            ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
            # gRPC waits 60 s for any ping's answer by default, and sends no keepalive ping while one is
            # outstanding: without this a ping lost on a silent link holds the connection for a minute
            ("grpc.http2.ping_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ]
        if credentials is None:
            self.channel = grpc.insecure_channel(address, options=options)
        else:
            if server_name:
                options.append(("grpc.ssl_target_name_override", server_name))
            self.channel = grpc.secure_channel(address, credentials, options=options)
        self._stub = kvwire_pb2_grpc.EdgeServiceStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def check_health(self, timeout_s: float) -> str:
        """'SERVING' when the edge is up and ready; raises EdgeUnavailableError (with the reason) otherwise."""
        try:
            reply = self._health.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout_s)
        except grpc.RpcError as exc:
            raise self._translate(exc, timeout_s) from None
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        if status != "SERVING":
            raise EdgeUnavailableError(f"edge-agent at {self.address} reports {status}")
        self._check_token(timeout_s)
        return status

    def _check_token(self, timeout_s: float) -> None:
        """EdgeRefusedTokenError when the edge refuses this client's token (or its lack of one).

        Health checks carry no token, so they cannot tell; an empty receipt (a Confirm of no stream,
        which the edge ignores) goes through the same token check as Prefill.
        """
        try:
            self._stub.Confirm(Receipt(), timeout=timeout_s, metadata=self._metadata)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                raise self._translate(exc, timeout_s) from None
            # anything else (an edge without Confirm, a slow answer) leaves readiness to the health check

    def prefill(self, request: PrefillRequest, timeout_s: float) -> Iterator[PrefillReply]:
        """The edge's stream for `request`. Closing the iterator early cancels the call on the edge.

        With request.confirm, the edge's timings message (the last one, after every frame) is
        confirmed (EdgeService.Confirm) before it is passed on: the edge then knows the frames
        arrived, and counts the stream "ok" only then.
        """
        call = self._stub.Prefill(request.to_pb(), timeout=timeout_s, metadata=self._metadata)
        ends_at = time.monotonic() + timeout_s
        stream_id, received = None, 0
        try:
            for pb in call:
                reply = PrefillReply.from_pb(pb)
                if reply.frame is not None:
                    received += len(reply.frame)
                    stream_id = stream_id or peek_stream_id(reply.frame)
                elif request.confirm and stream_id is not None:
                    self._confirm(stream_id, received, ends_at)
                yield reply
        except grpc.RpcError as exc:
            raise self._translate(exc, timeout_s, request.doc_id) from None
        finally:
            call.cancel()  # no-op once the stream has ended

    def get_document(self, doc_id: str, include_text: bool, timeout_s: float, request_id: str = "") -> DocumentInfo:
        """The edge's document `doc_id` (DocumentNotFoundError if it has none), with its text when asked."""
        req = DocumentRequest(request_id=request_id, doc_id=doc_id, include_text=include_text)
        try:
            reply = self._stub.GetDocument(req, timeout=timeout_s, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise self._translate(exc, timeout_s, doc_id) from None
        return DocumentInfo.from_pb(reply, include_text)

    def _confirm(self, stream_id: bytes, received: int, ends_at: float) -> None:
        """Send the receipt; a failure is left to the stream itself (its end or its error says what happened)."""
        try:
            self._stub.Confirm(
                Receipt(stream_id=stream_id, frame_bytes=received),
                timeout=max(0.05, min(CONFIRM_TIMEOUT_S, ends_at - time.monotonic())),
                metadata=self._metadata,
            )
        except grpc.RpcError:
            pass  # an edge without Confirm (UNIMPLEMENTED) or one gone: the stream's status reports the latter

    def _translate(self, exc: grpc.RpcError, timeout_s: float, doc_id: str = "") -> Exception:
        """The domain error for a failed call: the class from EdgeService's status table, the words for a user here."""
        code, details = exc.code(), exc.details() or ""
        cls = CLOUD_ERRORS.get(code)
        if cls is DocumentNotFoundError:
            return cls(doc_id)
        if cls is EdgeBusyError:
            return cls(f"edge-agent at {self.address} is busy: {details}")
        if cls is EdgeRefusedTokenError:
            if not self.sends_token:
                return cls(
                    f"edge-agent at {self.address} requires a bearer token and this cloud-agent sends "
                    "none; set edge_token_file to a file holding the edge's auth_token_file token"
                )
            return cls(
                f"edge-agent at {self.address} refused this cloud-agent's token; check edge_token_file "
                "here against auth_token_file on the edge"
            )
        if code == grpc.StatusCode.UNAVAILABLE:  # the edge draining, or no connection at all
            hint = self._connection_hint(details)
            return EdgeUnavailableError(
                f"edge-agent at {self.address} is unreachable ({details}){'; ' + hint if hint else ''}; "
                "kv and scout modes need it, mode=text does not"
            )
        if cls is not None:  # the edge's own words: a request error the caller fixes
            return cls(details)
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return DeadlineExceededError(
                f"the deadline of {timeout_s * 1000:.0f} ms passed before edge-agent at {self.address} finished"
            )
        if code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL) and any(
            m in details for m in TRANSPORT_FAILURES
        ):
            # the bytes between the hosts were cut or corrupted below the codec (HTTP/2 framing): the link, not the edge
            return EdgeUnavailableError(
                f"the connection to edge-agent at {self.address} broke mid-stream ({details}): the link cut or corrupted "
                "the gRPC framing; retry, or use mode=text"
            )
        return EdgeFailedError(f"edge-agent at {self.address} failed: {code.name}: {details}")

    def _connection_hint(self, details: str) -> str:
        """What to check when a connection failed in a way that points at TLS (gRPC gives the reason only as text)."""
        text = details.lower()
        if "hostname verification" in text:
            return (
                "TLS: the edge's certificate does not name the host in --edge; connect by a name it lists "
                "or set --edge-server-name"
            )
        if "handshake" in text or "certificate" in text:
            return (
                "TLS handshake failed: check that --edge-ca-file holds the CA that signed the edge's certificate "
                "and that the certificate has not expired"
            )
        if "socket closed" in text or "connection reset" in text:
            if not self.tls:
                return (
                    "the edge closed the connection: if it serves TLS (tls_cert_file), give this cloud-agent "
                    "--edge-ca-file"
                )
            return (
                "the edge closed the TLS connection: if it requires client certificates (tls_client_ca_file), give "
                "this cloud-agent --edge-cert-file and --edge-key-file signed by that CA"
            )
        return ""
