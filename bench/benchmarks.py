"""`kvwire bench`: the benchmark subcommands (wire-size, codec, encodings, kernels, link, vllm). They print figures; they never pass or fail.

Each benchmark is one entry of BENCHES: its help line, its arguments, and a runner that imports
the benchmark module only when that benchmark runs, so `kvwire bench --help` loads no torch.
With --json, stdout carries only the JSON (a list of row objects); notes go to stderr.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable

from kvwire.bench.geometries import GEOMETRIES


def _add_profile_filter(p) -> None:
    p.add_argument(
        "--profile",
        action="append",
        dest="profiles",
        metavar="NAME",
        help="only this precision profile (repeatable; default: every named profile)",
    )


def _emit(rows: list[dict], as_json: bool, table: str) -> None:
    print(json.dumps(rows, indent=1) if as_json else table)


def _note(text: str, as_json: bool) -> None:
    print(text, file=sys.stderr if as_json else sys.stdout)


# ---- wire-size ------------------------------------------------------------------------------


def _wire_size_args(p) -> None:
    p.add_argument(
        "--geometry",
        default="qwen2.5-7b",
        choices=list(GEOMETRIES),
        help="KV geometry of the synthetic rows (default qwen2.5-7b)",
    )
    p.add_argument("--tokens", type=int, default=4096, help="prompt length of the synthetic rows (default 4096)")
    p.add_argument(
        "--entropy-tokens",
        type=int,
        default=512,
        help="context tokens of real passages prefilled on the embedded model for the zstd rows "
        "(default 512; 0 skips the zstd rows and the model)",
    )
    p.add_argument(
        "--model", default=None, help="model for the zstd rows (default: the embedded SmolLM2-135M-Instruct)"
    )
    _add_profile_filter(p)
    p.add_argument("--json", action="store_true", help="print the rows as one JSON list")


def _wire_size_run(args) -> int:
    from kvwire.bench import wire_size as ws

    rows = ws.measure_synthetic(args.geometry, args.tokens, args.profiles)
    note = ""
    if args.entropy_tokens > 0:
        real, note = ws.measure_real(args.entropy_tokens, args.profiles, model=args.model)
        rows += real
    _emit(rows, args.json, ws.format_rows(rows))
    _note("\nratio = bytes on the wire (header + chunks + trailer) / FP16 KV bytes of the full prompt", args.json)
    _note(ws.format_targets(ws.check_targets(rows, args.geometry), args.geometry), args.json)
    if note:
        _note(note, args.json)
        _note(ws.format_verdicts(ws.zstd_verdicts(rows)), args.json)
    return 0


# ---- codec ----------------------------------------------------------------------------------


def _codec_args(p) -> None:
    p.add_argument(
        "--geometry", default="qwen2.5-7b", choices=list(GEOMETRIES), help="heads and head_dim (default qwen2.5-7b)"
    )
    p.add_argument("--layers", type=int, default=4, help="layers of that geometry to encode (default 4)")
    p.add_argument("--tokens", type=int, default=1024, help="streamed positions (default 1024)")
    p.add_argument(
        "--repeats", type=int, default=5, help="timed repeats per profile; the median is reported (default 5)"
    )
    p.add_argument(
        "--dtype",
        default="fp32",
        choices=["fp32", "fp16", "bf16"],
        help="dtype of the KV encoded from and decoded into (default fp32, the CPU model dtype)",
    )
    p.add_argument("--device", default="cpu", help="torch device of the KV (default cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's default)")
    p.add_argument("--zstd", action="store_true", help="also time every profile with the zstd stage on")
    _add_profile_filter(p)
    p.add_argument("--json", action="store_true", help="print the rows as one JSON list")


def _codec_run(args) -> int:
    from kvwire.bench import codec_bench as cb

    rows = cb.measure(
        args.geometry,
        args.layers,
        args.tokens,
        args.repeats,
        args.dtype,
        args.device,
        args.profiles,
        ("none", "zstd") if args.zstd else ("none",),
        args.threads,
    )
    _emit(rows, args.json, cb.format_rows(rows))
    r = rows[0]
    _note(
        f"\n{r['geometry']}, {r['tokens']} positions, {r['dtype']} on {r['device']}, {r['threads']} thread(s): "
        f"{r['fp16_mb']:.2f} MB of FP16 KV; "
        f"median of {r['repeats']} repeats; x/clone = time / torch.clone of the same tensors in this run",
        args.json,
    )
    return 0


# ---- encodings ------------------------------------------------------------------------------


def _encodings_args(p) -> None:
    p.add_argument("--examples", type=int, default=8, help="SQuAD sample questions to prefill (default 8)")
    p.add_argument(
        "--answer-tokens", type=int, default=16, help="full-KV answer tokens teacher-forced per question (default 16)"
    )
    p.add_argument("--model", default=None, help="model (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: steady on a shared machine)")
    p.add_argument(
        "--profile",
        action="append",
        dest="profiles",
        metavar="NAME",
        help="only this precision profile or profile file (repeatable; default: every integer encoding's "
        "uniform profile, mixed-int4 and kivi-4/3/2)",
    )
    p.add_argument("--json", action="store_true", help="print the rows as one JSON list")


def _encodings_run(args) -> int:
    from kvwire.bench import encoding_error as ee

    rows, note = ee.measure(args.examples, args.answer_tokens, args.profiles, args.model, args.threads)
    _emit(rows, args.json, ee.format_rows(rows))
    _note("\n" + note + "; mean ± standard error over the questions", args.json)
    return 0


# ---- kernels --------------------------------------------------------------------------------


def _kernels_args(p) -> None:
    p.add_argument("--json", action="store_true", help="print the figures as JSON")


def _kernels_run(args) -> int:
    from kvwire.bench import kernels_bench

    kernels_bench.run(args.json)
    return 0


# ---- link -----------------------------------------------------------------------------------


def _link_args(p) -> None:
    p.add_argument(
        "--bandwidth",
        default="10mbit,100mbit,1gbit",
        help="comma list of tc rates the link is shaped to in turn (default 10mbit,100mbit,1gbit)",
    )
    p.add_argument(
        "--delay",
        default="20ms",
        help="delay bench.relay adds each way between cloud and edge (default 20ms; 0: no relay)",
    )
    p.add_argument("--tokens", default="512,2048", help="comma list of context lengths in tokens (default 512,2048)")
    p.add_argument(
        "--modes",
        default="all",
        metavar="LIST",
        help="comma list of text, kv-fp16, kv-mixed-int4, kv-q2c0.5-mixed-int4, scout-sparse-q2c0.5, "
        "scout-full-q2c0.5 (default all; text is always run: every ratio divides by it)",
    )
    p.add_argument(
        "--cases",
        default="cold,cached",
        metavar="LIST",
        help="comma list of cold (context inline, the edge's prefix cache off) and cached (a document "
        "registered on the edge and prefilled before the questions, asked by doc_id) (default both)",
    )
    p.add_argument(
        "--questions",
        type=int,
        default=20,
        help="the many-questions workload: this many questions about one cached document, in every mode, "
        "with each daemon's CPU seconds per answer (default 20; 0 skips it)",
    )
    p.add_argument(
        "--qa-tokens",
        type=int,
        default=2048,
        help="the workload's document: as many whole paragraphs of one SQuAD article as fit in this many tokens "
        "(default 2048)",
    )
    p.add_argument(
        "--qa-bandwidth", default="100mbit", help="tc rate of the link during the workload (default 100mbit)"
    )
    p.add_argument(
        "--qa-data",
        default="squad-dev",
        help="the workload's questions: squad-dev (`kvwire data fetch`), squad-sample or a SQuAD .json path "
        "(default squad-dev: several questions per paragraph)",
    )
    p.add_argument(
        "--repeats", type=int, default=1, help="requests per mode and cell; the median is reported (default 1)"
    )
    p.add_argument(
        "--model", default="embedded", help="model of both daemons (default: the embedded SmolLM2-135M-Instruct)"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of EACH daemon (default 1: the two share this machine's cores, as two hosts "
        "would each have their own)",
    )
    p.add_argument("--max-new-tokens", type=int, default=16, help="answer length cap (default 16)")
    p.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        help="seconds one request may take, also its edge-stream deadline (default 300)",
    )
    p.add_argument(
        "--quality-table",
        default=None,
        metavar="PATH",
        help="the clouds' --quality-table for mode auto, and the report's: its oracle is the fastest fixed mode "
        "whose quality there is >= 0.95 (default: the table shipped for the model)",
    )
    p.add_argument(
        "--rate-change",
        default=None,
        metavar="BEFORE:AFTER",
        help="after the grid, on the cached pair: auto requests at tc rate BEFORE, then the rate is replaced by "
        "AFTER under the running daemons and auto asked again (e.g. 1gbit:10mbit); the requests until auto "
        "switches and their latency (default: not run)",
    )
    p.add_argument(
        "--rate-change-requests",
        default="5:10",
        metavar="BEFORE:AFTER",
        help="auto requests before and after the rate change, each in [1, 100] (default 5:10)",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help='print the rows as one JSON list (the grid\'s rows, "table": "link", then the workload\'s, '
        '"table": "questions", each with its "document", then the rate change\'s requests, "table": "rate_change")',
    )


def _link_run(args) -> int:
    from kvwire.bench import link
    from kvwire.bench.netlab import NetlabUnavailable

    modes = list(link.MODES) if args.modes == "all" else link.parse_modes(args.modes)
    cfg = link.LinkConfig(
        bandwidths=link.parse_bandwidths(args.bandwidth),
        delay_ms=link.parse_delay(args.delay),
        tokens=link.parse_tokens(args.tokens),
        modes=modes,
        repeats=args.repeats,
        model=args.model,
        threads=args.threads,
        max_new_tokens=args.max_new_tokens,
        timeout_s=args.timeout,
        cases=link.parse_cases(args.cases),
        questions=args.questions,
        qa_tokens=args.qa_tokens,
        qa_bandwidth=args.qa_bandwidth,
        qa_data=args.qa_data,
        quality_table=args.quality_table,
        rate_change=link.parse_rate_change(args.rate_change) if args.rate_change else None,
        rate_change_requests=link.parse_counts(args.rate_change_requests),
    )
    try:
        res = link.run_link(cfg, progress=lambda line: print(line, file=sys.stderr, flush=True))
    except NetlabUnavailable as exc:
        print(f"kvwire bench link: the network lab cannot run here: {exc}", file=sys.stderr)
        return 2
    from kvwire.bench import link_report as rep

    questions = [{**r, "document": res.question_meta} for r in res.question_rows]
    change = [{"table": "rate_change", **s} for s in res.rate_change]
    _emit(res.rows + questions + change, args.json, rep.format_rows(res.rows))
    _note("\n" + "\n".join(f"- {line}" for line in rep.verdicts(res.rows)), args.json)
    _note("\n" + "\n".join(f"- {line}" for line in rep.target_verdicts(res.rows)), args.json)
    if any(r["mode"] == rep.AUTO for r in res.rows):
        _note("\n" + rep.format_auto(res.rows), args.json)
        _note("\n" + "\n".join(f"- {line}" for line in rep.auto_verdicts(res.rows)), args.json)
    if res.rate_change:
        _note("\n" + rep.format_rate_change(res.rate_change), args.json)
    if res.question_rows:
        _note("\n" + rep.format_questions(res.question_rows, res.question_meta), args.json)
    _note("\n" + link.describe(cfg), args.json)
    return 0


# ---- vllm -----------------------------------------------------------------------------------


def _vllm_args(p) -> None:
    p.add_argument("part", choices=["quality", "concurrency"], help="which comparison of the engines")
    p.add_argument("--model", default=None, help="model folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--data", default="squad-dev", help="QA data (default squad-dev: run `kvwire data fetch`)")
    p.add_argument("--questions", type=int, default=20, help="quality: questions (default 20)")
    p.add_argument(
        "--retention", type=float, action="append", dest="retentions", help="quality: repeatable (default 1, 0.5, 0.25)"
    )
    p.add_argument("--levels", default="1,4,16", help="concurrency: concurrent requests per run (default 1,4,16)")
    p.add_argument("--kv-retention", type=float, default=1.0, help="concurrency: retention of the kv streams")
    p.add_argument("--profile", default="fp32", help="precision profile of the streams (default fp32: no codec loss)")
    p.add_argument("--vllm-dtype", default="fp32", help="vLLM's dtype (default fp32: the hf engine's)")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--worker-log", default=None, help="file for the vLLM worker's log")
    p.add_argument("--json", action="store_true", help="print the rows as one JSON list")


def _vllm_run(args) -> int:
    from kvwire.bench import vllm_bench as vb
    from kvwire.cloud_agent.vllm_engine.client import default_python, unavailable_reason

    reason = unavailable_reason(default_python())
    if reason:
        print(f"kvwire bench vllm: the vLLM venv is unavailable: {reason}", file=sys.stderr)
        return 2
    progress = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    engines = vb.start(args.model, args.vllm_dtype, log_file=args.worker_log)
    try:
        if args.part == "quality":
            rows = vb.quality(
                engines,
                args.data,
                args.questions,
                args.retentions or [1.0, 0.5, 0.25],
                args.profile,
                args.max_new_tokens,
                progress,
            )
        else:
            levels = [int(n) for n in args.levels.split(",")]
            rows = vb.concurrency(
                engines, args.data, levels, args.kv_retention, args.profile, args.max_new_tokens, progress
            )
    finally:
        engines.close()
    _emit(rows, args.json, vb.format_rows(rows))
    return 0


# name -> (help, add_arguments, run)
BENCHES: dict[str, tuple[str, Callable, Callable]] = {
    "wire-size": (
        "bytes on the wire and ratio to FP16 KV per profile x retention; zstd on real KV",
        _wire_size_args,
        _wire_size_run,
    ),
    "codec": ("encode/decode time per MB of FP16 KV per profile, against torch.clone", _codec_args, _codec_run),
    "encodings": (
        "K/V reconstruction error, teacher-forced KL and top-1 agreement per profile on a real model's KV",
        _encodings_args,
        _encodings_run,
    ),
    "kernels": (
        "quantize/pack, unpack/dequantize and q2c kernel timings (bench/kernels_bench.py)",
        _kernels_args,
        _kernels_run,
    ),
    "link": (
        "time to first token and total latency per mode over a shaped link, as ratios to text mode",
        _link_args,
        _link_run,
    ),
    "vllm": (
        "the cloud's hf and vllm engines: answer quality of pruned KV (absolute vs re-rotated positions), "
        "answers/s and time to first token at N concurrent kv requests",
        _vllm_args,
        _vllm_run,
    ),
}


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="bench", metavar="BENCH", required=True)
    for name, (help_text, add, _) in BENCHES.items():
        add(sub.add_parser(name, help=help_text, description=help_text))


def run(args) -> int:
    return BENCHES[args.bench][2](args)
