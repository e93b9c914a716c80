"""A transparent TCP relay that injects link faults: fixed delay, random stalls, resets and bit flips.

tc's `tbf` qdisc shapes bandwidth on these kernels, but netem is missing, so everything else a bad
link does comes from here. The relay forwards raw bytes (HTTP/1, HTTP/2 and so gRPC all pass
through unchanged) and, per connection and per direction, delays every chunk it reads by a fixed
time without capping throughput (a reader and a writer task joined by a queue of timestamped
chunks, so the delay is latency, not a per-chunk pause), stalls the stream now and then, resets the
connection with a TCP RST after N bytes, or flips bits. Randomness comes from one seeded RNG.

    python -m kvwire.bench.relay --listen 127.0.0.1:0 --target 127.0.0.1:5000 --delay-ms 50

prints one JSON line per event on stdout, the first being
`{"event": "listening", "host": ..., "port": ...}`, and stops cleanly on SIGTERM or SIGINT.

Directions: "up" is client -> target, "down" is target -> client.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import random
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

DIRECTIONS = ("up", "down")
READ_SIZE = 64 * 1024  # one chunk; the unit that delay, stall and flip-probability act on
QUEUE_CHUNKS = 256  # per direction: bounds buffered bytes to 16 MiB, ~130 ms of a 1 Gbit/s link


@dataclass
class RelayConfig:
    """Everything the relay does, validated on construction. Times in ms, sizes in bytes."""

    target_host: str
    target_port: int
    listen_host: str = "127.0.0.1"
    listen_port: int = 0
    delay_ms: float = 0.0  # added to every chunk, each way (so RTT grows by 2 x delay_ms)
    stall_prob: float = 0.0  # chance per chunk, either direction, of a stall before it is sent
    stall_max_ms: float = 0.0  # a stall lasts uniform(0, stall_max_ms)
    reset_after_bytes: int | None = None  # RST both sides once this many bytes were forwarded
    reset_direction: str = "both"  # which bytes count towards reset_after_bytes: up, down or both
    silence_after_bytes: int | None = None  # then forward and read nothing more that way; the connection stays open
    silence_direction: str = "down"
    flip_prob: float = 0.0  # chance per chunk of flipping one random bit in it
    flip_offset: int | None = None  # flip exactly one bit at this byte offset of the stream
    flip_marker: bytes | None = (
        None  # count flip_offset from the end of this byte string's flip_marker_count-th occurrence
    )
    flip_marker_count: int = 1
    flip_mask: int = 0x01  # the bit(s) flipped at flip_offset
    flip_direction: str = "down"
    faulty_connections: int | None = None  # resets and flips hit only the first N connections
    seed: int | None = None
    max_connections: int = 64  # further connections are accepted and closed at once
    idle_timeout_s: float = 300.0  # close a connection when neither direction moved for this long
    connect_timeout_s: float = 5.0
    allow_remote: bool = False  # see check_target(): off, only loopback and on-link targets

    def __post_init__(self) -> None:
        for name in ("delay_ms", "stall_max_ms"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("stall_prob", "flip_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.reset_after_bytes is not None and self.reset_after_bytes < 0:
            raise ValueError(f"reset_after_bytes must be >= 0, got {self.reset_after_bytes}")
        if self.flip_offset is not None and self.flip_offset < 0:
            raise ValueError(f"flip_offset must be >= 0, got {self.flip_offset}")
        if self.flip_marker is not None and not self.flip_marker:
            raise ValueError("flip_marker must not be empty")
        if self.flip_marker_count < 1:
            raise ValueError(f"flip_marker_count must be >= 1, got {self.flip_marker_count}")
        if not 1 <= self.flip_mask <= 0xFF:
            raise ValueError(f"flip_mask must be a byte mask in [1, 255], got {self.flip_mask}")
        if self.silence_after_bytes is not None and self.silence_after_bytes < 0:
            raise ValueError(f"silence_after_bytes must be >= 0, got {self.silence_after_bytes}")
        if self.silence_direction not in DIRECTIONS:
            raise ValueError(f"silence_direction must be up or down, got {self.silence_direction!r}")
        if self.reset_direction not in (*DIRECTIONS, "both"):
            raise ValueError(f"reset_direction must be up, down or both, got {self.reset_direction!r}")
        if self.flip_direction not in DIRECTIONS:
            raise ValueError(f"flip_direction must be up or down, got {self.flip_direction!r}")
        if self.max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {self.max_connections}")
        if self.idle_timeout_s <= 0 or self.connect_timeout_s <= 0:
            raise ValueError("idle_timeout_s and connect_timeout_s must be > 0")
        for name in ("listen_port", "target_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise ValueError(f"{name} must be a TCP port, got {getattr(self, name)}")


def _on_link_networks() -> list[ipaddress.IPv4Network]:
    """IPv4 networks routed without a gateway in this process's network namespace (/proc/net/route)."""
    nets = []
    try:
        with open("/proc/net/route") as f:
            rows = f.read().splitlines()[1:]
    except OSError:
        return nets
    for row in rows:
        cols = row.split()
        if len(cols) < 8 or int(cols[2], 16) != 0 or int(cols[1], 16) == 0:
            continue  # has a gateway, or is the default route
        dest = ipaddress.IPv4Address(struct.pack("<I", int(cols[1], 16)))
        mask = ipaddress.IPv4Address(struct.pack("<I", int(cols[7], 16)))
        nets.append(ipaddress.IPv4Network(f"{dest}/{mask}", strict=False))
    return nets


