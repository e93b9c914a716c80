"""The vLLM worker: one vLLM engine (continuous batching, paged KV) with the KVWire connector, run as a
child process of the cloud-agent in the .venv-vllm interpreter (`python -m kvwire.cloud_agent.vllm_engine.worker`).

It speaks JSON lines on two pipes the parent passes (--requests-fd, --replies-fd; vLLM logs to stdout
and stderr, so those are never the channel):
  request  {"op": "generate", "id": ID, "prompt": [ids], "kv": PATH|null, "max_tokens": N,
            "temperature": T, "top_p": P, "seed": S|null, "stop": [ids]}
           {"op": "abort", "id": ID}
  reply    {"ready": true, "block_size": B, "start_s": S}   once, when the engine can take requests
           {"id": ID, "tokens": [new ids], "done": bool, "finish": REASON|null, "cached": N}
`cached`: prompt tokens vLLM did not compute (the connector's injected ones). The engine steps whenever
a request is unfinished; between steps it takes every request that has arrived, so requests that come
while others generate join the running batch.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import threading
import time

CONNECTOR = "KVWireConnector"
CONNECTOR_MODULE = "kvwire.cloud_agent.vllm_engine.connector"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="local model folder")
    p.add_argument("--requests-fd", type=int, required=True)
    p.add_argument("--replies-fd", type=int, required=True)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    return p.parse_args(argv)


def build_engine(args):
    from vllm import EngineArgs, LLMEngine
    from vllm.config import KVTransferConfig

    engine_args = EngineArgs(
        model=args.model,
        dtype=args.dtype,
        block_size=args.block_size,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        tensor_parallel_size=args.tensor_parallel_size,
        gpu_memory_utilization=args.gpu_memory_utilization,
        # a cached block is keyed by token ids alone: injected KV (computed by the edge, maybe with pruned
        # context in view) must never serve another request's plain prefill of the same ids, or the reverse
        enable_prefix_caching=False,
        enforce_eager=True,
        kv_transfer_config=KVTransferConfig(
            kv_connector=CONNECTOR, kv_connector_module_path=CONNECTOR_MODULE, kv_role="kv_consumer"
        ),
    )
    return LLMEngine.from_engine_args(engine_args)


def sampling(req: dict):
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    extra = {"kv_transfer_params": {"kvwire_kv": req["kv"]}} if req.get("kv") else None
    return SamplingParams(
        max_tokens=int(req["max_tokens"]),
        temperature=float(req.get("temperature", 0.0)),
        top_p=float(req.get("top_p", 1.0)),
        seed=req.get("seed"),
        stop_token_ids=list(req.get("stop", [])),
        ignore_eos=False,
        detokenize=False,
        skip_special_tokens=False,
        output_kind=RequestOutputKind.DELTA,
        extra_args=extra,
    )


def serve(engine, inbox: queue.Queue, send) -> None:
    """Step the engine while anything runs; take new requests between steps; reply with token deltas."""
    from vllm.inputs import TokensPrompt

    from kvwire.kvcodec.handoff import handoff_token_ids

    running: set[str] = set()
    while True:
        block = not engine.has_unfinished_requests()
        while True:
            try:
                msg = inbox.get(block=block)
            except queue.Empty:
                break
            block = False
            if msg is None:  # the parent closed the pipe
                return
            if msg["op"] == "generate":
                try:
                    if msg.get("kv"):  # a missing or foreign file is refused here, not raised inside a step
                        handoff_token_ids(msg["kv"])
                    engine.add_request(msg["id"], TokensPrompt(prompt_token_ids=msg["prompt"]), sampling(msg))
                    running.add(msg["id"])
                except Exception as exc:  # noqa: BLE001 - a bad request fails alone, the engine keeps serving
                    send({"id": msg["id"], "tokens": [], "done": True, "finish": "error", "error": str(exc)})
            elif msg["op"] == "abort" and msg["id"] in running:
                engine.abort_request([msg["id"]])
                running.discard(msg["id"])
                send({"id": msg["id"], "tokens": [], "done": True, "finish": "cancelled", "cached": 0})
        if not engine.has_unfinished_requests():
            continue
        for out in engine.step():
            if out.request_id not in running:
                continue
            c = out.outputs[0]
            if out.finished:
                running.discard(out.request_id)
            send(
                {
                    "id": out.request_id,
                    "tokens": list(c.token_ids),
                    "done": bool(out.finished),
                    "finish": c.finish_reason,
                    "cached": int(out.num_cached_tokens or 0),
                }
            )


def main(argv=None) -> None:
    args = parse_args(argv)
    started = time.monotonic()
    replies = os.fdopen(args.replies_fd, "w", buffering=1)
    lock = threading.Lock()

    def send(obj: dict) -> None:
        with lock:
            replies.write(json.dumps(obj) + "\n")

    inbox: queue.Queue = queue.Queue()

    def read() -> None:
        with os.fdopen(args.requests_fd, "r") as requests:
            for line in requests:
                if line.strip():
                    inbox.put(json.loads(line))
        inbox.put(None)

    engine = build_engine(args)
    threading.Thread(target=read, name="kvwire-requests", daemon=True).start()
    send({"ready": True, "block_size": args.block_size, "start_s": round(time.monotonic() - started, 3)})
    serve(engine, inbox, send)


if __name__ == "__main__":
    main()
