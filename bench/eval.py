"""`kvwire eval`: answer quality against bytes on the wire, over a QA data set, for every
(selector, retention, profile) setting, through the pipeline the daemons use.

Writes to --out: records.jsonl (one answer per line; a rerun skips what is there), results.json (the
aggregated rows), results.md (tables), pareto.png, and run.json (configuration and runtime).
Shards (--shard K/N) may run at once on one --out: records are appended under a file lock, the
summary files are written whole (tmp + rename) under the folder's lock (bench/run_dir.py), and a
report built before every answer is on disk says PARTIAL; the last shard to finish writes the
complete one. The options are defined in bench/eval_args.py (light, for `kvwire eval --help`).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from kvwire.bench.data import load_examples, needle_set, pick
from kvwire.bench.eval_report import frontier_text, markdown_table, pareto_plot, partial_note
from kvwire.bench.evaluator import (
    DEFAULT_FIXED,
    TEXT,
    Evaluator,
    RecordStore,
    Setting,
    baselines,
    completeness,
    make_setting,
    scout_setting,
    summarize,
)
from kvwire.bench.run_dir import locked, replacing, write_atomic
from kvwire.kvcodec.errors import ConfigError
from kvwire.kvcodec.prompt import DEFAULT_INSTRUCTION
from kvwire.kvcodec.selectors import selector_names
from kvwire.kvcodec.stream import FIXED_SOURCES

log = logging.getLogger(__name__)

# Keys of run.json that change answers: a resumed run must match them. limit and settings may change.
RUN_KEYS = (
    "model_fingerprint",
    "dtype",
    "data",
    "shuffle",
    "seed",
    "needle",
    "needle_depths",
    "max_new_tokens",
    "instruction",
)


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def parse_settings(args) -> list[Setting]:
    """Baselines, then the grid selectors x retentions x profiles, then --setting extras; deduplicated."""
    settings = baselines()
    for profile in _csv(args.profiles):
        for retention in (float(r) for r in _csv(args.retentions)):
            for selector in selector_names() if args.selectors == "all" else _csv(args.selectors):
                for fixed in _csv(args.fixed):
                    settings.append(make_setting(selector, retention, profile, fixed))
                    for how in _csv(args.scout):  # the same selection sent as positions only
                        settings.append(scout_setting(selector, retention, how, fixed))
    for spec in (s for item in args.setting for s in _csv(item)):
        spec, fixed = split_fixed(spec)
        parts = spec.split(":", 2)  # a profile path may itself hold a colon
        if len(parts) != 3:
            raise ConfigError(
                f"--setting {spec!r}: expected SELECTOR:RETENTION:PROFILE[:T/Q], e.g. q2c:0.5:mixed-int4 or "
                "none:1:int8:cloud/cloud"
            )
        try:
            retention = float(parts[1])
        except ValueError:
            raise ConfigError(f"--setting {spec!r}: retention {parts[1]!r} is not a number") from None
        settings.append(make_setting(parts[0], retention, parts[2], fixed))
    return _dedupe(settings)


def split_fixed(spec: str) -> tuple[str, str]:
    """(the spec without it, the fixed positions) of a --setting that may end in :T/Q (e.g. :cloud/cloud)."""
    head, sep, tail = spec.rpartition(":")
    parts = tail.split("/")
    if sep and len(parts) == 2 and all(p in FIXED_SOURCES for p in parts):
        return head, tail
    return spec, DEFAULT_FIXED


def _dedupe(settings: list[Setting]) -> list[Setting]:
    seen, out = set(), []
    for s in settings:
        if s.key not in seen:
            seen.add(s.key)
            out.append(s)
    return out


def load_questions(args, tokenizer) -> list:
    pool = load_examples(args.data)
    chosen = pick(pool, args.limit or None, shuffle=not args.no_shuffle, seed=args.seed)
    if not args.needle:
        return chosen
    lengths = [int(x) for x in _csv(args.needle)]
    depths = [float(x) for x in _csv(args.needle_depths)]
    return needle_set(chosen, pool, tokenizer, lengths, depths, seed=args.seed)


def parse_shard(text: str) -> tuple[int, int]:
    if not text:
        return 0, 1
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard {text!r}: expected K/N, e.g. 0/2") from None
    if not 0 <= k < n:
        raise ConfigError(f"--shard {text!r}: K must be in 0..N-1")
    return k, n


def set_threads(threads: int) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def check_resume(out: Path, config: dict) -> None:
    """ConfigError if --out holds a run whose answers would differ from this one's."""
    path = out / "run.json"
    if not path.is_file():
        return
    old = json.loads(path.read_text()).get("config", {})
    diff = [k for k in RUN_KEYS if k in old and old[k] != config[k]]
    if diff:
        raise ConfigError(
            f"{out} holds a run with different {', '.join(diff)} "
            f"({'; '.join(f'{k}: {old[k]!r} -> {config[k]!r}' for k in diff)}): use another --out"
        )


