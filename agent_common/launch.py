"""Start a daemon as a child process and learn its ports from its `listening` log line.

Used by the end-to-end tests and by `python -m kvwire.bench.loopback_demo` (`make run`); operators use
systemd instead (deploy/).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time


class Daemon:
    """A child daemon whose JSON log lines (stderr) are collected as they arrive."""

    def __init__(self, name: str, module: str, args: list[str], env: dict[str, str] | None = None):
        self.name = name
        self.lines: list[str] = []
        self.records: list[dict] = []
        self._listening = threading.Event()
        self.listening: dict = {}
        self._terminated = False
        full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=full_env,
        )
        self._reader = threading.Thread(target=self._read, name=f"{name}-log", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            line = line.rstrip("\n")
            self.lines.append(line)
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                self.records.append(record)
                if record.get("event") == "listening":
                    self.listening = record
                    self._listening.set()

    def wait_listening(self, timeout: float = 600.0) -> dict:
        """The `listening` record (with grpc_port/http_port); RuntimeError with the log tail if it never comes."""
        deadline = time.monotonic() + timeout
        while not self._listening.wait(0.1):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self._reader.join(1)
                what = (
                    f"exited with {self.proc.returncode}"
                    if self.proc.poll() is not None
                    else f"not listening after {timeout:.0f} s"
                )
                raise RuntimeError(f"{self.name} {what}; last log lines:\n" + "\n".join(self.lines[-20:]))
        return self.listening

    @property
    def http_url(self) -> str:
        return f"http://{self.listening.get('host', '127.0.0.1')}:{self.listening['http_port']}"

    @property
    def grpc_address(self) -> str:
        return f"{self.listening.get('host', '127.0.0.1')}:{self.listening['grpc_port']}"

    def events(self, event: str) -> list[dict]:
        return [r for r in self.records if r.get("event") == event]

    def wait_events(self, event: str, timeout: float = 300.0, **fields) -> list[dict]:
        """The `event` records whose fields match, once there is at least one: the log is read on a
        thread of its own, so a record the daemon wrote before answering may be read after the answer.
        RuntimeError with the log tail if none comes within `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            found = [r for r in self.events(event) if all(r.get(k) == v for k, v in fields.items())]
            if found:
                return found
            if time.monotonic() > deadline or (self.proc.poll() is not None and not self._reader.is_alive()):
                raise RuntimeError(
                    f"{self.name} logged no {event} {fields}; last log lines:\n" + "\n".join(self.lines[-20:])
                )
            time.sleep(0.02)

    def terminate(self) -> None:
        """Send SIGTERM once (the daemon drains and exits; a second signal during its exit would kill it)."""
        if self.proc.poll() is None and not self._terminated:
            self._terminated = True
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, wait for the graceful drain, SIGKILL if it overruns; returns the exit code."""
        if self.proc.poll() is None:
            self.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5)
        return self.proc.returncode
