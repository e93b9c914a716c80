"""Tiny servers and clients that the network tests run inside the namespaces, as separate processes.

    python bench/netlab/tools.py echo  HOST PORT            # echo server; logs {"event": "listening", "port": ...}
    python bench/netlab/tools.py blast HOST PORT            # sends as many bytes as each client asks for
    python bench/netlab/tools.py fetch HOST PORT NBYTES     # times a download from blast
    python bench/netlab/tools.py client HOST PORT [--count N] [--size B]  # echo round trips
    python bench/netlab/tools.py http METHOD URL [--json BODY] [--header K:V]  # one HTTP request

Servers log one JSON line per event; clients print one JSON result line. Every client is bounded
by --timeout, and refuses targets other than loopback or an on-link test address (bench.relay's
check_target), so a mistake cannot send traffic off the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import struct
import sys
import time

if __package__ in (None, ""):  # run as a script: make `bench` importable from the repository root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from kvwire.bench.relay import check_target  # noqa: E402

CHUNK = 64 * 1024


def log(rec: dict) -> None:
    print(json.dumps(rec), flush=True)


async def _serve_until_signal(handler, host: str, port: int, kind: str) -> None:
    server = await asyncio.start_server(handler, host, port)
    log({"event": "listening", "kind": kind, "host": host, "port": server.sockets[0].getsockname()[1]})
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()
    log({"event": "stopped", "kind": kind})


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
        writer.write_eof()
        await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def _blast(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        (n,) = struct.unpack("!Q", await reader.readexactly(8))
        block = bytes(range(256)) * (CHUNK // 256)
        while n > 0:
            writer.write(block[: min(n, CHUNK)])
            n -= min(n, CHUNK)
            await writer.drain()
        writer.write_eof()
        await writer.drain()
        await reader.read()  # wait for the client's FIN: it has everything
    except (ConnectionError, OSError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


def _connect(host: str, port: int, timeout: float) -> socket.socket:
    check_target(host)
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def fetch(host: str, port: int, nbytes: int, timeout: float) -> dict:
    """Download nbytes from a blast server; bytes, seconds and MB/s (1e6 bytes)."""
    deadline = time.monotonic() + timeout
    t0 = time.monotonic()
    with _connect(host, port, timeout) as sock:
        sock.sendall(struct.pack("!Q", nbytes))
        got = 0
        while got < nbytes and time.monotonic() < deadline:
            data = sock.recv(CHUNK)
            if not data:
                break
            got += len(data)
    secs = time.monotonic() - t0
    return {"bytes": got, "seconds": round(secs, 4), "mb_per_s": round(got / secs / 1e6, 3)}


def client(host: str, port: int, count: int, size: int, timeout: float, seed: int) -> dict:
    """`count` echo round trips of `size` random bytes each: RTTs, whether the echo was intact, and
    how the connection ended if early (EOF or reset)."""
    rng = random.Random(seed)
    rtts, sent, received, first_diff, error = [], 0, 0, None, None
    deadline = time.monotonic() + timeout
    try:
        with _connect(host, port, timeout) as sock:
            for _ in range(count):
                if time.monotonic() > deadline:
                    error = "deadline"
                    break
                payload = rng.randbytes(size)
                t0 = time.monotonic()
                sock.sendall(payload)
                sent += size
                back = b""
                while len(back) < size:
                    data = sock.recv(size - len(back))
                    if not data:
                        break
                    back += data
                received += len(back)
                if first_diff is None and back != payload[: len(back)]:
                    first_diff = sent - size + next(i for i, (a, b) in enumerate(zip(back, payload)) if a != b)
                if len(back) < size:
                    error = "eof"
                    break
                rtts.append((time.monotonic() - t0) * 1000)
    except ConnectionResetError:
        error = "reset"
    except TimeoutError:
        error = "timeout"
    except OSError as e:
        error = f"oserror: {e}"
    return {
        "rtts_ms": [round(r, 3) for r in rtts],
        "sent": sent,
        "received": received,
        "intact": first_diff is None and error is None,
        "first_diff": first_diff,
        "error": error,
    }


def http(method: str, url: str, body: str | None, headers: list[str], timeout: float) -> dict:
    """One HTTP request (JSON body optional): status, seconds, and the response body (parsed if JSON)."""
    import urllib.error
    import urllib.parse
    import urllib.request

    check_target(urllib.parse.urlsplit(url).hostname or "")
    hdrs = dict(h.split(":", 1) for h in headers)
    data = None
    if body is not None:
        data = body.encode()
        hdrs.setdefault("Content-Type", "application/json")
    req = urllib.request.Request(url, data=data, method=method, headers={k.strip(): v.strip() for k, v in hdrs.items()})
    t0 = time.monotonic()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    except (urllib.error.URLError, OSError) as e:
        return {"status": None, "error": str(getattr(e, "reason", e)), "seconds": round(time.monotonic() - t0, 4)}
    try:
        parsed = json.loads(raw)
    except ValueError:
        parsed = raw.decode(errors="replace")
    return {"status": status, "body": parsed, "seconds": round(time.monotonic() - t0, 4)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tools.py")
    sub = p.add_subparsers(dest="cmd", required=True)
    for cmd in ("echo", "blast"):
        s = sub.add_parser(cmd)
        s.add_argument("host")
        s.add_argument("port", type=int)
    s = sub.add_parser("fetch")
    s.add_argument("host")
    s.add_argument("port", type=int)
    s.add_argument("nbytes", type=int)
    s.add_argument("--timeout", type=float, default=30.0)
    s = sub.add_parser("client")
    s.add_argument("host")
    s.add_argument("port", type=int)
    s.add_argument("--count", type=int, default=1)
    s.add_argument("--size", type=int, default=64)
    s.add_argument("--timeout", type=float, default=20.0)
    s.add_argument("--seed", type=int, default=0)
    s = sub.add_parser("http")
    s.add_argument("method")
    s.add_argument("url")
    s.add_argument("--json", dest="body", default=None, help="request body (sent as application/json)")
    s.add_argument("--header", action="append", default=[], help="K: V, repeatable")
    s.add_argument("--timeout", type=float, default=60.0)
    a = p.parse_args(argv)
    if a.cmd in ("echo", "blast"):
        asyncio.run(_serve_until_signal(_echo if a.cmd == "echo" else _blast, a.host, a.port, a.cmd))
    elif a.cmd == "fetch":
        log(fetch(a.host, a.port, a.nbytes, a.timeout))
    elif a.cmd == "http":
        log(http(a.method.upper(), a.url, a.body, a.header, a.timeout))
    else:
        log(client(a.host, a.port, a.count, a.size, a.timeout, a.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
