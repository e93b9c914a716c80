"""`python -m kvwire.bench.loopback_demo` (`make run`): both daemons on loopback, one question in kv, scout and text mode.

Starts edge-agent and cloud-agent as child processes on free ports with the same model (the
embedded SmolLM2-135M-Instruct unless --model), registers a real passage (kvcodec/data/demo.json)
on the edge as a document and asks two questions about it by doc_id (the first prefills the
document, the second only its own question), then asks the question with the passage inline in
kv, scout and text mode through POST /answer, prints the answers with bytes on the wire, wire
ratios and stage timings, and stops both daemons with SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from importlib import resources

import httpx

from kvwire.agent_common.launch import Daemon
from kvwire.edge_agent.settings import DEFAULT_PROFILE

DEMO_DOC = "normans"  # the id the passage is registered under on the edge
STAGES = (
    "edge_prefill",
    "select",
    "encode",
    "transfer",
    "decode",
    "inject",
    "prefill",
    "first_token",
    "generate",
    "total",
)


def demo_requests(question: str, context: str, retention: float, max_new_tokens: int) -> list[dict]:
    """kv at the service's defaults (every context position at the edge's default profile: the measured best
    quality per byte that streams every position), scout at `retention`, then text (the cloud's own full
    prefill) for comparison."""
    base = {"question": question, "context": context, "max_new_tokens": max_new_tokens, "selector": "q2c"}
    return [
        {**base, "mode": "kv", "profile": DEFAULT_PROFILE},
        {**base, "mode": "scout", "retention": retention},
        {**base, "mode": "text"},
    ]


def run_demo(
    model: str, question_index: int = 0, retention: float = 0.5, max_new_tokens: int = 24, threads: int = 1, log=print
) -> list[dict]:
    """Start both daemons, ask the demo question in each mode, stop them; returns the /answer bodies
    (plus the request sent, as "request") and the daemons' exit codes in the last element."""
    data = json.loads(resources.files("kvwire.kvcodec").joinpath("data/demo.json").read_text())
    question = data["questions"][question_index]
    common = ["--model", model, "--host", "127.0.0.1", "--http-port", "0", "--threads", str(threads)]
    started = time.perf_counter()
    log(f"starting edge-agent and cloud-agent on 127.0.0.1 (model: {model}) ...")
    data_dir = tempfile.mkdtemp(prefix="kvwire-demo-")  # the demo's document store, removed at the end
    # --no-prefill-documents: the first question pays the document's prefill, so the report can show what
    # the cache saves the second (by default the edge prefills a document in the background when it is put)
    edge_args = [*common, "--grpc-port", "0", "--data-dir", data_dir, "--no-prefill-documents"]
    edge = Daemon("edge-agent", "kvwire.edge_agent", edge_args)
    cloud = None
    results: list[dict] = []
    try:
        edge.wait_listening()
        cloud = Daemon("cloud-agent", "kvwire.cloud_agent", [*common, "--edge", edge.grpc_address])
        cloud.wait_listening()
        log(
            f"edge-agent: gRPC {edge.grpc_address}, HTTP {edge.http_url}; cloud-agent: {cloud.http_url} "
            f"(up in {time.perf_counter() - started:.1f} s)"
        )
        with httpx.Client(timeout=600) as documents:
            reply = documents.put(
                f"{edge.http_url}/v1/documents/{DEMO_DOC}",
                content=data["context"].encode(),
                headers={"content-type": "text/plain; charset=utf-8"},
            )
            if reply.status_code not in (200, 201):
                raise RuntimeError(f"PUT /v1/documents/{DEMO_DOC} returned {reply.status_code}: {reply.text}")
        asked: list[dict] = []
        with httpx.Client(base_url=cloud.http_url, timeout=600) as client:
            second = data["questions"][(question_index + 1) % len(data["questions"])]
            for q in (question, second):  # the document's prefill happens once, for the first
                body = {"question": q, "doc_id": DEMO_DOC, "mode": "kv", "profile": DEFAULT_PROFILE}
                body.update(max_new_tokens=max_new_tokens)
                asked.append(body)
            asked += demo_requests(question, data["context"], retention, max_new_tokens)
            for body in asked:
                reply = client.post("/answer", json=body)
                if reply.status_code != 200:
                    raise RuntimeError(f"/answer ({body['mode']}) returned {reply.status_code}: {reply.text}")
                results.append({**reply.json(), "request": body})
        results = results[2:] + results[:2]  # kv, scout, text first; then the two document answers
    finally:
        for daemon in (cloud, edge):
            if daemon is not None:
                daemon.terminate()
        codes = {"cloud-agent": cloud.stop() if cloud else None, "edge-agent": edge.stop()}
        shutil.rmtree(data_dir, ignore_errors=True)
    results.append({"exit_codes": codes})
    return results


