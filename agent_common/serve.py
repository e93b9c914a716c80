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
    """uvicorn on a socket we bound; `port` is known before serving starts. With a certificate and
    key (checked beforehand by agent_common.security) the port speaks HTTPS only."""

    def __init__(
        self,
        app,
        host: str,
        port: int,
        grace_seconds: float,
        ssl_certfile: str | None = None,
        ssl_keyfile: str | None = None,
    ):
        self.sock = bind_socket(host, port)
        self.port = self.sock.getsockname()[1]
        self.scheme = "https" if ssl_certfile else "http"
        config = uvicorn.Config(
            app,
            log_config=None,
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=grace_seconds,
            server_header=False,
            ssl_certfile=ssl_certfile,
            ssl_keyfile=ssl_keyfile,
        )
        self.server = _Server(config)
        self._task: asyncio.Task | None = None
        self._stop = asyncio.Event()

    async def start(self) -> None:
        """Install the SIGTERM/SIGINT handlers and return once uvicorn accepts connections (or raise what made it fail)."""
        install_stop_handlers(self._stop)
        self._task = asyncio.create_task(self.server.serve(sockets=[self.sock]))
        while not self.server.started:
            if self._task.done():
                self._task.result()
                raise RuntimeError("the HTTP server stopped during start-up")
            await asyncio.sleep(0.01)

    async def until_stopped(self) -> None:
        """Return on SIGTERM/SIGINT, or when the HTTP server stops by itself."""
        stopper = asyncio.create_task(self._stop.wait())
        await asyncio.wait({stopper, self._task}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()

    async def shutdown(self) -> None:
        """Close the listener and let requests in flight finish within the grace period."""
        self.server.should_exit = True
        await self._task


def install_stop_handlers(stop: asyncio.Event) -> None:
    """SIGTERM/SIGINT set `stop`; a second signal is ignored (the drain is already under way)."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
