"""`edge-agent`: load the model once, serve EdgeService + gRPC health, and HTTP health/metrics; drain on SIGTERM."""
from __future__ import annotations

import asyncio
import logging
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from agent_common.logs import log_event, setup_logging
from agent_common.metrics import Metrics
from agent_common.serve import HttpServer, install_stop_handlers
from agent_common.settings import apply_thread_limit, grpc_address, load_settings
from edge_agent.interceptor import RequestInterceptor
from edge_agent.settings import EdgeSettings
from kvcodec.errors import KVWireError
from proto import kvwire_pb2, kvwire_pb2_grpc

if TYPE_CHECKING:
    from edge_agent.service import EdgeServicer

log = logging.getLogger("edge_agent")

DESCRIPTION = """\
KVWire edge-agent: prefills a context with the edge model, keeps the positions that matter for
the question, quantizes their KV cache and streams checksummed frames to a cloud-agent over gRPC
(EdgeService.Prefill; health: grpc.health.v1). HTTP: /healthz, /readyz, /metrics."""
SERVICE_NAME = kvwire_pb2.DESCRIPTOR.services_by_name["EdgeService"].full_name
EXTRA_THREADS = 4  # gRPC workers beyond max_concurrency, for health checks and prompt refusals


def build_grpc_server(servicer: EdgeServicer, metrics: Metrics, settings: EdgeSettings):
    """The gRPC server with message caps, the request interceptor, EdgeService and health; not started."""
    workers = settings.max_concurrency + EXTRA_THREADS
    options = [
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.so_reuseport", 0),  # a second edge on a taken port must fail, not share it
    ]
    # maximum_concurrent_rpcs: RPCs beyond the worker pool are refused (RESOURCE_EXHAUSTED), never queued
    server = grpc.server(ThreadPoolExecutor(max_workers=workers, thread_name_prefix="edge-rpc"), options=options,
                         interceptors=[RequestInterceptor(metrics)], maximum_concurrent_rpcs=workers)
    kvwire_pb2_grpc.add_EdgeServiceServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    return server, health_servicer


async def serve(settings: EdgeSettings) -> int:
    from transformers.utils import logging as hf_logging

    from edge_agent.http import create_app
    from edge_agent.service import EdgeServicer
    from kvcodec.models import load_model  # torch and transformers load here, after the flags were checked

    hf_logging.disable_progress_bar()
    started = time.perf_counter()
    loaded = load_model(settings.model, settings.dtype, settings.device)
    metrics = Metrics("edge")
    servicer = EdgeServicer(loaded, settings, metrics)
    log_event(log, "model_loaded", model=loaded.source, seconds=round(time.perf_counter() - started, 2),
              geometry=servicer.edge.geometry, profile=servicer.default_profile.name)

    server, health_servicer = build_grpc_server(servicer, metrics, settings)
    grpc_port = server.add_insecure_port(grpc_address(settings.host, settings.grpc_port))
    http = HttpServer(create_app(servicer, metrics, loaded.source), settings.host, settings.http_port, settings.grace_seconds)
    server.start()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)

    stop = asyncio.Event()
    install_stop_handlers(stop)
    http_task = asyncio.create_task(http.serve())
    await http.started(http_task)
    log_event(log, "listening", host=settings.host, grpc_port=grpc_port, http_port=http.port)

    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait({stopper, http_task}, return_when=asyncio.FIRST_COMPLETED)
    log_event(log, "draining", grace_seconds=settings.grace_seconds)
    servicer.draining = True
    health_servicer.enter_graceful_shutdown()  # health checks answer NOT_SERVING from now on
    done = server.stop(settings.grace_seconds)  # refuses new RPCs; in-flight streams get the grace period
    await asyncio.to_thread(done.wait)
    http.stop()
    await http_task
    stopper.cancel()
    log_event(log, "stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    settings = load_settings(EdgeSettings, argv, "edge-agent", DESCRIPTION)
    setup_logging("edge-agent", settings.log_level)
    apply_thread_limit(settings.threads)
    try:
        return asyncio.run(serve(settings))
    except (KVWireError, OSError, RuntimeError) as exc:
        log_event(log, "startup_failed", logging.ERROR, error=f"{type(exc).__name__}: {exc}")
        print(f"edge-agent: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