def check_target(host: str, allow_remote: bool = False) -> None:
    """Refuse targets other than loopback or a private address on a directly attached link.

    Test and benchmark traffic must stay on this machine: loopback, or the veth of a network
    namespace the harness made (inside such a namespace its /30 is on-link and there is no default
    route). The same private address seen from the root namespace would leave through the default
    gateway, so it is refused there. `allow_remote` lifts the check for relays between real hosts.
    """
    if allow_remote:
        return
    try:
        addrs = {ai[4][0] for ai in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)}
    except socket.gaierror as e:
        raise ValueError(f"cannot resolve relay target {host!r}: {e}") from None
    on_link = _on_link_networks()
    for a in addrs:
        ip = ipaddress.ip_address(a.split("%")[0])
        if ip.is_loopback:
            continue
        if ip.version == 4 and ip.is_private and not ip.is_link_local and any(ip in n for n in on_link):
            continue
        raise ValueError(
            f"target {host} ({ip}) is neither loopback nor on a directly attached private "
            "link of this network namespace; pass allow_remote / --allow-remote for real hosts"
        )


@dataclass
class RelayStats:
    """Counters over the relay's life; read them after a run (tests, benchmarks)."""

    accepted: int = 0
    refused: int = 0  # over max_connections
    closed: int = 0
    resets: int = 0
    silences: int = 0
    flips: int = 0
    stalls: int = 0
    stall_ms_total: float = 0.0
    idle_closed: int = 0
    bytes_up: int = 0
    bytes_down: int = 0


@dataclass
class _Conn:
    cid: int
    faulty: bool
    client_w: asyncio.StreamWriter
    target_w: asyncio.StreamWriter
    last_activity: float = field(default_factory=time.monotonic)
    forwarded: dict = field(default_factory=lambda: {"up": 0, "down": 0})
    read_offset: dict = field(default_factory=lambda: {"up": 0, "down": 0})
    reset: bool = False
    close_reason: str = ""
    silent: set = field(default_factory=set)  # directions that went silent (silence_after_bytes)
    ended: set = field(default_factory=set)  # directions whose pipe has finished
    marker_tail: bytes = b""  # the last len(flip_marker) - 1 bytes read, for a marker split across chunks
    markers_seen: int = 0
    flip_at: int | None = None  # stream offset of the marker-relative flip, once the marker was seen


