"""`edge-agent`: load the model once, serve EdgeService + gRPC health, and HTTP health/metrics; drain on SIGTERM."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from kvwire.agent_common.daemon import check_ports_free, load_daemon_model, run_daemon, warn_if_exposed
from kvwire.agent_common.edge_client import KEEPALIVE_TIME_MS
from kvwire.agent_common.errors import StartupConfigError
from kvwire.agent_common.logs import log_event
from kvwire.agent_common.metrics import Metrics
from kvwire.agent_common.security import read_token, server_credentials
from kvwire.agent_common.serve import HttpServer
from kvwire.agent_common.settings import grpc_address
from kvwire.edge_agent.documents import DocumentStore, check_document_store
from kvwire.edge_agent.interceptor import RequestInterceptor, TokenInterceptor
from kvwire.edge_agent.settings import EdgeSettings
from kvwire.kvcodec.prompt import user_token_ids
from kvwire.proto import kvwire_pb2, kvwire_pb2_grpc

if TYPE_CHECKING:
    from kvwire.edge_agent.service import EdgeServicer

log = logging.getLogger("kvwire.edge_agent")

DESCRIPTION = """\
KVWire edge-agent: prefills a context with the edge model, keeps the positions that matter for
the question, quantizes their KV cache and streams checksummed frames to a cloud-agent over gRPC
(EdgeService.Prefill; health: grpc.health.v1). HTTP: /healthz, /readyz, /metrics, and the documents
API /v1/documents (texts registered by id, kept in SQLite under data_dir; docs/documents.md).
TLS, mutual TLS and a bearer token switch on with the tls_* and auth_token_file options (docs/security.md)."""
SERVICE_NAME = kvwire_pb2.DESCRIPTOR.services_by_name["EdgeService"].full_name
EXTRA_THREADS = 4  # gRPC workers beyond max_concurrency, for health checks and prompt refusals


@dataclass(frozen=True)
class EdgeSecurity:
    """What the security options switched on, read and checked before the model loads."""

    credentials: grpc.ServerCredentials | None  # None: plaintext gRPC
    token: str | None  # None: Prefill needs no token
    mutual_tls: bool = False

    @property
    def tls_mode(self) -> str:
        """off, tls or mutual (logged in the `listening` line)."""
        return "off" if self.credentials is None else "mutual" if self.mutual_tls else "tls"


def check_startup(settings: EdgeSettings) -> EdgeSecurity:
    """check_security, then open and check the document store's file (locked, corrupt: StartupConfigError,
    exit 2, naming the file), all before the model loads."""
    security = check_security(settings)
    check_document_store(settings.documents_dir())
    if settings.prefix_cache_disk_bytes:
        check_prefix_disk(settings)
    return security


def check_prefix_disk(settings: EdgeSettings) -> None:
    """The disk tier's folder (data_dir/prefix-cache) can be created and written, or StartupConfigError (exit 2)."""
    folder = settings.prefix_disk_dir("")
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        probe = folder / f".probe.tmp{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise StartupConfigError(
            f"prefix_cache_disk_bytes: cannot write to {str(folder)!r} ({exc.strerror}); "
            "set --data-dir to a writable folder, or --prefix-cache-disk-bytes 0"
        ) from None


def check_security(settings: EdgeSettings) -> EdgeSecurity:
    """Read the TLS files and the token file, read the profile, and check that both ports are free, before
    the model loads; SecurityConfigError or ConfigError (exit 2) names the setting at fault."""
    from kvwire.kvcodec.profiles import get_profile

    get_profile(settings.profile)  # a named profile or a JSON file; its fit to the model is checked once it loads
    check_ports_free(settings.host, settings.grpc_port, settings.http_port)
    credentials = None
    if settings.tls_cert_file:
        credentials = server_credentials(settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file)
    token = read_token(settings.auth_token_file, "auth_token_file") if settings.auth_token_file else None
    return EdgeSecurity(credentials, token, mutual_tls=settings.tls_client_ca_file is not None)


