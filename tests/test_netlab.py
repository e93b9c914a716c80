"""The network test harness (bench/netlab) and the fault-injecting relay (bench/relay.py), proven with
small servers of our own: namespaces appear and vanish, traffic crosses the veth and only the veth,
tbf really limits throughput, and the relay delays, stalls, resets and flips bits as configured.

Namespace tests need root and iproute2 and skip otherwise; the relay tests run on loopback anywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvwire.bench.netlab import LinkSpec, NetLab, netlab_fixture, sweep_stale
from kvwire.bench.netlab.daemons import TOOLS
from kvwire.bench.netlab.namespaces import NetlabUnavailable, check_available, list_namespaces, rate_bits
from kvwire.bench.netlab.tools import client as echo_client
from kvwire.bench.relay import Relay, RelayConfig, check_target, config_from_args

SHAPED = "8mbit"  # 1 MB/s: a 1.5 MB download takes ~1.5 s, long enough to measure, short enough for CI
RELAY_DELAY_MS = 50

lab = netlab_fixture(LinkSpec(rate=SHAPED), scope="module", name="lab")


def _needs_netlab() -> None:
    try:
        check_available()
    except NetlabUnavailable as e:
        pytest.skip(f"netlab: {e}")


def _alive(pid: int) -> bool:
    """True if pid runs and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _root_links() -> str:
    return subprocess.run(
        ["ip", "-o", "link", "show"], capture_output=True, text=True, env={"PATH": "/usr/sbin:/sbin:/usr/bin:/bin"}
    ).stdout


@pytest.fixture(scope="module")
def edge_servers(lab):
    """An echo server and a blast server on the edge's veth address; their ports."""
    echo = lab.edge.spawn([sys.executable, TOOLS, "echo", lab.edge.addr, "0"], name="echo")
    blast = lab.edge.spawn([sys.executable, TOOLS, "blast", lab.edge.addr, "0"], name="blast")
    return {"echo": echo.wait_json("listening")["port"], "blast": blast.wait_json("listening")["port"]}


def _cloud_json(lab, args: list[str], timeout: float = 30) -> dict:
    import json

    r = lab.cloud.python([TOOLS, *args], timeout=timeout)
    return json.loads(r.stdout.strip().splitlines()[-1])


# --- the harness: lifecycle -----------------------------------------------------------------------


def test_lab_is_created_and_removed_without_leftovers():
    _needs_netlab()
    with NetLab(LinkSpec(rate=SHAPED)) as lab:
        names = (lab.edge.name, lab.cloud.name)
        assert set(names) <= set(list_namespaces())
        for ns in lab.namespaces:
            assert f"{ns.addr}/30" in ns.run(["ip", "-o", "-4", "addr", "show", "dev", ns.veth]).stdout
            assert "UP" in ns.run(["ip", "-o", "link", "show", "lo"]).stdout
            assert "tbf" in lab.qdisc(ns) and "8Mbit" in lab.qdisc(ns)
            assert "default" not in ns.run(["ip", "route"]).stdout  # nothing can leave the pair
        # The veth ends never exist in the root namespace, and neither do the test addresses.
        assert lab.edge.veth not in _root_links() and lab.cloud.veth not in _root_links()
        # A process that escapes its process group is still found through the namespace.
        sh = lab.edge.spawn(
            ["sh", "-c", 'setsid sleep 60 & echo "{\\"event\\": \\"child\\", \\"pid\\": $!}"; sleep 60']
        )
        escaped = sh.wait_json("child")["pid"]
        plain = lab.cloud.spawn(["sleep", "60"])
        workdir = lab.workdir
        assert _alive(escaped) and _alive(plain.pid)
    assert not set(names) & set(list_namespaces())
    assert not _alive(escaped) and not _alive(plain.pid) and not _alive(sh.pid)
    assert lab.edge.veth not in _root_links()
    assert not workdir.exists()


