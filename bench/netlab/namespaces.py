"""Two test hosts on one machine: network namespaces joined by a tbf-shaped veth pair, and their processes.

    with NetLab(LinkSpec(rate="8mbit")) as lab:
        server = lab.edge.spawn(["python3", "-m", "http.server", "--bind", lab.edge.addr, "8000"])
        lab.cloud.run(["python3", "-c", "..."])       # runs inside kvw-cloud-<suffix>

Address plan (docs/network-tests.md): the edge end of the veth is 10.77.0.1/30, the cloud end
10.77.0.2/30. The addresses exist only inside the two namespaces, which have no default route, so
nothing sent from them can leave the pair. Every run gets its own suffix, so parallel runs never
share a namespace or an interface name; the /30 can be the same because each pair is its own stack.

Teardown (on normal exit, on an exception, on Ctrl-C, and on SIGTERM while a lab is open in the
main thread): every spawned process group gets SIGTERM, then SIGKILL; every process still inside a
namespace (`ip netns pids`) gets SIGKILL; the namespaces are deleted, which deletes the veth pair.
A lab left behind by a SIGKILLed run is swept by the next run (its creator's pid is in the name).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

PREFIX = "kvw"
ROLES = ("edge", "cloud")
REPO_ROOT = Path(__file__).resolve().parents[2]
_NAME_RE = re.compile(rf"^{PREFIX}-(?:{'|'.join(ROLES)})-([0-9a-f]{{6}})([0-9a-f]{{4}})$")


class NetlabUnavailable(RuntimeError):
    """This machine cannot host the lab (not root, no iproute2, namespaces refused); the message says which."""


@dataclass(frozen=True)
class LinkSpec:
    """The veth link and its shaping. rate None leaves the link unshaped (veth runs at memory speed).

    tbf needs a bucket (burst) of at least rate/HZ bytes or it cannot reach its rate; the default is
    max(32 KiB, 10 ms of traffic). latency bounds how long a packet may queue in tbf before it is
    dropped, i.e. the queue size; TCP then backs off as it would on a real bottleneck.
    """

    rate: str | None = None  # tc syntax: "8mbit", "100mbit", "1gbit"
    burst: str | None = None  # tc syntax, e.g. "32kb"; None: max(32 KiB, rate x 10 ms)
    latency: str = "50ms"
    edge_addr: str = "10.77.0.1"
    cloud_addr: str = "10.77.0.2"
    prefix_len: int = 30

    def tbf_args(self) -> list[str]:
        burst = self.burst or f"{max(32 * 1024, int(rate_bits(self.rate) / 8 / 100))}b"
        return ["tbf", "rate", self.rate, "burst", burst, "latency", self.latency]


def rate_bits(rate: str) -> float:
    """Bits per second of a tc rate string ("8mbit" -> 8e6, "1gbit" -> 1e9, "500kbit" -> 5e5)."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(bit|kbit|mbit|gbit|bps|kbps|mbps|gbps)", rate.strip().lower())
    if not m:
        raise ValueError(f"rate {rate!r}: use tc syntax such as 500kbit, 8mbit, 1gbit")
    scale = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "bps": 8, "kbps": 8e3, "mbps": 8e6, "gbps": 8e9}
    return float(m.group(1)) * scale[m.group(2)]


def _sbin_path() -> str:
    """PATH plus the sbin folders, where `ip` and `tc` live and a non-login PATH may not look."""
    return os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])


def tool_path(name: str) -> str | None:
    """Full path of an iproute2 tool, also looking in the sbin folders."""
    return shutil.which(name, path=_sbin_path())


def check_available() -> None:
    """Raise NetlabUnavailable unless we are root and `ip` and `tc` exist."""
    if os.name != "posix" or not sys.platform.startswith("linux"):
        raise NetlabUnavailable("network namespaces need Linux")
    if os.geteuid() != 0:
        raise NetlabUnavailable("network namespaces need root (CI runs as root; run `sudo make test`)")
    missing = [t for t in ("ip", "tc") if tool_path(t) is None]
    if missing:
        raise NetlabUnavailable(f"{' and '.join(missing)} not found: install Debian's iproute2")


