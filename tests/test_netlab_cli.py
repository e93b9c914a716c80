"""`kvwire netlab`: the lab by hand. Arguments, the relay options it derives, and one real run on
the tiny model: the demo question answered across the shaped link, the lab held up, then torn down
by SIGTERM (skips where the network lab cannot run, as tests/test_link.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from argparse import Namespace

import pytest

from kvwire.bench.main import main
from kvwire.bench.netlab import NetlabUnavailable
from kvwire.bench.netlab.cli import relay_options
from kvwire.bench.netlab.namespaces import REPO_ROOT, check_available, list_namespaces


def _args(**kw) -> Namespace:
    base = {"delay": "0", "stall_prob": 0.0, "stall_max_ms": 500.0, "flip_prob": 0.0, "seed": 0}
    return Namespace(**{**base, **kw})


def test_relay_only_when_a_fault_or_delay_is_asked_for():
    assert relay_options(_args()) == {}  # the bare link: the cloud dials the edge's veth address
    assert relay_options(_args(delay="20ms")) == {"delay_ms": 20.0, "seed": 0}
    assert relay_options(_args(stall_prob=0.1, stall_max_ms=200, seed=3)) == {
        "stall_prob": 0.1,
        "stall_max_ms": 200,
        "seed": 3,
    }
    assert relay_options(_args(flip_prob=0.02)) == {"flip_prob": 0.02, "seed": 0}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--modes", "kv,fax"], "unknown mode(s) fax; known: kv, scout, text"),
        (["--flip-prob", "2"], "--flip-prob must be in [0, 1]"),
        (["--question", "9"], "--question must be in [0, 2]"),
        (["--hold", "-1"], "--hold must be in [0, 14400]"),
        (["--rate", "fast"], "tc syntax"),
        (["--delay", "soon"], "use a time such as 20ms"),
    ],
)
def test_bad_arguments_exit_2_before_anything_starts(argv, message, capsys):
    assert main(["netlab", *argv]) == 2
    assert message in capsys.readouterr().err


def test_no_lab_exits_2_with_the_reason(monkeypatch, capsys):
    from kvwire.bench.netlab import namespaces

    def refuse():
        raise NetlabUnavailable("network namespaces need root (CI runs as root; run `sudo make test`)")

    monkeypatch.setattr(namespaces, "check_available", refuse)
    assert main(["netlab", "--modes", "text"]) == 2
    assert "the network lab cannot run here: network namespaces need root" in capsys.readouterr().err


def _ours(pid: int) -> list[str]:
    return [n for n in list_namespaces() if n.startswith(("kvw-edge-", "kvw-cloud-")) and n[-10:-4] == f"{pid:06x}"]


def test_asks_across_the_link_holds_it_up_and_tears_down_on_sigterm(tiny_model_dir, tmp_path):
    try:
        check_available()
    except NetlabUnavailable as e:
        pytest.skip(f"netlab: {e}")
    argv = [
        sys.executable,
        "-m",
        "kvwire.bench.main",
        "netlab",
        "--model",
        tiny_model_dir,
        "--rate",
        "50mbit",
        "--delay",
        "5ms",
        "--modes",
        "kv,text",
        "--max-new-tokens",
        "4",
        "--hold",
        "120",
        "--logs",
        str(tmp_path / "logs"),
        "--json",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        banner = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # stderr: the setup line, then the hold banner
            line = proc.stderr.readline()
            if not line:
                break
            banner.append(line)
            if "logs in" in line:
                break
        text = "".join(banner)
        assert "lab up for 120 s" in text, text + proc.stdout.read()
        names = _ours(proc.pid)
        assert len(names) == 2 and all(n in text for n in names), (names, text)  # the banner names both hosts
        assert "ip netns exec kvw-cloud-" in text and "/answer" in text
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "interrupted: the lab is torn down" in err
    assert _ours(proc.pid) == []  # namespaces, veth pair and daemons gone
    results = [json.loads(line) for line in out.splitlines()]
    assert [r["request"]["mode"] for r in results] == ["kv", "text"]
    kv, txt = results
    assert kv["status"] == txt["status"] == 200, results
    assert kv["body"]["bytes_on_wire"] > 0 and txt["body"]["bytes_on_wire"] == len(
        txt["request"]["context"].encode()
    ) + len(txt["request"]["question"].encode())
    # the demo's kv request: every position at the edge's default profile
    assert kv["body"]["complete"] is True and kv["body"]["kept_positions"] == kv["body"]["prompt_tokens"] - 1
    assert sorted(p.name.split("-", 2)[-1] for p in (tmp_path / "logs").glob("*.log")) == [
        "cloud-agent.log",
        "edge-agent.log",
        "relay.log",
    ]  # --logs keeps them