def test_lab_is_removed_when_the_test_body_fails():
    _needs_netlab()
    with pytest.raises(ZeroDivisionError):
        with NetLab() as lab:
            proc = lab.cloud.spawn(["sleep", "60"])
            raise ZeroDivisionError("a failure inside the lab")
    assert lab.edge.name not in list_namespaces() and lab.cloud.name not in list_namespaces()
    assert not _alive(proc.pid)


def test_lab_is_removed_when_the_run_gets_sigterm(tmp_path):
    _needs_netlab()
    script = tmp_path / "hold.py"
    script.write_text(
        "import json, sys, time\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})\n"
        "from bench.netlab import NetLab\n"
        "try:\n"
        "    with NetLab() as lab:\n"
        "        p = lab.edge.spawn(['sleep', '60'])\n"
        "        print(json.dumps({'names': [lab.edge.name, lab.cloud.name], 'pid': p.pid}), flush=True)\n"
        "        time.sleep(60)\n"
        "except KeyboardInterrupt:\n"
        "    sys.exit(143)\n"
    )
    holder = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        import json

        info = json.loads(holder.stdout.readline())
        assert set(info["names"]) <= set(list_namespaces())
        holder.send_signal(signal.SIGTERM)
        assert holder.wait(15) == 143  # it left through the teardown, not by the signal's default action
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    assert not set(info["names"]) & set(list_namespaces())
    assert not _alive(info["pid"])


def test_sweep_removes_only_labs_whose_creator_is_gone(lab):
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = f"kvw-edge-{dead.pid:06x}beef"
    subprocess.run(["ip", "netns", "add", stale], check=True, env={"PATH": "/usr/sbin:/sbin:/usr/bin:/bin"})
    try:
        sweep_stale()  # (a parallel run's sweep may get there first: check the outcome, not the return)
        assert stale not in list_namespaces()
        assert lab.edge.name in list_namespaces()  # ours: creator (this process) alive
    finally:
        subprocess.run(
            ["ip", "netns", "del", stale], capture_output=True, env={"PATH": "/usr/sbin:/sbin:/usr/bin:/bin"}
        )


# --- the harness: traffic ---------------------------------------------------------------------------


def test_traffic_crosses_the_veth_and_namespaces_are_isolated(lab, edge_servers):
    res = _cloud_json(lab, ["client", lab.edge.addr, str(edge_servers["echo"]), "--count", "5", "--size", "1000"])
    assert res["intact"] and len(res["rtts_ms"]) == 5, res
    # The edge's server is not on the cloud's loopback: each namespace has its own stack.
    res = _cloud_json(lab, ["client", "127.0.0.1", str(edge_servers["echo"])])
    assert not res["intact"] and "refused" in res["error"], res


def test_http_server_in_the_edge_namespace_answers_the_cloud(lab):
    # A fixed port is fine: each namespace has its own port space, so parallel runs cannot collide.
    srv = lab.edge.spawn(
        [sys.executable, "-m", "http.server", "--bind", lab.edge.addr, "8000"],
        name="http.server",
        cwd=Path(__file__).resolve().parents[1],
    )
    srv.wait_text("Serving HTTP on")
    res = _cloud_json(lab, ["http", "GET", f"http://{lab.edge.addr}:8000/README.md"])
    assert res["status"] == 200 and res["body"].startswith("# KVWire"), res
    srv.terminate()


def test_tbf_shaping_limits_throughput(lab, edge_servers):
    shaped_mb_s = rate_bits(SHAPED) / 8 / 1e6
    shaped = _cloud_json(lab, ["fetch", lab.edge.addr, str(edge_servers["blast"]), "1500000"])
    try:
        lab.shape(None)
        free = _cloud_json(lab, ["fetch", lab.edge.addr, str(edge_servers["blast"]), "20000000"])
    finally:
        lab.shape(SHAPED)
    print(f"\nveth throughput: shaped {SHAPED} -> {shaped['mb_per_s']} MB/s, unshaped {free['mb_per_s']} MB/s")
    assert shaped["bytes"] == 1_500_000 and free["bytes"] == 20_000_000
    assert shaped["mb_per_s"] < 2 * shaped_mb_s, shaped
    assert shaped["mb_per_s"] > 0.25 * shaped_mb_s, shaped  # shaped, not broken
    assert free["mb_per_s"] > 2 * shaped["mb_per_s"], (shaped, free)  # the limit is tbf's doing