def _ip(*args: str, check: bool = True, timeout: float = 10) -> subprocess.CompletedProcess:
    return subprocess.run(
        [tool_path("ip") or "ip", *args], capture_output=True, text=True, check=check, timeout=timeout
    )


def list_namespaces() -> list[str]:
    """Names of all network namespaces `ip netns` knows."""
    out = _ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _netns_pids(name: str) -> list[int]:
    out = _ip("netns", "pids", name, check=False).stdout
    return [int(p) for p in out.split() if p.isdigit()]


def _delete_namespace(name: str) -> None:
    for pid in _netns_pids(name):
        if pid != os.getpid():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + 5
    while _netns_pids(name) and time.monotonic() < deadline:
        time.sleep(0.02)
    _ip("netns", "del", name, check=False)


def sweep_stale() -> list[str]:
    """Delete lab namespaces whose creating process is gone (left by a SIGKILLed run); return their names."""
    swept = []
    for name in list_namespaces():
        m = _NAME_RE.match(name)
        if m and not _pid_alive(int(m.group(1), 16)):
            _delete_namespace(name)
            swept.append(name)
    return swept


class Proc:
    """A process started inside a namespace; its stdout and stderr go to one log file."""

    def __init__(self, popen: subprocess.Popen, log_path: Path, name: str, netns: str):
        self.popen, self.log_path, self.name, self.netns = popen, log_path, name, netns

    @property
    def pid(self) -> int:
        return self.popen.pid

    def poll(self) -> int | None:
        return self.popen.poll()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def json_lines(self) -> list[dict]:
        """Every line of the log that parses as a JSON object."""
        recs = []
        for line in self.log().splitlines():
            line = line.strip()
            if line.startswith("{"):
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if isinstance(rec, dict):
                    recs.append(rec)
        return recs

    def wait_json(self, predicate, timeout: float = 20.0) -> dict:
        """The first JSON log line for which predicate(rec) is true; waits for it, bounded by timeout.

        Raises TimeoutError (with the log's tail) if it does not come, or RuntimeError if the
        process exits first.
        """
        if isinstance(predicate, str):
            event = predicate
            predicate = lambda rec: rec.get("event") == event  # noqa: E731
        deadline = time.monotonic() + timeout
        while True:
            for rec in self.json_lines():
                if predicate(rec):
                    return rec
            if self.popen.poll() is not None:
                for rec in self.json_lines():  # a last look: it may have written and exited
                    if predicate(rec):
                        return rec
                raise RuntimeError(
                    f"{self.name} exited with {self.popen.returncode} before the expected "
                    f"log line; log tail:\n{self.log()[-2000:]}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: no matching log line in {timeout}s; log tail:\n{self.log()[-2000:]}")
            time.sleep(0.02)

    def wait_text(self, text: str, timeout: float = 20.0) -> None:
        """Wait (bounded) until `text` appears in the log, for programs that log plain lines."""
        deadline = time.monotonic() + timeout
        while text not in self.log():
            if self.popen.poll() is not None and text not in self.log():
                raise RuntimeError(
                    f"{self.name} exited with {self.popen.returncode} before logging {text!r}; "
                    f"log tail:\n{self.log()[-2000:]}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: {text!r} not logged in {timeout}s; log tail:\n{self.log()[-2000:]}")
            time.sleep(0.02)

    def terminate(self, timeout: float = 5.0) -> int | None:
        """SIGTERM the process group, then SIGKILL it after timeout; return the exit code."""
        # Signal the group only while its leader is unreaped, so its id cannot have been reused;
        # stragglers that outlive the leader are still inside the namespace and die at close().
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 2.0)):
            if self.popen.poll() is not None:
                break
            _signal_group(self.popen.pid, sig)
            try:
                self.popen.wait(wait)
            except subprocess.TimeoutExpired:
                pass
        return self.popen.returncode


