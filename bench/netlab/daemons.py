"""The real daemons on a lab's link: edge-agent in the edge namespace, cloud-agent in the cloud namespace.

    with NetLab(LinkSpec(rate="100mbit")) as lab:
        relay = start_relay(lab, edge_grpc_target(lab), delay_ms=20)  # optional, in the cloud namespace
        procs = [launch_edge(lab, model_dir),                 # gRPC 10.77.0.1:50051, HTTP on a free port
                 launch_cloud(lab, model_dir, relay.target)]  # or edge_grpc_target(lab) for the bare link
        edge, cloud = [ready(p) for p in procs]               # both launched first: model loads overlap
        res = answer(lab, cloud, {"question": ..., "context": ..., "mode": "kv"})

Ports are read from each daemon's `listening` JSON log line; only the edge's gRPC port is fixed by
default, so that a cloud-agent can be pointed at it before the edge is up. The cloud-agent's HTTP port binds
to loopback inside the cloud namespace, so requests to it are sent from there (`answer`, `http`);
the test process itself never talks to 10.77.0.x.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .namespaces import NetLab, Proc

TOOLS = str(Path(__file__).resolve().parent / "tools.py")
STARTUP_S = 180.0  # model load on 2 busy cores; a tiny model takes seconds, the embedded one ~30 s once
# Each namespace has its own port space, so a fixed port cannot collide with another run or the host.
EDGE_GRPC_PORT = 50051


@dataclass
class Daemon:
    """A started daemon: its process and the ports its `listening` log line reported."""

    proc: Proc
    host: str
    http_port: int
    grpc_port: int | None = None

    @property
    def grpc_target(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"


@dataclass
class RelayProc:
    """A bench.relay started in the cloud namespace in front of a target."""

    proc: Proc
    port: int

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


def _flags(opts: dict) -> list[str]:
    out = []
    for key, value in opts.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            out.append(flag)
        elif value is not False and value is not None:
            out += [flag, str(value)]
    return out


def launch_edge(lab: NetLab, model: str, grpc_port: int = EDGE_GRPC_PORT, **opts) -> Proc:
    """Start edge-agent in the edge namespace without waiting: gRPC on the edge's veth address at
    grpc_port (fixed by default, so a cloud-agent can be started at the same time), HTTP on a free
    port; opts become --flags (e.g. profile="int8", max_concurrency=4)."""
    argv = [
        sys.executable,
        "-m",
        "kvwire.edge_agent",
        "--model",
        model,
        "--host",
        lab.edge.addr,
        "--grpc-port",
        str(grpc_port),
        "--http-port",
        "0",
        *_flags(opts),
    ]
    return lab.edge.spawn(argv, name="edge-agent", env={"HF_HUB_OFFLINE": "1"})


def launch_cloud(lab: NetLab, model: str, edge_target: str, **opts) -> Proc:
    """Start cloud-agent in the cloud namespace without waiting: HTTP on a free loopback port, pointed
    at edge_target (`edge_grpc_target(lab)` for the bare link, or a relay's `target`)."""
    argv = [
        sys.executable,
        "-m",
        "kvwire.cloud_agent",
        "--model",
        model,
        "--host",
        "127.0.0.1",
        "--http-port",
        "0",
        "--edge",
        edge_target,
        *_flags(opts),
    ]
    return lab.cloud.spawn(argv, name="cloud-agent", env={"HF_HUB_OFFLINE": "1"})


def ready(proc: Proc, timeout: float = STARTUP_S) -> Daemon:
    """Wait for a launched daemon's `listening` log line and return its ports."""
    rec = proc.wait_json("listening", timeout)
    return Daemon(proc, rec["host"], rec["http_port"], rec.get("grpc_port"))


def edge_grpc_target(lab: NetLab, grpc_port: int = EDGE_GRPC_PORT) -> str:
    return f"{lab.edge.addr}:{grpc_port}"


def start_relay(lab: NetLab, target: str, timeout: float = 20.0, **opts) -> RelayProc:
    """bench.relay in the cloud namespace, listening on its loopback, forwarding to target across
    the veth; opts are RelayConfig fields as --flags (delay_ms=50, reset_after_bytes=..., seed=...);
    listen_port fixes the loopback port (default: a free one)."""
    port = opts.pop("listen_port", 0)  # a fixed port lets a new relay replace a stopped one under a running cloud
    argv = [
        sys.executable,
        "-m",
        "kvwire.bench.relay",
        "--listen",
        f"127.0.0.1:{port}",
        "--target",
        target,
        *_flags(opts),
    ]
    proc = lab.cloud.spawn(argv, name="relay")
    return RelayProc(proc, proc.wait_json("listening", timeout)["port"])


def http(
    lab: NetLab,
    method: str,
    url: str,
    body: dict | str | None = None,
    timeout: float = 120.0,
    headers: dict | None = None,
) -> dict:
    """One HTTP request sent from inside the cloud namespace: {"status", "body", "seconds"}
    (status None and "error" when no response came). A dict body is sent as JSON, a str as UTF-8
    text/plain (unless headers name another Content-Type)."""
    args = [TOOLS, "http", method, url, "--timeout", str(timeout)]
    if isinstance(body, str):
        args += ["--json", body]
        headers = {"Content-Type": "text/plain; charset=utf-8", **(headers or {})}
    elif body is not None:
        args += ["--json", json.dumps(body)]
    for k, v in (headers or {}).items():
        args += ["--header", f"{k}: {v}"]
    r = lab.cloud.python(args, timeout=timeout + 30)
    return json.loads(r.stdout.strip().splitlines()[-1])


def answer(lab: NetLab, cloud: Daemon, request: dict, timeout: float = 120.0) -> dict:
    """POST /answer to the cloud-agent from inside the cloud namespace."""
    return http(lab, "POST", cloud.http_url + "/answer", request, timeout)


def put_document(lab: NetLab, edge: Daemon, doc_id: str, text: str, timeout: float = 60.0) -> dict:
    """PUT /v1/documents/{doc_id} on the edge-agent's HTTP port (from the cloud namespace, across the
    veth); the document's metadata. RuntimeError with the edge's answer when it refuses."""
    res = http(lab, "PUT", f"{edge.http_url}/v1/documents/{doc_id}", text, timeout)
    if res["status"] not in (200, 201):
        raise RuntimeError(f"{edge.proc.name} PUT /v1/documents/{doc_id}: {res}")
    return res["body"]


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process (all its threads) has used, from /proc/<pid>/stat
    (utime and stime, fields 14 and 15, in clock ticks: 10 ms resolution at the usual 100 Hz).
    Children are not included; the daemons start none."""
    with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
        return parse_stat_cpu(f.read()) / os.sysconf("SC_CLK_TCK")


def parse_stat_cpu(stat: str) -> int:
    """utime + stime (clock ticks) of a /proc/<pid>/stat line. The command name (field 2) is in
    parentheses and may itself hold spaces and parentheses: the fields after it start after the LAST ')'."""
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of the line; here 0 is field 3 (state)


def daemon_pid(daemon: Daemon, module: str) -> int:
    """The pid whose CPU time is the daemon's own: `ip netns exec` replaces itself with the program, so
    it is the spawned pid; checked against /proc/<pid>/cmdline (RuntimeError if it is not `module`)."""
    pid = daemon.proc.pid
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        argv = f.read().split(b"\0")
    if module.encode() not in argv:
        raise RuntimeError(f"pid {pid} runs {argv[:4]!r}, not {module}: its CPU time would not be the daemon's")
    return pid


def kill(proc: Proc, sig: int = signal.SIGKILL, timeout: float = 10.0) -> int | None:
    """Send sig to a spawned process's group (SIGKILL by default: a crash, no drain) and reap it;
    returns its exit code (-9 after SIGKILL)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
    try:
        return proc.popen.wait(timeout)
    except subprocess.TimeoutExpired:
        return None


def parse_metrics(text: str) -> dict[tuple, float]:
    """{(sample name, sorted (label, value) pairs): value} of a Prometheus text page."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metrics(lab: NetLab, daemon: Daemon, timeout: float = 30.0) -> dict[tuple, float]:
    """A daemon's /metrics, fetched from inside the cloud namespace (which reaches the cloud-agent on
    its loopback and the edge-agent across the veth), parsed by parse_metrics."""
    res = http(lab, "GET", daemon.http_url + "/metrics", timeout=timeout)
    if res["status"] != 200:
        raise RuntimeError(f"{daemon.proc.name} /metrics: {res}")
    return parse_metrics(res["body"])


def metric_sum(samples: dict[tuple, float], name: str, **labels: str) -> float:
    """Sum of the samples called name whose labels include labels (all of them when none are given)."""
    want = set(labels.items())
    return sum(v for (n, lbl), v in samples.items() if n == name and want <= set(lbl))


def wait_ready(lab: NetLab, daemon: Daemon, timeout: float = 20.0) -> float:
    """Poll GET /readyz from the cloud namespace until it answers 200; the seconds it took.
    TimeoutError with the last answer when it does not come in time."""
    started = time.monotonic()
    while True:
        res = http(lab, "GET", daemon.http_url + "/readyz", timeout=5)
        if res["status"] == 200:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"{daemon.proc.name} not ready after {timeout}s: {res}")
        time.sleep(0.2)