def test_relay_cli_in_the_cloud_namespace_delays_and_stops_on_sigterm(lab, edge_servers):
    relay = lab.cloud.spawn(
        [
            sys.executable,
            "-m",
            "kvwire.bench.relay",
            "--listen",
            "127.0.0.1:0",
            "--target",
            f"{lab.edge.addr}:{edge_servers['echo']}",
            "--delay-ms",
            str(RELAY_DELAY_MS),
        ],
        name="relay",
    )
    port = relay.wait_json("listening")["port"]
    direct = _cloud_json(lab, ["client", lab.edge.addr, str(edge_servers["echo"]), "--count", "5"])
    relayed = _cloud_json(lab, ["client", "127.0.0.1", str(port), "--count", "5"])
    print(
        f"\nRTT across the veth: direct min {min(direct['rtts_ms'])} ms, via relay ({RELAY_DELAY_MS} ms each way) "
        f"min {min(relayed['rtts_ms'])} ms, max {max(relayed['rtts_ms'])} ms"
    )
    assert relayed["intact"] and len(relayed["rtts_ms"]) == 5, relayed
    assert min(relayed["rtts_ms"]) >= 2 * RELAY_DELAY_MS * 0.99
    assert relay.terminate(timeout=30) == 0
    stopped = relay.wait_json("stopped", timeout=1)
    assert stopped["accepted"] == 1 and stopped["closed"] == 1


# --- the relay, on loopback -------------------------------------------------------------------------


def _run(coro, timeout: float = 20):
    return asyncio.run(asyncio.wait_for(coro, timeout))


@contextlib.asynccontextmanager
async def _echo_server():
    async def handle(reader, writer):
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.write_eof()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


