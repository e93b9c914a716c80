"""An edge-agent's gRPC service running in this process on a loopback port, for tests that need a real edge."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

from kvwire.agent_common.edge_client import EdgeClient
from kvwire.agent_common.metrics import Metrics
from kvwire.edge_agent.main import build_grpc_server
from kvwire.edge_agent.service import EdgeServicer
from kvwire.edge_agent.settings import EdgeSettings

REPO = str(Path(__file__).resolve().parents[1])


def daemon_env() -> dict[str, str]:
    """The environment additions a daemon subprocess of a test gets: this checkout first on PYTHONPATH."""
    path = os.environ.get("PYTHONPATH", "")
    return {"PYTHONPATH": REPO + (os.pathsep + path if path else "")}


@contextmanager
def running_edge(loaded, settings: EdgeSettings, documents=None):
    """SimpleNamespace(servicer, metrics, client): the real servicer behind the real interceptors; stopped after."""
    metrics = Metrics("edge")
    servicer = EdgeServicer(loaded, settings, metrics, documents=documents)
    server, _ = build_grpc_server(servicer, metrics, settings)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    client = EdgeClient(f"127.0.0.1:{port}")
    try:
        yield SimpleNamespace(servicer=servicer, metrics=metrics, client=client)
    finally:
        client.close()
        server.stop(None)
        servicer.close()
