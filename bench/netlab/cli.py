"""`kvwire netlab`: the two-host lab by hand. Brings up two network namespaces joined by a
tc-shaped veth, edge-agent in one and cloud-agent in the other (optionally through bench.relay for
delay, stalls and bit flips), asks the demo question in kv, scout and text mode across the link,
prints what a user of /answer would see, optionally keeps the lab up for your own requests, and
tears everything down (also on Ctrl-C or SIGTERM).

    sudo kvwire netlab --rate 10mbit --delay 20ms                  # ask, print, tear down
    sudo kvwire netlab --rate 10mbit --hold 600                    # ... then keep it up for 10 min

Needs root and Debian's iproute2 (exit 2 with the reason otherwise). Only the namespaces' own
addresses (10.77.0.1/30, 10.77.0.2/30) and their loopbacks are used: see docs/network-tests.md.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

from kvwire.kvcodec.errors import ConfigError

MAX_HOLD_S = 4 * 3600  # a forgotten lab still goes away by itself
REQUEST_MODES = ("kv", "scout", "text")
DEFAULT_DEADLINE_MS = 120_000  # cloud-agent's --default-deadline-ms; text mode has none, this bounds it too


def add_arguments(p) -> None:
    p.add_argument("--rate", default="10mbit", help="tc rate of the link, each way (default 10mbit; 'none': unshaped)")
    p.add_argument(
        "--delay",
        default="20ms",
        help="delay bench.relay adds each way between cloud and edge (default 20ms; 0 and no other relay "
        "option: the cloud reaches the edge on the bare link)",
    )
    p.add_argument(
        "--stall-prob", type=float, default=0.0, help="relay: per chunk, the probability of a stall (default 0)"
    )
    p.add_argument("--stall-max-ms", type=float, default=500.0, help="relay: longest stall in ms (default 500)")
    p.add_argument(
        "--flip-prob",
        type=float,
        default=0.0,
        help="relay: per chunk, the probability of flipping one random bit (default 0); the cloud rejects "
        "the frame (HTTP 502 frame_error) and counts it in kvwire_frames_rejected_total",
    )
    p.add_argument("--seed", type=int, default=0, help="relay: seed of the stalls and flips (default 0)")
    p.add_argument(
        "--model", default="embedded", help="model of both daemons (default: the embedded SmolLM2-135M-Instruct)"
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads of EACH daemon (default 1)")
    p.add_argument(
        "--modes",
        default=",".join(REQUEST_MODES),
        help="comma list of the modes the demo question is asked in (default kv,scout,text; '' asks nothing)",
    )
    p.add_argument("--question", type=int, default=0, help="index of the demo question (0-2, default 0)")
    p.add_argument(
        "--retention",
        type=float,
        default=0.5,
        help="scout: share of context positions kept (default 0.5; kv keeps every position, its default)",
    )
    p.add_argument("--deadline-ms", type=int, default=None, help="deadline_ms of each request (default: the cloud's)")
    p.add_argument(
        "--fallback", choices=["text"], default=None, help="fallback of each kv/scout request (default none)"
    )
    p.add_argument("--max-new-tokens", type=int, default=24, help="answer length cap (default 24)")
    p.add_argument(
        "--hold",
        type=float,
        default=0.0,
        help=f"after the questions, keep the lab up this many seconds for your own requests, or until "
        f"Ctrl-C / SIGTERM (default 0; at most {MAX_HOLD_S})",
    )
    p.add_argument(
        "--logs",
        default=None,
        metavar="DIR",
        help="keep the daemons' and relay's logs in DIR (default: a temporary folder, removed at the end)",
    )
    p.add_argument("--json", action="store_true", help="print each /answer result as one JSON line")


def parse_modes(text: str) -> list[str]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in REQUEST_MODES]
    if unknown:
        raise ConfigError(f"--modes: unknown mode(s) {', '.join(unknown)}; known: {', '.join(REQUEST_MODES)}")
    return list(dict.fromkeys(names))


def relay_options(args) -> dict:
    """bench.relay options for these arguments; {} when the cloud should reach the edge directly."""
    from kvwire.bench.link import parse_delay

    for name in ("stall_prob", "flip_prob"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            raise ConfigError(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(args, name)}")
    delay_ms = parse_delay(args.delay)
    opts = {"delay_ms": delay_ms} if delay_ms > 0 else {}
    if args.stall_prob > 0:
        opts |= {"stall_prob": args.stall_prob, "stall_max_ms": args.stall_max_ms}
    if args.flip_prob > 0:
        opts |= {"flip_prob": args.flip_prob}
    if opts:
        opts["seed"] = args.seed
    return opts


def build_requests(args, modes: list[str]) -> list[dict]:
    """The demo question (kvcodec/data/demo.json) in each mode, as bench/loopback_demo.py asks it."""
    from kvwire.bench.loopback_demo import demo_requests

    data = json.loads(resources.files("kvwire.kvcodec").joinpath("data/demo.json").read_text())
    if not 0 <= args.question < len(data["questions"]):
        raise ConfigError(f"--question must be in [0, {len(data['questions']) - 1}], got {args.question}")
    extra = {k: v for k, v in (("deadline_ms", args.deadline_ms), ("fallback", args.fallback)) if v is not None}
    reqs = demo_requests(data["questions"][args.question], data["context"], args.retention, args.max_new_tokens)
    return [{**r, **(extra if r["mode"] != "text" else {})} for r in reqs if r["mode"] in modes]


def summary_line(request: dict, res: dict) -> str:
    """One /answer result as a user sees it: status, the answer or the error, bytes and time."""
    head = f"  {request['mode']:<5} HTTP {res.get('status')} in {res.get('seconds', 0):.2f} s: "
    body = res.get("body")
    if res.get("status") != 200 or not isinstance(body, dict):
        detail = body if body is not None else res.get("error")
        return head + (json.dumps(detail) if isinstance(detail, dict) else str(detail))[:300]
    notes = [
        f"{body['bytes_on_wire']:,} bytes on the wire",
        f"kept {body['kept_positions']}/{body['prompt_tokens'] - 1} positions",
    ]
    if not body["complete"]:
        notes.append(f"stream cut at the deadline, retention achieved {body['retention_achieved']:.2f}")
    if body.get("fallback"):
        notes.append(f"fell back to text ({body['fallback_reason']})")
    return head + f"{body['answer']!r}\n        " + "; ".join(notes)


def hold_banner(lab, edge, cloud, seconds: float) -> str:
    cloud_ns, q = lab.cloud.name, shlex.quote
    example = json.dumps({"question": "...", "context": "...", "mode": "kv", "retention": 0.5})
    lines = [
        f"lab up for {seconds:g} s (Ctrl-C or SIGTERM ends it sooner):",
        f"  edge-agent   namespace {lab.edge.name}: gRPC {edge.grpc_target}, HTTP {edge.http_url}",
        f"  cloud-agent  namespace {cloud_ns}: HTTP {cloud.http_url}",
        f"  link         {lab.qdisc(lab.edge).strip() or 'unshaped'}",
        "  try (from another shell, as root):",
        f"    ip netns exec {cloud_ns} curl -s {cloud.http_url}/answer -H 'content-type: application/json' -d {q(example)}",
        f"    ip netns exec {cloud_ns} curl -s {cloud.http_url}/metrics",
        f"    ip netns exec {cloud_ns} curl -s {edge.http_url}/metrics",
        f"  logs in {lab.workdir}",
    ]
    return "\n".join(lines)


def run(args) -> int:
    from kvwire.bench.link import parse_bandwidths
    from kvwire.bench.netlab import LinkSpec, NetLab, NetlabUnavailable
    from kvwire.bench.netlab.daemons import answer, edge_grpc_target, launch_cloud, launch_edge, ready, start_relay

    rate = None if args.rate.strip().lower() == "none" else parse_bandwidths(args.rate)[0]
    modes = parse_modes(args.modes)
    relay_opts = relay_options(args)
    requests = build_requests(args, modes)
    if not 0 <= args.hold <= MAX_HOLD_S:
        raise ConfigError(f"--hold must be in [0, {MAX_HOLD_S}] seconds, got {args.hold}")
    if args.threads < 0:
        raise ConfigError(f"--threads must be >= 0 (0: torch's default), got {args.threads}")
    if args.logs:
        Path(args.logs).mkdir(parents=True, exist_ok=True)
    say = (lambda s: print(s, file=sys.stderr, flush=True)) if args.json else (lambda s: print(s, flush=True))
    failed = 0
    try:
        with NetLab(LinkSpec(rate=rate), workdir=args.logs) as lab:
            target = edge_grpc_target(lab)
            if relay_opts:
                target = start_relay(lab, target, **relay_opts).target
            opts = {"threads": args.threads, "grace_seconds": 2}
            started = time.monotonic()
            edge, cloud = [
                ready(p) for p in (launch_edge(lab, args.model, **opts), launch_cloud(lab, args.model, target, **opts))
            ]
            path = f"through bench.relay {relay_opts}" if relay_opts else "on the bare link"
            say(
                f"edge-agent in {lab.edge.name}, cloud-agent in {lab.cloud.name}, link {rate or 'unshaped'}, "
                f"cloud to edge {path}; daemons up in {time.monotonic() - started:.1f} s (model {args.model})"
            )
            for req in requests:
                timeout = (req.get("deadline_ms") or DEFAULT_DEADLINE_MS) / 1000 + 30
                try:
                    res = answer(lab, cloud, req, timeout=timeout)
                except subprocess.TimeoutExpired:
                    res = {"status": None, "error": f"no response within {timeout:.0f} s", "seconds": timeout}
                failed += res.get("status") != 200
                print(json.dumps({"request": req, **res}) if args.json else summary_line(req, res), flush=True)
            if args.hold > 0:
                say(hold_banner(lab, edge, cloud, args.hold))
                time.sleep(args.hold)
    except NetlabUnavailable as exc:
        print(f"kvwire netlab: the network lab cannot run here: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        say("interrupted: the lab is torn down")
        return 130
    say("lab torn down")
    return 1 if failed else 0