def stop_all(procs: list[Proc], timeout: float = 3.0) -> None:
    """SIGTERM every process group at once, give them `timeout` together, then SIGKILL what is left."""
    live = [p for p in procs if p.popen.poll() is None]
    for p in live:
        _signal_group(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for p in live:
        try:
            p.popen.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for p in live:
        p.terminate(timeout=0)  # SIGKILL the group of any that is still running


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class Namespace:
    """One test host: a network namespace with one veth end, its address, and the processes started in it."""

    def __init__(self, lab: NetLab, role: str, name: str, veth: str, addr: str):
        self.lab, self.role, self.name, self.veth, self.addr = lab, role, name, veth, addr

    def argv(self, argv: list[str]) -> list[str]:
        """argv wrapped to run inside this namespace."""
        return [tool_path("ip") or "ip", "netns", "exec", self.name, *argv]

    def spawn(
        self, argv: list[str], name: str | None = None, env: dict | None = None, cwd: str | os.PathLike | None = None
    ) -> Proc:
        """Start argv in this namespace in its own process group; the lab stops it on teardown.

        The child gets the caller's environment plus PYTHONUNBUFFERED=1, then `env` on top (it imports
        kvwire from the caller's interpreter: `python -m kvwire.bench.relay` needs the package installed).
        """
        self.lab._check_open()
        name = name or Path(argv[0]).name
        log_path = (
            self.lab.workdir / f"{self.role}-{len(self.lab.procs):02d}-{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.log"
        )
        with open(log_path, "wb") as log:
            popen = subprocess.Popen(
                self.argv(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=child_env(env),
                cwd=cwd or REPO_ROOT,
            )
        proc = Proc(popen, log_path, name, self.name)
        self.lab.procs.append(proc)
        return proc

    def run(
        self, argv: list[str], timeout: float = 30.0, env: dict | None = None, check: bool = True
    ) -> subprocess.CompletedProcess:
        """Run argv in this namespace to completion (bounded by timeout) and capture its output."""
        self.lab._check_open()
        return subprocess.run(
            self.argv(argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
            env=child_env(env),
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
        )

    def python(self, args: list[str], **kw) -> subprocess.CompletedProcess:
        """Run `sys.executable args...` in this namespace."""
        return self.run([sys.executable, *args], **kw)

    def __repr__(self) -> str:
        return f"Namespace({self.name!r}, addr={self.addr!r})"


def child_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env["PATH"] = _sbin_path()
    env.update(extra or {})
    return env


class NetLab:
    """Two namespaces, kvw-edge-<suffix> and kvw-cloud-<suffix>, joined by a veth pair, shaped by tbf.

    Use as a context manager; see the module docstring for what teardown guarantees. Raises
    NetlabUnavailable from __enter__ when the machine cannot host it.
    """

    def __init__(
        self, spec: LinkSpec = LinkSpec(), workdir: str | os.PathLike | None = None, suffix: str | None = None
    ):
        self.spec = spec
        self.suffix = suffix or f"{os.getpid():06x}{secrets.token_hex(2)}"
        if not re.fullmatch(r"[0-9a-f]{10}", self.suffix):
            raise ValueError(f"suffix must be 10 hex digits (creator pid + random), got {self.suffix!r}")
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix=f"netlab-{self.suffix}-"))
        self.edge = Namespace(self, "edge", f"{PREFIX}-edge-{self.suffix}", f"kve{self.suffix}", spec.edge_addr)
        self.cloud = Namespace(self, "cloud", f"{PREFIX}-cloud-{self.suffix}", f"kvc{self.suffix}", spec.cloud_addr)
        self.procs: list[Proc] = []
        self._created: list[str] = []
        self._open = False
        self._old_sigterm = None

    @property
    def namespaces(self) -> tuple[Namespace, Namespace]:
        return self.edge, self.cloud

    def __enter__(self) -> NetLab:
        check_available()
        sweep_stale()
        self._install_sigterm()
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _create(self) -> None:
        for ns in self.namespaces:
            r = _ip("netns", "add", ns.name, check=False)
            if r.returncode != 0:
                raise NetlabUnavailable(f"`ip netns add {ns.name}` failed: {r.stderr.strip() or r.returncode}")
            self._created.append(ns.name)
        # Create the pair with each end already in its namespace: it never exists in the root namespace.
        r = _ip(
            "link",
            "add",
            self.edge.veth,
            "netns",
            self.edge.name,
            "type",
            "veth",
            "peer",
            "name",
            self.cloud.veth,
            "netns",
            self.cloud.name,
            check=False,
        )
        if r.returncode != 0:
            raise NetlabUnavailable(f"cannot create the veth pair: {r.stderr.strip() or r.returncode}")
        self._open = True
        for ns in self.namespaces:
            _ip("-n", ns.name, "link", "set", "lo", "up")
            _ip("-n", ns.name, "addr", "add", f"{ns.addr}/{self.spec.prefix_len}", "dev", ns.veth)
            _ip("-n", ns.name, "link", "set", ns.veth, "up")
        self.shape(self.spec.rate, self.spec.burst, self.spec.latency)

    def shape(self, rate: str | None, burst: str | None = None, latency: str | None = None) -> None:
        """(Re)shape both veth ends with tbf at `rate`, or remove the shaping when rate is None."""
        self._check_open()
        spec = LinkSpec(rate=rate, burst=burst, latency=latency or self.spec.latency)
        tc = tool_path("tc") or "tc"
        for ns in self.namespaces:
            if rate is None:
                subprocess.run(
                    [tc, "-n", ns.name, "qdisc", "del", "dev", ns.veth, "root"], capture_output=True, timeout=10
                )  # absent already: fine
                continue
            r = subprocess.run(
                [tc, "-n", ns.name, "qdisc", "replace", "dev", ns.veth, "root", *spec.tbf_args()],
                capture_output=True,
                text=True,
                timeout=10,
            )
            if r.returncode != 0:
                raise NetlabUnavailable(f"tc tbf failed on {ns.veth}: {r.stderr.strip()}")

    def qdisc(self, ns: Namespace) -> str:
        """`tc qdisc show` of ns's veth end."""
        tc = tool_path("tc") or "tc"
        return subprocess.run(
            [tc, "-n", ns.name, "qdisc", "show", "dev", ns.veth], capture_output=True, text=True, timeout=10
        ).stdout

    def _check_open(self) -> None:
        if not self._open:
            raise RuntimeError("the lab is not set up (use it inside `with NetLab(...)`)")

    def close(self) -> None:
        """Stop every process and delete the namespaces. Idempotent; safe after a partial setup."""
        self._open = False
        try:
            stop_all(self.procs, timeout=3)
            for name in self._created:
                _delete_namespace(name)
            self._created = [n for n in self._created if n in list_namespaces()]
        finally:
            self._restore_sigterm()
            if self._own_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)
        if self._created:
            raise RuntimeError(f"could not delete namespaces {self._created}")

    # SIGTERM's default action kills the process without running `finally`; while a lab is open in
    # the main thread it raises KeyboardInterrupt instead, so __exit__ runs and tears down.
    def _install_sigterm(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
            self._old_sigterm = signal.signal(signal.SIGTERM, _sigterm_to_interrupt)

    def _restore_sigterm(self) -> None:
        if self._old_sigterm is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._old_sigterm)
            self._old_sigterm = None


def _sigterm_to_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def netlab_fixture(spec: LinkSpec = LinkSpec(), scope: str = "function", name: str | None = None):
    """A pytest fixture that yields an open NetLab, or skips the test with the reason it cannot run.

    lab = netlab_fixture(LinkSpec(rate="8mbit"), scope="module")   # in a test module
    """
    import pytest

    @pytest.fixture(scope=scope, name=name)
    def _netlab(tmp_path_factory):
        try:
            check_available()
        except NetlabUnavailable as e:
            pytest.skip(f"netlab: {e}")
        lab = NetLab(spec, workdir=tmp_path_factory.mktemp("netlab"))
        try:
            lab.__enter__()
        except NetlabUnavailable as e:
            pytest.skip(f"netlab: {e}")
        try:
            yield lab
        finally:
            lab.close()

    return _netlab
