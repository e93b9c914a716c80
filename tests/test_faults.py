"""Faults between the edge and the cloud, each asserted as a user sees it: the status code, the error
and its message, the answer, and the daemons' metrics.

edge-agent in the edge namespace, cloud-agent in the cloud namespace, and bench.relay in the cloud
namespace between them, on a fixed loopback port: each test puts the relay it needs there (a new
relay replaces the old one and the cloud's gRPC channel reconnects to it). Tests that kill a daemon
start a new one before they end, so no test depends on another's order.

Needs root and iproute2 (skips otherwise, see docs/network-tests.md); uses the tiny offline model.
`pytest -s` prints the measured figures (docs/network-tests.md records them); no test passes or fails
on them: each asserts the outcome (status, error, answer, metrics) that shows what the daemons did,
and waits for what will happen with a generous SAFETY_S.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import threading
import time

import pytest

from kvwire.bench.netlab import LinkSpec, netlab_fixture
from kvwire.bench.netlab.daemons import (
    Daemon,
    RelayProc,
    edge_grpc_target,
    http,
    kill,
    launch_cloud,
    launch_edge,
    metric_sum,
    metrics,
    ready,
    start_relay,
    wait_ready,
)
from kvwire.bench.relay import Relay, RelayConfig
from kvwire.kvcodec.wire import MAGIC

RATE = "100mbit"  # the link between tests
# kill tests: the ~470 KB stream takes ~15 s, so a kill made once chunks arrive (a second or two in, even on a
# loaded host) lands mid-stream; the link keeps moving, so gRPC's pings keep the connection up meanwhile
SLOW_RATE = "250kbit"
# fixed, so that a new relay can take the old one's place; below the ephemeral ports (32768+), which clients use
RELAY_PORT = 30000
CHUNK_BYTES = 4096  # ~115 chunk frames a stream: the cloud counts bytes as frames arrive, so mid-stream is observable
# ~780 context tokens: KV at FP16 is ~470 KB on the wire, large enough for resets, stalls and kills mid-stream
CONTEXT = (
    "The Normans were the people who in the 10th and 11th centuries gave their name to Normandy, a region in "
    "France. They were descended from Norse raiders under their leader Rollo. "
) * 12
REQUEST = {"question": "Who was the leader?", "context": CONTEXT, "mode": "kv", "profile": "fp16", "max_new_tokens": 8}
SAFETY_S = 60.0  # the longest a test waits for something that will happen
REMOTE_ERRORS = {502: {"frame_error", "edge_error"}, 503: {"edge_unavailable", "edge_busy"}}

lab = netlab_fixture(LinkSpec(rate=RATE), scope="module", name="lab")


class Hosts:
    """The daemons and the relay of this module; replaced in place when a test kills or swaps one."""

    def __init__(self, lab, model: str):
        self.lab, self.model = lab, model
        self.relay = start_relay(lab, edge_grpc_target(lab), listen_port=RELAY_PORT)
        edge, cloud = self._launch_edge(), self._launch_cloud()
        self.edge, self.cloud = ready(edge), ready(cloud)  # model loads overlap

    def _launch_edge(self):
        return launch_edge(self.lab, self.model, chunk_bytes=CHUNK_BYTES, threads=1, grace_seconds=1)

    def _launch_cloud(self):
        return launch_cloud(self.lab, self.model, f"127.0.0.1:{RELAY_PORT}", threads=1, grace_seconds=1)

    def restart_edge(self) -> Daemon:
        kill(self.edge.proc)
        self.edge = ready(self._launch_edge())
        return self.edge

    def restart_cloud(self) -> Daemon:
        kill(self.cloud.proc)
        self.cloud = ready(self._launch_cloud())
        return self.cloud

    def use_relay(self, **faults) -> RelayProc:
        """A new relay with these faults (RelayConfig fields) in place of the old one; waits until the
        cloud reaches the edge through it again (/readyz 200)."""
        self.relay.proc.terminate()
        self.relay = start_relay(self.lab, edge_grpc_target(self.lab), listen_port=RELAY_PORT, **faults)
        wait_ready(self.lab, self.cloud)
        return self.relay

    def ask(self, timeout: float = 60.0, request_id: str | None = None, **overrides) -> dict:
        headers = {"X-Request-ID": request_id} if request_id else None
        return http(self.lab, "POST", self.cloud.http_url + "/answer", {**REQUEST, **overrides}, timeout, headers)


@pytest.fixture(scope="module")
def hosts(lab, tiny_model_dir):
    return Hosts(lab, tiny_model_dir)


@pytest.fixture(scope="module")
def clean(hosts) -> dict:
    """The answers without faults: kv through a plain relay, and text mode."""
    hosts.use_relay()
    kv, text = hosts.ask(), hosts.ask(mode="text")
    assert kv["status"] == text["status"] == 200, (kv, text)
    return {"kv": kv["body"], "text": text["body"]}


@pytest.fixture(autouse=True)
def no_leaked_state(request):
    """Around every test on the daemons: start on the normal rate (the kill tests slow the link
    down), and afterwards find no request left in flight on either daemon (a stream the cloud gave
    up on may take the edge a moment to notice)."""
    if "hosts" not in request.fixturenames:
        yield  # the relay's own tests run on loopback, without a lab
        return
    hosts = request.getfixturevalue("hosts")
    hosts.lab.shape(RATE)
    yield
    hosts.lab.shape(RATE)
    deadline = time.monotonic() + SAFETY_S
    for daemon in (hosts.edge, hosts.cloud):
        while (inflight := metrics(hosts.lab, daemon)[("kvwire_inflight_requests", ())]) != 0:
            assert time.monotonic() < deadline, f"{daemon.proc.name}: {inflight:.0f} requests still in flight"
            time.sleep(0.1)


def relay_events(relay: RelayProc, event: str) -> list[dict]:
    return [r for r in relay.proc.json_lines() if r.get("event") == event]


def assert_clean_error(res: dict, allowed: dict[int, set[str]]) -> None:
    """A failure a client can act on: an allowed status, a JSON body naming the outcome, a message."""
    assert res["status"] in allowed, res
    body = res["body"]
    assert isinstance(body, dict) and body["error"] in allowed[res["status"]] and body["detail"], res


def assert_same_answer(res: dict, clean_kv: dict) -> None:
    body = res["body"]
    assert body["answer"] == clean_kv["answer"] and body["bytes_on_wire"] == clean_kv["bytes_on_wire"], (body, clean_kv)
    assert body.get("complete", True) and body.get("fallback") is None, body


# --- the relay's new faults, on loopback (no namespaces) ----------------------------------------


@contextlib.asynccontextmanager
async def relayed_echo(**faults):
    """An echo server on loopback behind a Relay with these faults: (relay, reader, writer) of a client."""

    async def echo(reader, writer):
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    async with server, Relay(RelayConfig("127.0.0.1", server.sockets[0].getsockname()[1], **faults)) as relay:
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
        try:
            yield relay, reader, writer
        finally:
            writer.close()


def test_relay_flips_the_byte_at_an_offset_after_the_nth_marker():
    first, rest = b"x" * 10 + b"KV", b"WF" + b"y" * 20 + b"KVWF" + b"z" * 20
    sent = first + rest

    async def run() -> bytes:
        faults = {"flip_marker": b"KVWF", "flip_marker_count": 2, "flip_offset": 3, "flip_direction": "up"}
        async with relayed_echo(**faults) as (_, reader, writer):
            writer.write(first)  # the first marker arrives split across two reads
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.write(rest)
            writer.write_eof()
            return await reader.read()

    got = asyncio.run(run())
    flipped = [i for i, (a, b) in enumerate(zip(sent, got)) if a != b]
    assert len(got) == len(sent) and flipped == [sent.index(b"KVWF", 12) + 4 + 3]
    assert got[flipped[0]] == sent[flipped[0]] ^ 0x01


def test_relay_goes_silent_after_n_bytes_and_keeps_the_connection_open():
    async def run() -> tuple[bytes, bytes | None, int]:
        async with relayed_echo(silence_after_bytes=10) as (relay, reader, writer):
            writer.write(b"x" * 100)
            got = await asyncio.wait_for(reader.readexactly(10), 5)
            try:
                more = await asyncio.wait_for(reader.read(1), 0.3)
            except TimeoutError:
                more = None  # nothing came, and no EOF either: silent, still open
            return got, more, relay.stats.silences

    assert asyncio.run(run()) == (b"x" * 10, None, 1)


# --- corrupted bytes ---------------------------------------------------------------------------


def test_a_bit_flipped_in_a_chunk_frame_is_rejected_by_its_checksum(hosts, clean):
    relay = hosts.use_relay(flip_marker=MAGIC.decode(), flip_marker_count=2, flip_offset=64, faulty_connections=1)
    before = metrics(hosts.lab, hosts.cloud)
    res = hosts.ask()
    after = metrics(hosts.lab, hosts.cloud)
    assert len(relay_events(relay, "flip")) == 1  # 64 bytes into the first chunk frame after the header frame
    assert_clean_error(res, {502: {"frame_error"}})
    assert "checksum" in res["body"]["detail"] and "chunk frame seq 1" in res["body"]["detail"]
    assert (
        metric_sum(after, "kvwire_frames_rejected_total", reason="checksum")
        - metric_sum(before, "kvwire_frames_rejected_total", reason="checksum")
        == 1
    )
    assert metric_sum(after, "kvwire_frames_rejected_total") - metric_sum(before, "kvwire_frames_rejected_total") == 1
    assert (
        metric_sum(after, "kvwire_requests_total", mode="kv", outcome="frame_error")
        - metric_sum(before, "kvwire_requests_total", mode="kv", outcome="frame_error")
        == 1
    )
    again = hosts.ask()  # the same connection, past the flip: intact again
    assert again["status"] == 200, again
    assert_same_answer(again, clean["kv"])


def test_random_bit_flips_give_the_clean_answer_or_a_clean_error(hosts, clean):
    relay = hosts.use_relay(flip_prob=0.02, seed=11)
    before = metrics(hosts.lab, hosts.cloud)
    results = [hosts.ask(deadline_ms=10_000) for _ in range(12)]  # a flip that leaves gRPC waiting ends at 10 s
    after = metrics(hosts.lab, hosts.cloud)
    for res in results:
        if res["status"] == 200:
            assert_same_answer(res, clean["kv"])  # never a different answer
        else:
            assert_clean_error(res, {504: {"deadline"}, **REMOTE_ERRORS})
    rejected = sum(1 for r in results if r["status"] == 502 and r["body"]["error"] == "frame_error")
    # each rejected stream is counted once, under the reason its message names
    assert (
        metric_sum(after, "kvwire_frames_rejected_total") - metric_sum(before, "kvwire_frames_rejected_total")
        == rejected
    )
    outcomes = [r["body"]["error"] if r["status"] != 200 else "ok" for r in results]
    print(
        f"\nfaults: random flips (p=0.02 per relay chunk, seed 11): {len(relay_events(relay, 'flip'))} bits flipped, "
        f"outcomes {dict((o, outcomes.count(o)) for o in sorted(set(outcomes)))}"
    )
    assert relay_events(relay, "flip"), "the relay flipped nothing: the test proved nothing"


# --- delay, stalls, resets ---------------------------------------------------------------------


def test_delay_and_stalls_answer_or_fail_cleanly(hosts, clean):
    deadline_ms = 3000  # the template/question positions need well under a second here, even with a 500 ms stall
    hosts.use_relay(delay_ms=50, stall_prob=0.05, stall_max_ms=500, seed=7)
    results = [hosts.ask(deadline_ms=deadline_ms) for _ in range(6)]
    for res in results:  # how late each came is printed below (a latency figure, not a pass/fail condition)
        if res["status"] != 200:
            assert_clean_error(res, {504: {"deadline"}, **REMOTE_ERRORS})
        elif res["body"].get("complete", True):
            assert_same_answer(res, clean["kv"])
        else:  # an anytime answer: the deadline cut the stream, and the response says so
            # (every chunk may have arrived and only the trailer not: retention 1.0, still incomplete)
            assert 0 < res["body"]["retention_achieved"] <= 1, res
    seconds = [r["seconds"] for r in results]
    ok = [r for r in results if r["status"] == 200]
    hosts.relay.proc.terminate()
    stopped = relay_events(hosts.relay, "stopped")[-1]
    print(
        f"\nfaults: 50 ms each way + stalls (p=0.05, <=500 ms, seed 7), deadline {deadline_ms} ms: "
        f"{len(ok)}/{len(results)} answered ({sum(1 for r in ok if r['body'].get('complete', True))} complete), "
        f"latency p50 {statistics.median(seconds) * 1000:.0f} ms, max {max(seconds) * 1000:.0f} ms; "
        f"{stopped['stalls']} stalls, {stopped['stall_ms_total']:.0f} ms stalled in all"
    )
    assert ok, "no request got through a slow but working link"


def test_a_reset_mid_stream_fails_that_request_and_the_next_one_succeeds(hosts, clean):
    relay = hosts.use_relay(reset_after_bytes=200_000, faulty_connections=1)  # ~40% into the first stream
    res = hosts.ask(deadline_ms=10_000)
    assert relay_events(relay, "reset"), relay.proc.log()
    assert_clean_error(res, REMOTE_ERRORS)  # 502/503 at the reset, not the 504 its deadline would give
    again = hosts.ask(deadline_ms=10_000)  # a new connection, which the relay leaves alone
    assert again["status"] == 200, again
    assert_same_answer(again, clean["kv"])
    print(
        f"\nfaults: reset after 200000 bytes: {res['status']} {res['body']['error']} in {res['seconds'] * 1000:.0f} ms, "
        f"next request 200 in {again['seconds'] * 1000:.0f} ms"
    )


def test_a_link_gone_silent_mid_stream_ends_cleanly_at_the_deadline(hosts):
    # 2000 ms: the cut comes before the cloud's gRPC ping timeout (3 s after the silence) drops the connection
    deadline_ms = 2000
    relay = hosts.use_relay(silence_after_bytes=100_000, faulty_connections=1)
    res = hosts.ask(deadline_ms=deadline_ms)
    assert relay_events(relay, "silence")
    # the outcome of the cut, which only the deadline makes: an anytime answer from the positions that
    # arrived, or a 504 saying what the cut stream lacked (not the 504 of a deadline too short to start)
    if res["status"] == 200:
        assert res["body"]["complete"] is False and 0 < res["body"]["retention_achieved"] < 1, res
    else:
        assert_clean_error(res, {504: {"deadline"}})
        assert "was cut" in res["body"]["detail"], res
    print(
        f"\nfaults: silent after 100000 bytes, deadline {deadline_ms} ms: {res['status']} in {res['seconds'] * 1000:.0f} ms"
    )


def test_after_a_link_went_silent_the_cloud_drops_the_connection_and_recovers(hosts, clean):
    relay = hosts.use_relay(silence_after_bytes=100_000, faulty_connections=1)
    hosts.ask(deadline_ms=2000)
    silent_at = relay.proc.wait_json("silence", SAFETY_S)["ts"]
    try:
        # the cloud's keepalive drops the silent connection within seconds (docs/network-tests.md); without it
        # TCP would hold it for many minutes, and the relay's idle timeout (300 s) is far off: SAFETY_S tells them apart
        wait_ready(hosts.lab, hosts.cloud, timeout=SAFETY_S)
    except TimeoutError:
        hosts.use_relay()  # a new relay closes the stuck connection: the next tests start clean
        raise
    recovered = time.time() - silent_at
    assert relay_events(relay, "close"), "ready again, yet the silent connection was not dropped"
    res = hosts.ask(deadline_ms=5000)
    assert res["status"] == 200, res
    assert_same_answer(res, clean["kv"])
    print(f"\nfaults: silent connection dropped and the cloud ready again {recovered:.1f} s after it went silent")


# --- daemons killed mid-stream -----------------------------------------------------------------


def _in_background(fn) -> tuple[threading.Thread, dict]:
    out: dict = {}
    thread = threading.Thread(target=lambda: out.setdefault("res", fn()), daemon=True)
    thread.start()
    return thread, out


def _wait_mid_stream(
    hosts: Hosts, before: float, thread: threading.Thread, out: dict, timeout: float = SAFETY_S
) -> None:
    """Until the cloud has counted chunk bytes beyond `before`: the stream is flowing."""
    deadline = time.monotonic() + timeout
    while metric_sum(metrics(hosts.lab, hosts.cloud), "kvwire_received_bytes_total", kind="chunk") <= before:
        thread.join(0.05)
        assert thread.is_alive(), f"the request ended before its stream started: {out['res']}"
        assert time.monotonic() < deadline, "the stream never started"


def _kill_edge_mid_stream(hosts: Hosts, **overrides) -> tuple[dict, float]:
    """Send a kv request over the slow link, SIGKILL the edge once chunks arrive; (response, seconds
    from the kill to the response)."""
    hosts.use_relay()
    hosts.lab.shape(SLOW_RATE)
    before = metric_sum(metrics(hosts.lab, hosts.cloud), "kvwire_received_bytes_total", kind="chunk")
    thread, out = _in_background(lambda: hosts.ask(deadline_ms=30_000, **overrides))
    _wait_mid_stream(hosts, before, thread, out)
    kill(hosts.edge.proc)
    killed = time.monotonic()
    thread.join(SAFETY_S)
    return out["res"], time.monotonic() - killed


def _restart_edge_and_recover(hosts: Hosts, clean: dict) -> float:
    """Start a new edge (the cloud keeps running); seconds until a kv request is answered again."""
    cloud_pid = hosts.cloud.proc.pid
    hosts.lab.shape(RATE)
    hosts.restart_edge()
    started = time.monotonic()
    while (res := hosts.ask())["status"] != 200:
        assert time.monotonic() - started < SAFETY_S, res  # the cloud's channel retries the edge every 2 s at most
        time.sleep(0.2)
    assert_same_answer(res, clean["kv"])
    assert http(hosts.lab, "GET", hosts.cloud.http_url + "/readyz")["status"] == 200
    assert hosts.cloud.proc.pid == cloud_pid and hosts.cloud.proc.poll() is None  # no restart of the cloud
    return time.monotonic() - started


def test_edge_killed_mid_stream_is_503_and_the_cloud_recovers_when_it_returns(hosts, clean):
    before = metrics(hosts.lab, hosts.cloud)
    res, after_kill = _kill_edge_mid_stream(hosts)
    assert_clean_error(res, {503: {"edge_unavailable"}})
    assert "mode=text" in res["body"]["detail"]  # the message says what still works
    # 503 at the kill, not the 504 or anytime answer of its 30 s deadline: the cloud did not wait it out
    cloud = metrics(hosts.lab, hosts.cloud)
    assert (
        metric_sum(cloud, "kvwire_requests_total", mode="kv", outcome="edge_unavailable")
        - metric_sum(before, "kvwire_requests_total", mode="kv", outcome="edge_unavailable")
        == 1
    )
    assert http(hosts.lab, "GET", hosts.cloud.http_url + "/readyz")["status"] == 503  # no edge: not ready
    recovered = _restart_edge_and_recover(hosts, clean)
    print(
        f"\nfaults: edge SIGKILLed mid-stream: 503 {after_kill * 1000:.0f} ms after the kill; "
        f"kv answered {recovered * 1000:.0f} ms after the new edge listened"
    )


def test_edge_killed_mid_stream_with_fallback_text_answers_in_text_mode(hosts, clean):
    res, after_kill = _kill_edge_mid_stream(hosts, fallback="text")
    assert res["status"] == 200, res
    body = res["body"]
    assert body["fallback"] == "text" and body["fallback_reason"] and body["mode"] == "text", body
    assert body["answer"] == clean["text"]["answer"] and body["bytes_on_wire"] == clean["text"]["bytes_on_wire"] > 0
    assert body["fallback_reason"].startswith("edge_unavailable:"), body  # the kill's outcome, not the deadline's
    print(f"\nfaults: edge SIGKILLed mid-stream, fallback text: 200 {after_kill * 1000:.0f} ms after the kill")
    _restart_edge_and_recover(hosts, clean)


@pytest.fixture(scope="module")
def cloud_killed(hosts, clean) -> dict:
    """SIGKILL the cloud while its kv stream is flowing over the slow link (chunks have arrived, ~15 s of
    the stream are still to come); then start a new cloud. What both sides showed."""
    before = metrics(hosts.lab, hosts.edge)
    hosts.use_relay()
    hosts.lab.shape(SLOW_RATE)
    chunks = metric_sum(metrics(hosts.lab, hosts.cloud), "kvwire_received_bytes_total", kind="chunk")
    thread, out = _in_background(lambda: hosts.ask(deadline_ms=120_000, request_id="cloud-killed"))
    _wait_mid_stream(hosts, chunks, thread, out)
    cloud_inflight = metrics(hosts.lab, hosts.cloud)[("kvwire_inflight_requests", ())]
    edge_done = any(
        r.get("event") == "prefill" and r.get("request_id") == "cloud-killed" for r in hosts.edge.proc.json_lines()
    )
    kill(hosts.cloud.proc)
    killed = time.monotonic()
    thread.join(SAFETY_S)
    while (edge := metrics(hosts.lab, hosts.edge))[("kvwire_inflight_requests", ())] != 0:
        assert time.monotonic() - killed < SAFETY_S, "the edge kept a stream open to a dead cloud"
        time.sleep(0.1)
    edge_idle_s = time.monotonic() - killed
    hosts.lab.shape(RATE)
    hosts.restart_cloud()
    wait_ready(hosts.lab, hosts.cloud)  # a new connection: the relay leaves it alone
    outcomes = {
        o: metric_sum(edge, "kvwire_requests_total", mode="kv", outcome=o)
        - metric_sum(before, "kvwire_requests_total", mode="kv", outcome=o)
        for o in ("ok", "cancelled")
    }
    print(
        f"\nfaults: cloud SIGKILLed mid-stream: edge idle {edge_idle_s * 1000:.0f} ms later, edge outcomes {outcomes}, "
        f"edge had logged the stream done before the kill: {edge_done}"
    )
    return {
        "client": out["res"],
        "cloud_inflight": cloud_inflight,
        "edge_outcomes": outcomes,
        "edge_logged_the_stream_done_before_the_kill": edge_done,
        "after": hosts.ask(),
    }


def test_cloud_killed_mid_stream_leaves_nothing_in_flight_and_a_new_cloud_answers(cloud_killed, clean):
    assert cloud_killed["cloud_inflight"] == 1  # the kill landed while the cloud was receiving
    assert cloud_killed["client"]["status"] is None  # the client's connection closed without a response
    assert sum(cloud_killed["edge_outcomes"].values()) == 1  # the edge finished its side of the stream once
    assert cloud_killed["after"]["status"] == 200, cloud_killed["after"]
    assert_same_answer(cloud_killed["after"], clean["kv"])


def test_cloud_killed_mid_stream_is_recorded_as_cancelled_by_the_edge(cloud_killed):
    assert not cloud_killed["edge_logged_the_stream_done_before_the_kill"]
    assert cloud_killed["edge_outcomes"] == {"ok": 0, "cancelled": 1}