def _rst(writer: asyncio.StreamWriter) -> None:
    """Close with SO_LINGER 0 so the kernel sends RST instead of FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()


class Relay:
    """The relay as an object: `await start()` binds and returns the port, `await stop()` ends it."""

    def __init__(self, cfg: RelayConfig, log: Callable[[dict], None] | None = None):
        self.cfg = cfg
        self.stats = RelayStats()
        self._log = log or (lambda rec: None)
        self._rng = random.Random(cfg.seed)
        self._server: asyncio.base_events.Server | None = None
        self._conns: dict[int, _Conn] = {}
        self._tasks: set[asyncio.Task] = set()
        self._next_id = 0
        self.port: int | None = None

    async def start(self) -> int:
        """Check the target, bind the listener, log `listening` and return the bound port."""
        check_target(self.cfg.target_host, self.cfg.allow_remote)
        self._server = await asyncio.start_server(self._accept, self.cfg.listen_host, self.cfg.listen_port)
        self.port = self._server.sockets[0].getsockname()[1]
        self._log(
            {
                "event": "listening",
                "host": self.cfg.listen_host,
                "port": self.port,
                "target": f"{self.cfg.target_host}:{self.cfg.target_port}",
            }
        )
        return self.port

    async def stop(self) -> None:
        """Stop accepting, close every open connection (FIN, not RST) and wait for their tasks."""
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns.values()):
            conn.close_reason = conn.close_reason or "relay stopped"
            for w in (conn.client_w, conn.target_w):
                w.close()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
        if self._server is not None:
            await self._server.wait_closed()
        self._log({"event": "stopped", **asdict(self.stats)})

    async def __aenter__(self) -> Relay:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        try:
            await self._serve(client_r, client_w)
        finally:
            self._tasks.discard(task)

    async def _serve(self, client_r, client_w) -> None:
        cfg = self.cfg
        if len(self._conns) >= cfg.max_connections:
            self.stats.refused += 1
            self._log({"event": "refused", "reason": f"max_connections={cfg.max_connections} reached"})
            client_w.close()
            return
        cid = self._next_id
        self._next_id += 1
        try:
            target_r, target_w = await asyncio.wait_for(
                asyncio.open_connection(cfg.target_host, cfg.target_port), cfg.connect_timeout_s
            )
        except (TimeoutError, OSError) as e:
            self._log({"event": "connect_failed", "conn": cid, "error": repr(e)})
            _rst(client_w)
            return
        for w in (client_w, target_w):
            sock = w.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # relay adds no Nagle delay
        faulty = cfg.faulty_connections is None or cid < cfg.faulty_connections
        conn = _Conn(cid, faulty, client_w, target_w)
        self._conns[cid] = conn
        self.stats.accepted += 1
        self._log({"event": "open", "conn": cid, "peer": str(client_w.get_extra_info("peername")), "faulty": faulty})
        pipes = [
            asyncio.create_task(self._pipe(conn, "up", client_r, target_w)),
            asyncio.create_task(self._pipe(conn, "down", target_r, client_w)),
        ]
        watchdog = asyncio.create_task(self._watchdog(conn))
        try:
            await asyncio.gather(*pipes, return_exceptions=True)
        finally:
            watchdog.cancel()
            for p in pipes:
                p.cancel()
            if not conn.reset:
                for w in (client_w, target_w):
                    w.close()
            del self._conns[cid]
            self.stats.closed += 1
            self._log(
                {
                    "event": "close",
                    "conn": cid,
                    "up": conn.forwarded["up"],
                    "down": conn.forwarded["down"],
                    "reason": conn.close_reason or "eof",
                }
            )

    async def _watchdog(self, conn: _Conn) -> None:
        tick = min(1.0, self.cfg.idle_timeout_s / 4)
        while True:
            await asyncio.sleep(tick)
            if time.monotonic() - conn.last_activity > self.cfg.idle_timeout_s:
                self.stats.idle_closed += 1
                conn.close_reason = f"idle {self.cfg.idle_timeout_s}s"
                for w in (conn.client_w, conn.target_w):
                    w.close()
                return

    def _maybe_flip(self, conn: _Conn, direction: str, data: bytes) -> bytes:
        if not conn.faulty or direction != self.cfg.flip_direction:
            return data
        start = conn.read_offset[direction]
        buf = None
        k = self._marker_flip_offset(conn, start, data) if self.cfg.flip_marker else self.cfg.flip_offset
        if k is not None and start <= k < start + len(data):
            buf = bytearray(data)
            buf[k - start] ^= self.cfg.flip_mask
            self.stats.flips += 1
            self._log({"event": "flip", "conn": conn.cid, "direction": direction, "offset": k})
        if self.cfg.flip_prob and self._rng.random() < self.cfg.flip_prob:
            buf = buf if buf is not None else bytearray(data)
            i = self._rng.randrange(len(buf))
            buf[i] ^= 1 << self._rng.randrange(8)
            self.stats.flips += 1
            self._log({"event": "flip", "conn": conn.cid, "direction": direction, "offset": start + i})
        return bytes(buf) if buf is not None else data

    def _marker_flip_offset(self, conn: _Conn, start: int, data: bytes) -> int | None:
        """The stream offset flip_offset bytes past the end of the flip_marker_count-th occurrence of
        flip_marker, or None while it has not been read yet. Lets a test hit a byte inside an
        application frame (e.g. a KVWire frame body) whatever protocol bytes precede it."""
        cfg = self.cfg
        if conn.flip_at is None:
            window, base = conn.marker_tail + data, start - len(conn.marker_tail)
            i = window.find(cfg.flip_marker)
            while i >= 0 and conn.flip_at is None:
                conn.markers_seen += 1
                if conn.markers_seen == cfg.flip_marker_count:
                    conn.flip_at = base + i + len(cfg.flip_marker) + (cfg.flip_offset or 0)
                i = window.find(cfg.flip_marker, i + 1)
            conn.marker_tail = window[max(0, len(window) - len(cfg.flip_marker) + 1) :]
        return conn.flip_at

    def _reset_budget(self, conn: _Conn, direction: str) -> int | None:
        """Bytes this direction may still forward before the reset, or None for no limit."""
        cfg = self.cfg
        if cfg.reset_after_bytes is None or not conn.faulty:
            return None
        if cfg.reset_direction == "both":
            return cfg.reset_after_bytes - conn.forwarded["up"] - conn.forwarded["down"]
        if cfg.reset_direction == direction:
            return cfg.reset_after_bytes - conn.forwarded[direction]
        return None

    def _silence_budget(self, conn: _Conn, direction: str) -> int | None:
        """Bytes this direction may still forward before it goes silent, or None for no limit."""
        cfg = self.cfg
        if cfg.silence_after_bytes is None or not conn.faulty or direction != cfg.silence_direction:
            return None
        return cfg.silence_after_bytes - conn.forwarded[direction]

    async def _go_silent(self, conn: _Conn, direction: str) -> None:
        """Forward nothing more in this direction, as on a link that dropped everything, until the
        connection ends some other way: a reset, the other direction's end (its source closed), the idle timeout."""
        other = DIRECTIONS[1 - DIRECTIONS.index(direction)]
        conn.silent.add(direction)
        self.stats.silences += 1
        self._log({"event": "silence", "conn": conn.cid, "direction": direction, "after": conn.forwarded[direction]})
        while not (conn.reset or other in conn.ended or conn.client_w.is_closing() or conn.target_w.is_closing()):
            await asyncio.sleep(0.05)

    async def _pipe(
        self, conn: _Conn, direction: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Read chunks, stamp each with its due time, and let a writer send them in order when due."""
        queue: asyncio.Queue = asyncio.Queue(QUEUE_CHUNKS)
        delay = self.cfg.delay_ms / 1000.0

        async def read_side() -> None:
            try:
                while True:
                    if direction in conn.silent:  # leave the bytes unread: the sender's buffers fill and it blocks
                        await asyncio.Event().wait()  # until the connection ends and this task is cancelled
                    data = await reader.read(READ_SIZE)
                    if not data:
                        break
                    conn.last_activity = time.monotonic()
                    data = self._maybe_flip(conn, direction, data)
                    conn.read_offset[direction] += len(data)
                    stall = 0.0
                    if self.cfg.stall_prob and self._rng.random() < self.cfg.stall_prob:
                        stall = self._rng.uniform(0.0, self.cfg.stall_max_ms) / 1000.0
                    await queue.put((time.monotonic() + delay, stall, data))
                end = None
            except ConnectionResetError:
                end = "rst"
            except OSError:
                end = None
            await queue.put(end)

        reader_task = asyncio.create_task(read_side())
        try:
            while True:
                item = await queue.get()
                if item is None:
                    if not conn.reset and writer.can_write_eof():
                        writer.write_eof()  # half-close: pass the peer's FIN on
                    return
                if item == "rst":  # the source side was reset: pass the reset on, not a FIN
                    conn.close_reason = conn.close_reason or f"{direction} source reset"
                    conn.reset = True
                    _rst(conn.client_w)
                    _rst(conn.target_w)
                    return
                due, stall, data = item
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                if stall:  # after the delay: a stall holds this chunk and all behind it
                    self.stats.stalls += 1
                    self.stats.stall_ms_total += stall * 1000
                    await asyncio.sleep(stall)
                if conn.reset:
                    return
                budget = self._reset_budget(conn, direction)
                if budget is not None and len(data) >= budget:
                    await self._forward_head(conn, direction, writer, data, budget)
                    self._do_reset(conn)
                    return
                budget = self._silence_budget(conn, direction)
                if budget is not None and len(data) >= budget:
                    await self._forward_head(conn, direction, writer, data, budget)
                    await self._go_silent(conn, direction)
                    return
                writer.write(data)
                self._count(conn, direction, len(data))  # before drain: the other direction sees it at once
                await writer.drain()
        except (ConnectionError, OSError):
            conn.close_reason = conn.close_reason or f"{direction} write failed"
            for w in (conn.client_w, conn.target_w):
                w.close()
        finally:
            conn.ended.add(direction)
            reader_task.cancel()

    async def _forward_head(
        self, conn: _Conn, direction: str, writer: asyncio.StreamWriter, data: bytes, budget: int
    ) -> None:
        """Forward the first `budget` bytes of data: what a direction may still send before a fault."""
        if budget > 0:
            writer.write(data[:budget])
            self._count(conn, direction, budget)
            await writer.drain()

    def _count(self, conn: _Conn, direction: str, n: int) -> None:
        conn.forwarded[direction] += n
        conn.last_activity = time.monotonic()
        if direction == "up":
            self.stats.bytes_up += n
        else:
            self.stats.bytes_down += n

    def _do_reset(self, conn: _Conn) -> None:
        if conn.reset:
            return
        conn.reset = True
        conn.close_reason = f"reset after {self.cfg.reset_after_bytes} bytes"
        self.stats.resets += 1
        self._log({"event": "reset", "conn": conn.cid, "up": conn.forwarded["up"], "down": conn.forwarded["down"]})
        _rst(conn.client_w)
        _rst(conn.target_w)


def _hostport(s: str) -> tuple[str, int]:
    host, sep, port = s.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {s!r}")
    return host.strip("[]"), int(port)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m kvwire.bench.relay", description=__doc__.split("\n\n")[0])
    p.add_argument("--listen", type=_hostport, default=("127.0.0.1", 0), help="HOST:PORT to bind (port 0: any)")
    p.add_argument("--target", type=_hostport, required=True, help="HOST:PORT to forward to")
    p.add_argument("--delay-ms", type=float, default=0.0, help="added latency per chunk, each way")
    p.add_argument("--stall-prob", type=float, default=0.0, help="chance per chunk of a stall")
    p.add_argument("--stall-max-ms", type=float, default=0.0, help="longest stall")
    p.add_argument("--reset-after-bytes", type=int, default=None, help="RST a connection after this many bytes")
    p.add_argument("--reset-direction", choices=(*DIRECTIONS, "both"), default="both")
    p.add_argument(
        "--silence-after-bytes",
        type=int,
        default=None,
        help="forward and read nothing more in --silence-direction after this many bytes",
    )
    p.add_argument("--silence-direction", choices=DIRECTIONS, default="down")
    p.add_argument("--flip-prob", type=float, default=0.0, help="chance per chunk of flipping one bit")
    p.add_argument("--flip-offset", type=int, default=None, help="flip a bit at this stream offset")
    p.add_argument("--flip-mask", type=lambda s: int(s, 0), default=0x01)
    p.add_argument(
        "--flip-marker",
        type=lambda s: s.encode(),
        default=None,
        help="count --flip-offset from the end of this string's occurrence in the stream",
    )
    p.add_argument("--flip-marker-count", type=int, default=1, help="which occurrence of --flip-marker (1: the first)")
    p.add_argument("--flip-direction", choices=DIRECTIONS, default="down")
    p.add_argument("--faulty-connections", type=int, default=None, help="faults only on the first N connections")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--max-connections", type=int, default=64)
    p.add_argument("--idle-timeout-s", type=float, default=300.0)
    p.add_argument("--connect-timeout-s", type=float, default=5.0)
    p.add_argument("--allow-remote", action="store_true", help="allow targets off this machine (real hosts)")
    return p


def config_from_args(argv: list[str] | None = None) -> RelayConfig:
    a = build_parser().parse_args(argv)
    return RelayConfig(
        listen_host=a.listen[0],
        listen_port=a.listen[1],
        target_host=a.target[0],
        target_port=a.target[1],
        delay_ms=a.delay_ms,
        stall_prob=a.stall_prob,
        stall_max_ms=a.stall_max_ms,
        reset_after_bytes=a.reset_after_bytes,
        reset_direction=a.reset_direction,
        silence_after_bytes=a.silence_after_bytes,
        silence_direction=a.silence_direction,
        flip_prob=a.flip_prob,
        flip_offset=a.flip_offset,
        flip_mask=a.flip_mask,
        flip_direction=a.flip_direction,
        flip_marker=a.flip_marker,
        flip_marker_count=a.flip_marker_count,
        faulty_connections=a.faulty_connections,
        seed=a.seed,
        max_connections=a.max_connections,
        idle_timeout_s=a.idle_timeout_s,
        connect_timeout_s=a.connect_timeout_s,
        allow_remote=a.allow_remote,
    )


def _print_json(rec: dict) -> None:
    print(json.dumps({"ts": round(time.time(), 3), "component": "relay", **rec}), flush=True)


async def serve(cfg: RelayConfig, log: Callable[[dict], None] = _print_json) -> RelayStats:
    """Run a relay until SIGTERM or SIGINT; return its counters."""
    relay = Relay(cfg, log)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await relay.start()
    await stop.wait()
    await relay.stop()
    return relay.stats


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = config_from_args(argv)
        asyncio.run(serve(cfg))
    except ValueError as e:
        _print_json({"event": "error", "error": str(e)})
        print(f"relay: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. the listen address is taken
        _print_json({"event": "error", "error": str(e)})
        print(f"relay: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
