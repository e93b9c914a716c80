"""Serving a FastAPI app with uvicorn inside a daemon's own asyncio loop.

The daemon owns the signals (uvicorn's own handlers would re-raise SIGTERM after shutdown and
kill the process before the gRPC side drains), binds the socket itself so port 0 works and the
bound port is known, and stops uvicorn gracefully: listeners close, in-flight requests finish.
"""
from __future__ import annotations

import asyncio
import contextlib
import signal
import socket

import uvicorn


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):  # the daemon installs its own SIGTERM/SIGINT handlers
        yield


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: a free port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host.strip("[]"), port))
    sock.listen(1024)
    sock.set_inheritable(True)
    return sock


class HttpServer:
    """uvicorn on a socket we bound; `port` is known before serving starts."""

    def __init__(self, app, host: str, port: int, grace_seconds: float):
        self.sock = bind_socket(host, port)
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off",
                                timeout_graceful_shutdown=grace_seconds, server_header=False)
        self.server = _Server(config)

    async def serve(self) -> None:
        await self.server.serve(sockets=[self.sock])

    async def started(self, task: asyncio.Task) -> None:
        """Return once uvicorn accepts connections (or raise what made it fail)."""
        while not self.server.started:
            if task.done():
                task.result()
                raise RuntimeError("the HTTP server stopped during start-up")
            await asyncio.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True


def install_stop_handlers(stop: asyncio.Event) -> None:
    """SIGTERM/SIGINT set `stop`; a second signal is ignored (the drain is already under way)."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