def start_run(out: Path, args, loaded, evaluator: Evaluator, **extra) -> dict:
    """The run's config (what must match for `--out` to resume it): checked against an existing run,
    then written to run.json. eval and diagnose share every key but their own `extra`."""
    config = {
        "model": loaded.source,
        "model_fingerprint": evaluator.edge.model_fp,
        "dtype": args.dtype,
        "device": args.device,
        "data": args.data,
        "limit": args.limit,
        "shuffle": not args.no_shuffle,
        "seed": args.seed,
        "needle": "",
        "needle_depths": "",
        "max_new_tokens": args.max_new_tokens,
        "instruction": DEFAULT_INSTRUCTION,
        **extra,
    }
    with locked(out):  # a shard starting beside another reads its run.json whole, never mid-write
        check_resume(out, config)
        path = out / "run.json"
        old = json.loads(path.read_text()) if path.is_file() else {}
        write_atomic(path, json.dumps({**old, "config": config}, indent=1))
    return config


def _engine(args, loaded):
    """None for the hf engine (the evaluator makes it); the vllm engine with its worker started."""
    if args.engine == "hf":
        return None
    from kvwire.cloud_agent.engines.vllm import VllmEngine
    from kvwire.cloud_agent.vllm_engine.client import VllmWorker
    from kvwire.kvcodec.pipeline import Cloud

    return VllmEngine(Cloud(loaded), worker=VllmWorker(loaded.source, dtype=args.vllm_dtype))


