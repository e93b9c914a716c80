"""`kvwire demo`: the codec on the embedded model, at a few settings, against the full-cache answer.

The model and the pipeline are imported in run(), so `kvwire demo --help` loads no torch.
"""

from __future__ import annotations

import json
import time
from importlib import resources

SETTINGS = [  # (profile, selector, retention)
    ("fp16", "q2c", 1.0),
    ("int8", "q2c", 1.0),
    ("mixed-int4", "q2c", 1.0),
    ("int8", "q2c", 0.5),
    ("mixed-int4", "q2c", 0.5),
]


def add_arguments(p) -> None:
    p.add_argument("--model", default=None, help="model folder or hub id (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--max-new-tokens", type=int, default=24, help="answer length cap (default 24)")
    p.add_argument("--questions", type=int, default=1, help="how many of the demo questions to ask (1-3, default 1)")
    p.add_argument("--json", action="store_true", help="print one JSON object per row instead of a table")


def run(args) -> int:
    from kvwire.kvcodec.models import load_model
    from kvwire.kvcodec.pipeline import Cloud, Edge, EdgeRequest, Timings

    data = json.loads(resources.files("kvwire.kvcodec").joinpath("data/demo.json").read_text())
    started = time.perf_counter()
    loaded = load_model(args.model)
    print(f"model: {loaded.source} (loaded in {time.perf_counter() - started:.1f} s)")
    edge, cloud = Edge(loaded), Cloud(loaded)
    context = data["context"]
    for question in data["questions"][: max(1, args.questions)]:
        full = cloud.answer_text(context, question, args.max_new_tokens)
        print(
            f"\nQ: {question}\nfull-cache answer: {full.text!r}  (prompt {full.prompt_len} tokens, {full.context_tokens} of context)"
        )
        if not args.json:
            print(
                f"{'profile':<11} {'selector':<8} {'retention':>9} {'bytes':>10} {'ratio':>7} {'kept':>5} {'same':>5}  answer"
            )
        for profile, selector, retention in SETTINGS:
            timings = Timings()
            frames = list(edge.stream(EdgeRequest(context, question, "kv", selector, retention, profile), timings))
            answer = cloud.answer(cloud.receive(frames, timings), args.max_new_tokens, timings)
            same = answer.tokens == full.tokens
            row = {
                "question": question,
                "profile": profile,
                "selector": selector,
                "retention": retention,
                "bytes": answer.bytes_on_wire,
                "wire_ratio": round(answer.wire_ratio, 4),
                "kept": answer.kept_positions,
                "same_as_full": same,
                "answer": answer.text,
                "timings_ms": timings.ms(),
            }
            if args.json:
                print(json.dumps(row))
            else:
                print(
                    f"{profile:<11} {selector:<8} {retention:>9.2f} {answer.bytes_on_wire:>10,} {answer.wire_ratio:>7.3f} "
                    f"{answer.kept_positions:>5} {'yes' if same else 'no':>5}  {answer.text!r}"
                )
    print(
        "\nratio = bytes on the wire / FP16 KV bytes of the full prompt; same = answer identical to the full-cache answer"
    )
    return 0