async def _exchange(port: int, payload: bytes, timeout: float = 10) -> tuple[bytes, str | None]:
    """Send payload, half-close, read until EOF: what came back and how it ended (None, 'reset')."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    back, error = b"", None
    try:

        async def send():
            writer.write(payload)
            await writer.drain()
            writer.write_eof()

        sender = asyncio.create_task(send())
        async with asyncio.timeout(timeout):
            while data := await reader.read(65536):
                back += data
        await sender
    except ConnectionResetError:
        error = "reset"
    except BrokenPipeError:
        error = "reset"
    finally:
        writer.close()
    return back, error


def _relayed(fn, timeout: float = 20, **cfg):
    """Run fn(relay) against a relay (configured by cfg) in front of an echo server."""

    async def body():
        async with _echo_server() as echo_port:
            async with Relay(RelayConfig(target_host="127.0.0.1", target_port=echo_port, **cfg)) as relay:
                return await fn(relay)

    return _run(body(), timeout)


def test_relay_delay_adds_latency_without_capping_throughput():
    async def fn(relay):
        rtt = await asyncio.to_thread(echo_client, "127.0.0.1", relay.port, 5, 64, 10, 0)
        t0 = time.monotonic()
        payload = os.urandom(4 * 1024 * 1024)
        back, error = await _exchange(relay.port, payload)
        return rtt, time.monotonic() - t0, back == payload and error is None

    rtt, bulk_s, intact = _relayed(fn, delay_ms=40)
    print(f"\nrelay 40 ms each way: RTT min {min(rtt['rtts_ms'])} ms; 4 MiB echoed in {bulk_s:.2f} s")
    assert rtt["intact"] and min(rtt["rtts_ms"]) >= 80 * 0.99
    assert intact
    # 64 KiB chunks delayed one after another cannot take less than 64 x 2 x 40 ms = 5.12 s (sleeps never end
    # early), whatever the host; the pipelined delay takes ~0.1-0.3 s (printed). The bound is that floor, not
    # a guess at this host's speed.
    assert bulk_s < (4 * 1024 * 1024 // (64 * 1024)) * 2 * 0.040


def test_relay_resets_the_connection_after_n_bytes():
    async def fn(relay):
        payload = os.urandom(200_000)
        back, error = await _exchange(relay.port, payload)
        return payload, back, error, relay.stats

    payload, back, error, stats = _relayed(fn, reset_after_bytes=10_000, reset_direction="down")
    assert error == "reset" or len(back) < len(payload)
    assert len(back) <= 10_000 and back == payload[: len(back)]
    assert stats.resets == 1 and stats.bytes_down == 10_000


def test_relay_resets_only_the_first_connections_when_told():
    async def fn(relay):
        payload = os.urandom(50_000)
        first = await _exchange(relay.port, payload)
        second = await _exchange(relay.port, payload)
        return payload, first, second

    payload, (back1, _), (back2, err2) = _relayed(fn, reset_after_bytes=1000, faulty_connections=1)
    assert len(back1) <= 1000
    assert back2 == payload and err2 is None


@pytest.mark.parametrize("direction", ["down", "up"])
def test_relay_flips_one_bit_at_an_offset(direction):
    async def fn(relay):
        payload = os.urandom(300_000)
        back, error = await _exchange(relay.port, payload)
        return payload, back, error

    payload, back, error = _relayed(fn, flip_offset=150_000, flip_mask=0x10, flip_direction=direction)
    assert error is None and len(back) == len(payload)
    diffs = [i for i, (a, b) in enumerate(zip(payload, back)) if a != b]
    assert diffs == [150_000] and back[150_000] == payload[150_000] ^ 0x10


def test_relay_flips_random_bits_reproducibly_with_a_seed():
    async def bulk(relay):
        back, error = await _exchange(relay.port, bytes(200_000))
        return back, error, relay.stats.flips

    back, error, flips = _relayed(bulk, flip_prob=1.0, seed=7)
    assert error is None and len(back) == 200_000
    assert flips >= 1 and sum(bin(b).count("1") for b in back) == flips  # exactly one bit per flip

    async def small(relay):  # each 64-byte echo is one chunk, so the seed fixes where the flips land
        return await asyncio.to_thread(echo_client, "127.0.0.1", relay.port, 3, 64, 10, 0)

    runs = [_relayed(small, flip_prob=1.0, seed=7) for _ in range(2)]
    assert runs[0]["first_diff"] is not None and runs[0]["first_diff"] == runs[1]["first_diff"]


def test_relay_stalls_hold_the_stream():
    async def fn(relay):
        rtt = await asyncio.to_thread(echo_client, "127.0.0.1", relay.port, 5, 64, 10, 0)
        return rtt, relay.stats

    rtt, stats = _relayed(fn, stall_prob=1.0, stall_max_ms=60, seed=3)
    assert rtt["intact"] and stats.stalls == 10  # one per chunk, each way
    assert sum(rtt["rtts_ms"]) >= stats.stall_ms_total * 0.99 > 0


def test_relay_refuses_connections_over_its_limit():
    async def fn(relay):
        r1, w1 = await asyncio.open_connection("127.0.0.1", relay.port)
        w1.write(b"ping")
        assert await r1.readexactly(4) == b"ping"
        r2, w2 = await asyncio.open_connection("127.0.0.1", relay.port)
        second = await asyncio.wait_for(r2.read(), 5)  # closed by the relay
        w1.close()
        w2.close()
        return second, relay.stats.refused

    second, refused = _relayed(fn, max_connections=1)
    assert second == b"" and refused == 1


def test_relay_closes_idle_connections():
    async def fn(relay):
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
        writer.write(b"ping")
        await reader.readexactly(4)
        t0 = time.monotonic()
        rest = await asyncio.wait_for(reader.read(), 30)  # a safety bound: the idle close comes
        writer.close()
        return rest, time.monotonic() - t0, relay.stats.idle_closed

    rest, waited, idle_closed = _relayed(fn, idle_timeout_s=0.3)
    # closed for being idle (the relay counts it), and not before the idle timeout; how soon after it is
    # the watchdog's and the host's business, not asserted
    assert rest == b"" and idle_closed == 1 and waited > 0.25


def test_relay_carries_grpc():
    grpc = pytest.importorskip("grpc")
    health = pytest.importorskip("grpc_health.v1.health")
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    server = grpc.server(__import__("concurrent.futures").futures.ThreadPoolExecutor(2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    grpc_port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:

        async def body():
            async with Relay(RelayConfig(target_host="127.0.0.1", target_port=grpc_port, delay_ms=20)) as relay:

                def call():
                    with grpc.insecure_channel(f"127.0.0.1:{relay.port}") as channel:
                        stub = health_pb2_grpc.HealthStub(channel)
                        t0 = time.monotonic()
                        reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
                        return reply, time.monotonic() - t0

                return await asyncio.to_thread(call)

        reply, secs = _run(body())
    finally:
        server.stop(0)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert secs >= 0.04 * 0.99  # at least one round trip through 20 ms each way


@pytest.mark.parametrize(
    "bad, field",
    [
        ({"delay_ms": -1}, "delay_ms"),
        ({"stall_prob": 1.5}, "stall_prob"),
        ({"flip_prob": -0.1}, "flip_prob"),
        ({"reset_after_bytes": -5}, "reset_after_bytes"),
        ({"reset_direction": "sideways"}, "reset_direction"),
        ({"flip_direction": "both"}, "flip_direction"),
        ({"max_connections": 0}, "max_connections"),
        ({"flip_mask": 0}, "flip_mask"),
        ({"listen_port": 70000}, "listen_port"),
    ],
)
def test_relay_config_rejects_bad_values(bad, field):
    with pytest.raises(ValueError, match=field):
        RelayConfig(target_host="127.0.0.1", target_port=1, **bad)


def test_relay_cli_parses_every_option():
    cfg = config_from_args(
        [
            "--listen",
            "127.0.0.1:0",
            "--target",
            "127.0.0.1:5000",
            "--delay-ms",
            "50",
            "--stall-prob",
            "0.1",
            "--stall-max-ms",
            "500",
            "--reset-after-bytes",
            "1000",
            "--flip-offset",
            "7",
            "--flip-mask",
            "0x80",
            "--flip-direction",
            "up",
            "--seed",
            "1",
            "--faulty-connections",
            "2",
            "--max-connections",
            "3",
            "--idle-timeout-s",
            "9",
        ]
    )
    assert (cfg.target_port, cfg.delay_ms, cfg.stall_prob, cfg.stall_max_ms, cfg.reset_after_bytes) == (
        5000,
        50,
        0.1,
        500,
        1000,
    )
    assert (cfg.flip_offset, cfg.flip_mask, cfg.flip_direction, cfg.seed) == (7, 0x80, "up", 1)
    assert (cfg.faulty_connections, cfg.max_connections, cfg.idle_timeout_s) == (2, 3, 9)


def test_relay_refuses_targets_off_this_machine():
    check_target("127.0.0.1")
    check_target("localhost")
    # 10.77.0.1 is on-link only inside a lab namespace; from here it would leave by the default route.
    with pytest.raises(ValueError, match="neither loopback nor on a directly attached"):
        check_target("10.77.0.1")
    check_target("10.77.0.1", allow_remote=True)  # real deployments opt in
    r = subprocess.run(
        [sys.executable, "-m", "kvwire.bench.relay", "--target", "10.77.0.1:80"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert r.returncode == 2 and '"event": "error"' in r.stdout and "neither loopback" in r.stderr


def test_harness_says_why_it_cannot_run(monkeypatch):
    import kvwire.bench.netlab.namespaces as ns_mod

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(NetlabUnavailable, match="need root"):
        check_available()
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(ns_mod, "tool_path", lambda name: None if name == "tc" else "/usr/sbin/ip")
    with pytest.raises(NetlabUnavailable, match="tc not found: install Debian's iproute2"):
        check_available()