def build_grpc_server(servicer: EdgeServicer, metrics: Metrics, settings: EdgeSettings, token: str | None = None):
    """The gRPC server with message caps, the token check (when a token is set), the request interceptor,
    EdgeService and health; not started, no port bound."""
    workers = settings.max_concurrency + EXTRA_THREADS
    options = [
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.so_reuseport", 0),  # a second edge on a taken port must fail, not share it
        # cloud-agents ping every KEEPALIVE_TIME_MS, also between requests; gRPC's server default
        # (one ping per 5 minutes without calls) would answer them with GOAWAY "too_many_pings"
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_TIME_MS // 2),
    ]
    interceptors = ([TokenInterceptor(token, metrics)] if token else []) + [RequestInterceptor(metrics)]
    # maximum_concurrent_rpcs: RPCs beyond the worker pool are refused (RESOURCE_EXHAUSTED), never queued
    server = grpc.server(
        ThreadPoolExecutor(max_workers=workers, thread_name_prefix="edge-rpc"),
        options=options,
        interceptors=interceptors,
        maximum_concurrent_rpcs=workers,
    )
    kvwire_pb2_grpc.add_EdgeServiceServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    return server, health_servicer


def drain(servicer: EdgeServicer, server: grpc.Server, health_servicer, grace_seconds: float) -> None:
    """Stop serving: refuse new streams, give the ones in flight the grace period, then stop the server.

    The gRPC server keeps running while streams are in flight: server.stop() would refuse every new
    RPC, the cloud's Confirm of a finished stream among them, and that stream would wait for a receipt
    that cannot come. New Prefill calls are refused by the servicer (ShuttingDownError, UNAVAILABLE).
    """
    started = time.monotonic()
    servicer.draining = True
    health_servicer.enter_graceful_shutdown()  # health checks answer NOT_SERVING from now on
    servicer.wait_idle(grace_seconds)
    left = max(0.0, grace_seconds - (time.monotonic() - started))
    server.stop(left).wait()  # streams still running after the grace period are cancelled


async def serve(settings: EdgeSettings, security: EdgeSecurity) -> int:
    from kvwire.edge_agent.http import create_app
    from kvwire.edge_agent.service import EdgeServicer

    warn_if_exposed(
        log,
        settings.auth_token_file,
        "auth_token_file",
        security.credentials is not None,
        "the gRPC port is plaintext (no tls_cert_file): the cloud's token",
    )
    if security.token is not None and not is_loopback(settings.host):
        log_event(
            log,
            "token_in_clear",
            logging.WARNING,
            setting="auth_token_file",
            reason="the HTTP port (the documents API) is plain HTTP: anyone on the path can read the token",
        )
    loaded, seconds = load_daemon_model(settings)
    metrics = Metrics("edge")
    store = open_documents(settings, loaded.tokenizer, metrics)
    servicer = EdgeServicer(loaded, settings, metrics, documents=store)
    log_event(
        log,
        "model_loaded",
        model=loaded.source,
        seconds=seconds,
        geometry=servicer.edge.geometry,
        profile=servicer.default_profile.name,
    )

    server, health_servicer = build_grpc_server(servicer, metrics, settings, security.token)
    address = grpc_address(settings.host, settings.grpc_port)
    if security.credentials is None:
        grpc_port = server.add_insecure_port(address)
    else:
        grpc_port = server.add_secure_port(address, security.credentials)
    http = HttpServer(
        create_app(servicer, metrics, loaded.source, store, security.token, cached=servicer.holds_prefix),
        settings.host,
        settings.http_port,
        settings.grace_seconds,
    )
    server.start()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)

    await http.start()
    log_event(
        log,
        "listening",
        host=settings.host,
        grpc_port=grpc_port,
        http_port=http.port,
        grpc_tls=security.tls_mode,
        token=security.token is not None,
    )
    await http.until_stopped()
    log_event(log, "draining", grace_seconds=settings.grace_seconds)
    await asyncio.to_thread(drain, servicer, server, health_servicer, settings.grace_seconds)
    await http.shutdown()
    servicer.close()
    store.close()
    log_event(log, "stopped")
    return 0


def open_documents(settings: EdgeSettings, tokenizer, metrics: Metrics) -> DocumentStore:
    """The document store under data_dir, counting tokens with the edge's tokenizer (the literal count,
    no special tokens), with kvwire_documents kept current after every committed change."""

    def count_tokens(text: str) -> int:
        return len(user_token_ids(tokenizer, text))  # as the prompt tokenizes it: special-token strings stay text

    store = DocumentStore(settings.documents_dir(), count_tokens, settings.document_limits())
    metrics.documents.set(len(store))
    store.subscribe(lambda doc_id, version: metrics.documents.set(len(store)))
    log_event(log, "documents_opened", path=str(store.path), documents=len(store), bytes=store.total_bytes())
    return store


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def main(argv: list[str] | None = None) -> int:
    return run_daemon("edge-agent", EdgeSettings, DESCRIPTION, argv, check_startup, serve, log)


if __name__ == "__main__":
    sys.exit(main())