def print_report(question: str, results: list[dict], log=print) -> None:
    log(f"\nQ: {question}")
    for r in results:
        if "exit_codes" in r or "doc_id" in r["request"]:
            continue
        req = r["request"]
        setting = (
            "full prompt, cloud prefill"
            if r["mode"] == "text"
            else (
                f"every context position, {req['profile']}"
                if r["mode"] == "kv"
                else f"q2c {req['retention']:.0%}, ids + positions only"
            )
        )
        log(f"  {r['mode']:<5} ({setting}): {r['answer']!r}")
        log(
            f"        {r['bytes_on_wire']:>10,} bytes on the wire, ratio {r['wire_ratio']:.4f} of FP16 KV, "
            f"kept {r['kept_positions']}/{r['prompt_tokens'] - 1} positions ({r['context_tokens']} context tokens)"
        )
    docs = [r for r in results if "doc_id" in r.get("request", {})]
    if docs:
        first, second = (r["timings_ms"]["edge_prefill"] for r in docs)
        log(f"\ndocument {DEMO_DOC!r} registered on the edge, asked by doc_id (kv at the defaults, {DEFAULT_PROFILE}):")
        for r in docs:
            log(f"  Q: {r['request']['question']}  ->  {r['answer']!r}")
            t = r["timings_ms"]
            log(f"        edge prefill {t['edge_prefill']:.1f} ms (question only: {t['edge_question_prefill']:.1f} ms)")
        log(f"  the second question came from the cached document: {first - second:.1f} ms of edge prefill saved")
    log("\nstage timings (ms)")
    log(f"  {'mode':<6}" + "".join(f"{s:>13}" for s in STAGES))
    for r in results:
        if "timings_ms" in r:
            label = "doc" if "doc_id" in r["request"] else r["mode"]
            log(f"  {label:<6}" + "".join(f"{r['timings_ms'][s]:>13.1f}" for s in STAGES))
    log("\nratio = bytes on the wire / FP16 KV bytes of the full prompt; edge_prefill/select/encode ran on the edge,")
    log("prefill is the cloud's own prefill (scout, text); generate includes first_token.")
    codes = results[-1]["exit_codes"]
    log("stopped: " + ", ".join(f"{name} (exit {code})" for name, code in codes.items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kvwire.bench.loopback_demo",
        description=__doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model", default="embedded", help="model folder or hub id for both daemons (default: embedded)"
    )
    parser.add_argument("--question", type=int, default=0, help="index of the demo question (0-2, default 0)")
    parser.add_argument(
        "--retention",
        type=float,
        default=0.5,
        help="share of context positions kept in scout mode (default 0.5; kv mode keeps them all, its default)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=24, help="answer length cap (default 24)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per daemon (default 1: both daemons share this host; 0: torch's default)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the /answer bodies as JSON lines instead of a report"
    )
    args = parser.parse_args(argv)
    try:
        results = run_demo(args.model, args.question, args.retention, args.max_new_tokens, args.threads)
    except RuntimeError as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
    if args.json:
        for r in results:
            print(json.dumps(r))
    else:
        data = json.loads(resources.files("kvwire.kvcodec").joinpath("data/demo.json").read_text())
        print_report(data["questions"][args.question], results)
    return 0 if all(code == 0 for code in results[-1]["exit_codes"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