def run(args) -> int:
    from tqdm import tqdm

    from kvwire.kvcodec.models import load_model

    settings = parse_settings(args)
    if args.measure == "tf" and args.engine != "hf":  # refused before a worker starts (the evaluator refuses too)
        raise ConfigError(f"--measure tf scores the hf engine's cache; --engine {args.engine} answers only")
    out = Path(args.out)
    started = time.perf_counter()
    set_threads(args.threads)
    loaded = load_model(args.model, dtype=args.dtype, device=args.device)
    questions = load_questions(args, loaded.tokenizer)
    store = RecordStore(out / "records.jsonl")
    engine = _engine(args, loaded)
    evaluator = Evaluator(loaded, args.max_new_tokens, store, source=args.data, engine=engine, measure=args.measure)
    needle = {"needle": args.needle, "needle_depths": args.needle_depths if args.needle else ""}
    if args.engine != "hf":  # runs of the hf engine keep the config they always had (and resume)
        needle["engine"] = f"{args.engine} {args.vllm_dtype}"
    config = start_run(out, args, loaded, evaluator, settings=[s.key for s in settings], **needle)

    k, n = parse_shard(args.shard)
    todo = [q for i, q in enumerate(questions) if i % n == k and evaluator.pending(q, settings)]
    log.info(
        "%d questions x %d settings; %d questions already done",
        len(questions),
        len(settings),
        len(questions) - len(todo),
    )
    computed, run_started = 0, time.perf_counter()
    try:
        for q in tqdm(todo, desc="kvwire eval", unit="question", mininterval=5, disable=not todo):
            evaluator.run_example(q, settings)
            computed += 1
    finally:
        store.close()
        if engine is not None:
            engine.close()
            engine.worker.close()
    wall = time.perf_counter() - run_started

    title = args.title or f"{Path(loaded.source).name} on {args.data}" + (" (needles)" if args.needle else "")
    lengths = sorted({q.meta["length"] for q in questions}) if args.needle else []
    count = (
        f"{len(questions)} needles ({len(questions) // len(lengths)} questions x {len(lengths)} lengths)"
        if lengths
        else f"{len(questions)} questions"
    )
    with locked(out):  # the other shards' answers as they are now, and one report at a time
        store.reload()
        done = completeness(store, questions, settings, args.measure)
        rows = summarize(store, questions, settings)
        runtime = runtime_summary(store, questions, settings, computed, wall, evaluator.prefills)
        note = partial_note(done, args.shard)
        table = markdown_table(rows) + frontier_text(rows)
        write_atomic(out / "results.json", json.dumps({**done, "rows": rows}, indent=1))
        write_atomic(out / "run.json", json.dumps({"config": config, "runtime": runtime, **done}, indent=1))
        write_atomic(
            out / "results.md",
            f"# {title}{' (PARTIAL)' if done['partial'] else ''}\n\n{note}{count}, answers capped at "
            f"{args.max_new_tokens} tokens.{MEASURE_NOTE if args.measure == 'tf' else ''}\n\n{table}\n"
            f"{runtime_text(runtime)}\n",
        )
        with replacing(out / "pareto.png") as tmp:
            pareto_plot(rows, tmp, title + (" (PARTIAL)" if done["partial"] else ""))
    print(note + table)
    print(runtime_text(runtime))
    if args.quality_table:
        write_quality_table(args, rows, done, loaded, title)
    print(f"wrote {out}/results.json, results.md, pareto.png ({time.perf_counter() - started:.0f} s in all)")
    return 0


MEASURE_NOTE = (
    " --measure tf: kv settings were scored teacher-forced only (no answer of their own: their F1 columns are"
    " empty unless an earlier run generated them)."
)


def write_quality_table(args, rows: list[dict], done: dict, loaded, title: str) -> None:
    """Mode auto's quality table from this run's rows; a partial run writes none (its rows would look final)."""
    from kvwire.bench.quality_table import quality_table

    if done["partial"]:
        print(f"no quality table written: the run is partial ({done['answers']} of {done['expected']} answers)")
        return
    data, skipped = quality_table(rows, args.quality_measure, Path(loaded.source).name, title)
    write_atomic(Path(args.quality_table), json.dumps(data, indent=1) + "\n")
    print(f"wrote the quality table {args.quality_table} ({len(data['rows'])} settings)")
    for line in skipped:
        print(f"  left out {line}")


def runtime_summary(
    store: RecordStore, questions, settings: list[Setting], computed: int, wall: float, prefills: int
) -> dict:
    """Seconds per question from the records (every answer's own wall time; shared prefills once)."""
    per_q, answers = [], 0
    for q in questions:
        recs = [store.get(q.id, s) for s in settings if s.selector != TEXT]
        recs = [r for r in recs if r is not None]
        if recs:
            per_q.append(sum(r["seconds"] for r in recs))
            answers += len(recs)
    total = sum(per_q)
    return {
        "questions": len(per_q),
        "answers_per_question": round(answers / len(per_q), 2) if per_q else 0,
        "seconds_per_question": round(total / len(per_q), 2) if per_q else None,
        "seconds_per_answer": round(total / answers, 3) if answers else None,
        "this_invocation": {
            "questions_computed": computed,
            "wall_s": round(wall, 1),
            "edge_prefills_per_question": round(prefills / computed, 2) if computed else None,
        },
    }


def runtime_text(rt: dict) -> str:
    if not rt["questions"]:
        return "no answers yet"
    return (
        f"Runtime: {rt['seconds_per_question']} s per question ({rt['answers_per_question']} answers each, "
        f"{rt['seconds_per_answer']} s per answer including its share of prefills), over {rt['questions']} "
        f"questions (a needle counts as a question)."
    )
