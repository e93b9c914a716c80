"""The evaluation core shared by `kvwire eval` and `kvwire diagnose`: settings, one question through
the daemons' pipeline at every setting, resumable per-answer records, and their aggregation.

Every compressed answer takes the path a daemon request takes: Edge.stream (prompt -> prefill ->
select -> encode -> frames; the prefill shared across a question's settings, bench/prefill_memo.py) -> Cloud.receive (verify, decode) -> Cloud.answer (cache, generate).
The reference ("full") is Cloud.answer_text: the model's own prefill of the whole prompt, no codec.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from kvwire.bench.data import Example
from kvwire.bench.eval_stats import bootstrap_pct, paired_se
from kvwire.bench.prefill_memo import PrefillMemo
from kvwire.bench.run_dir import complete_records
from kvwire.bench.squad_metrics import best_over_golds, exact_match, f1_score
from kvwire.bench.teacher_forcing import compare, forced_logprobs, fresh_cache
from kvwire.cloud_agent.engines.hf import HfEngine
from kvwire.kvcodec.errors import ConfigError
from kvwire.kvcodec.modes import get_mode
from kvwire.kvcodec.modes.scout import SCOUT_PREFILLS
from kvwire.kvcodec.pipeline import Cloud, Edge, EdgeRequest, Timings, fp16_kv_bytes
from kvwire.kvcodec.profiles import PrecisionProfile, get_profile
from kvwire.kvcodec.selectors import check_retention, get_selector
from kvwire.kvcodec.stream import DEFAULT_QUESTION_KV, DEFAULT_TEMPLATE_KV, FIXED_SOURCES

# what `kvwire eval --measure` computes per kv setting: its generated answer and teacher-forced scores, or
# the teacher-forced scores only (one forward pass instead of a generation; no F1 or agreement columns)
MEASURES = ("answers", "tf")

# baseline selectors; NONE: retention 1.0, no selection (every position in prompt order, nothing scored)
FULL, TEXT, NONE = "full", "text", "none"
BASELINE_PROFILE = "-"
DEFAULT_FIXED = f"{DEFAULT_TEMPLATE_KV}/{DEFAULT_QUESTION_KV}"


@dataclass(frozen=True)
class Setting:
    """One (selector, retention, profile) point; selector FULL/TEXT mark the baselines.

    profile: a PrecisionProfile (named, from a file, or built in memory by diagnose). The key names
    the profile and a hash of its content, so a resumed run never reuses answers of an edited profile.
    """

    selector: str
    retention: float
    profile: PrecisionProfile | None = None
    scout_prefill: str = ""  # set: a scout-mode setting (the cloud prefills "sparse" or "full"), no profile
    fixed: str = DEFAULT_FIXED  # TEMPLATE_KV/QUESTION_KV: where the fixed segments' KV comes from (stream or cloud)

    @property
    def fixed_suffix(self) -> str:
        """ "" for the default (everything streamed), else " fixed=T/Q": part of the key and the profile column."""
        return "" if self.fixed == DEFAULT_FIXED else f" fixed={self.fixed}"

    @property
    def is_baseline(self) -> bool:
        return self.selector in (FULL, TEXT)

    @property
    def profile_name(self) -> str:
        if self.scout_prefill:
            return f"scout-{self.scout_prefill}{self.fixed_suffix}"
        return self.profile.name + self.fixed_suffix if self.profile is not None else BASELINE_PROFILE

    @property
    def key(self) -> str:
        if self.scout_prefill:
            return f"{self.selector}:{self.retention:g}:scout-{self.scout_prefill}{self.fixed_suffix}"
        if self.profile is None:
            return f"{self.selector}:{self.retention:g}:{BASELINE_PROFILE}"
        digest = hashlib.sha256(
            json.dumps(self.profile.to_dict()["default"], sort_keys=True).encode()
            + json.dumps(self.profile.to_dict()["layers"], sort_keys=True).encode()
        ).hexdigest()[:8]
        return f"{self.selector}:{self.retention:g}:{self.profile.name}#{digest}{self.fixed_suffix}"

    @property
    def fixed_sources(self) -> tuple[str, str]:
        template, question = self.fixed.split("/")
        return template, question


def check_fixed(fixed: str) -> str:
    """A TEMPLATE_KV/QUESTION_KV pair (each stream or cloud), e.g. cloud/stream; ConfigError otherwise."""
    parts = fixed.split("/")
    if len(parts) != 2 or any(p not in FIXED_SOURCES for p in parts):
        raise ConfigError(
            f"fixed positions {fixed!r}: expected TEMPLATE/QUESTION, each one of {', '.join(FIXED_SOURCES)} "
            "(e.g. cloud/stream)"
        )
    return fixed


def make_setting(
    selector: str, retention: float, profile: str | PrecisionProfile, fixed: str = DEFAULT_FIXED
) -> Setting:
    """A validated setting; at retention 1.0 the selector is irrelevant and becomes NONE."""
    retention = check_retention(float(retention))
    if retention >= 1.0:
        selector = NONE
    else:
        get_selector(selector)
    return Setting(selector, retention, get_profile(profile), fixed=check_fixed(fixed))


def scout_setting(selector: str, retention: float, scout_prefill: str, fixed: str = DEFAULT_FIXED) -> Setting:
    """A validated scout-mode setting (selector, retention; the cloud's prefill sparse or full)."""
    if scout_prefill not in SCOUT_PREFILLS:
        raise ConfigError(f"scout prefill {scout_prefill!r}: use one of {', '.join(SCOUT_PREFILLS)}")
    retention = check_retention(float(retention))
    if retention < 1.0:
        get_selector(selector)
    return Setting(selector if retention < 1.0 else NONE, retention, None, scout_prefill, check_fixed(fixed))


def baselines() -> list[Setting]:
    return [Setting(FULL, 1.0), Setting(TEXT, 1.0)]


def run_order(settings: list[Setting]) -> list[Setting]:
    """Selectors that capture attention first, so retention-1.0 settings reuse their prefill."""
    return sorted(settings, key=lambda s: (s.is_baseline is False, s.retention >= 1.0, s.selector))


class RecordStore:
    """Answers already computed, one JSON object a line in DIR/records.jsonl, keyed by (example, setting).

    Several processes (eval's shards) may append to one file: each record is one write of one whole
    line under an exclusive lock of the file (fcntl.flock), and `reload` reads under a shared lock,
    so no reader sees another process's line half-written. A run killed mid-write leaves at most one
    torn last line, which is ignored and recomputed.
    """

    def __init__(self, path: Path):
        self.path = path
        self.records: dict[tuple[str, str], dict] = {}
        self._fd: int | None = None
        self.reload()

    def reload(self) -> None:
        """Read every complete record on disk, the other shards' included."""
        if not self.path.is_file():
            return
        with open(self.path, "rb") as fh:
            fcntl.flock(fh, fcntl.LOCK_SH)
            try:
                data = fh.read()
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
        for rec in complete_records(data.decode("utf-8", errors="replace")):
            self.records[(rec["example"], rec["setting"])] = rec

    def get(self, example_id: str, setting: Setting) -> dict | None:
        return self.records.get((example_id, setting.key))

    def add(self, rec: dict) -> None:
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        line = (json.dumps(rec) + "\n").encode("utf-8")
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            size = os.fstat(self._fd).st_size
            if size and _last_byte(self.path, size) != b"\n":
                line = b"\n" + line  # end a torn line so this record starts clean
            view = memoryview(line)
            while view:
                view = view[os.write(self._fd, view) :]
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        self.records[(rec["example"], rec["setting"])] = rec

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _last_byte(path: Path, size: int) -> bytes:
    with open(path, "rb") as fh:
        fh.seek(size - 1)
        return fh.read(1)


class Evaluator:
    """Runs questions through the pipeline at a list of settings and records one answer per setting.

    Every kv answer also gets teacher-forced scores against the full-KV answer (bench/teacher_forcing.py):
    the full cache's pass along the full answer is computed once per question and shared by all its
    settings; each setting adds one forward pass over its received cache. source: the data spec,
    recorded with every answer unless the example's own metadata names a source.
    """

    def __init__(
        self, loaded, max_new_tokens: int, store: RecordStore, source: str = "", engine=None, measure: str = "answers"
    ):
        """engine: the cloud engine that answers (cloud_agent/engines; None: the hf engine on a fresh Cloud)."""
        if measure not in MEASURES:
            raise ConfigError(f"measure {measure!r}: use one of {', '.join(MEASURES)}")
        self.loaded = loaded
        self.measure = measure
        self.edge = Edge(loaded)
        self.engine = engine if engine is not None else HfEngine(Cloud(loaded))
        self.cloud = self.engine.cloud
        if measure == "tf" and self.engine.name != "hf":
            raise ConfigError(
                f"--measure tf scores the hf engine's cache; the {self.engine.name} engine answers only (use "
                "--measure answers)"
            )
        self.geometry = self.edge.geometry
        self.max_new_tokens = max_new_tokens
        self.store = store
        self.source = source
        self.prefills = 0  # prefills run by the edge (the full baseline's own prefill not included)

    def pending(self, ex: Example, settings: list[Setting]) -> list[Setting]:
        return [s for s in settings if not measured(self.store.get(ex.id, s), self.measure)]

    def run_example(self, ex: Example, settings: list[Setting]) -> None:
        """Compute and record every setting of `ex` not yet recorded; the full baseline comes first
        because every other answer is compared with it."""
        full_setting = Setting(FULL, 1.0)
        full = self.store.get(ex.id, full_setting)
        if full is None:
            t0, timings = time.perf_counter(), Timings()
            ans = self.engine.answer_text(ex.context, ex.question, self.max_new_tokens, timings)
            full_bytes = fp16_kv_bytes(self.geometry, ans.prompt_len)
            full = self._record(ex, full_setting, ans.text, ans.tokens, None, full_bytes, 1.0, ans, timings, t0)
        memo = PrefillMemo(self.edge)
        reference = None  # the full cache's teacher-forced log-probabilities, computed when first needed
        for s in run_order(self.pending(ex, settings)):
            if s.selector == FULL:
                continue
            t0, timings = time.perf_counter(), Timings()
            if s.selector == TEXT:
                # mode text sends the question and passage; the cloud's own prefill of them is exactly
                # the full baseline's computation (same model), so its answer is the full answer
                text_bytes = get_mode("text").wire_bytes(ex.context, ex.question)  # as the cloud daemon counts them
                ratio = text_bytes / fp16_kv_bytes(self.geometry, full["prompt_len"])
                self._record_text(ex, s, full, text_bytes, ratio)
                continue
            selector = None if s.selector == NONE else s.selector
            mode, options = ("scout", {"scout_prefill": s.scout_prefill}) if s.scout_prefill else ("kv", None)
            template_kv, question_kv = s.fixed_sources
            req = EdgeRequest(
                ex.context,
                ex.question,
                mode,
                selector,
                s.retention,
                s.profile or "mixed-int4",
                template_kv=template_kv,
                question_kv=question_kv,
                scout_prefill=s.scout_prefill or "sparse",
            )
            frames = list(memo.stream(req, timings))
            received = self.cloud.receive(frames, timings)
            generate = self.measure == "answers" or not get_mode(mode).carries_kv
            ans = self.engine.answer(received, self.max_new_tokens, timings, options) if generate else None
            forced = None
            # scout's cache is the cloud's own prefill: no KV of the edge to score; the scores are of the hf cache
            if get_mode(mode).carries_kv and self.engine.name == "hf":
                t = time.perf_counter()
                if reference is None:
                    reference = self._reference(memo, req, full["tokens"])
                cache = get_mode("kv").cache(self.cloud, received)  # the cache the cloud generates from
                prompt_ids = self.edge.prompt(req).ids  # the header carries only the ids the cloud needs
                forced = compare(reference, forced_logprobs(self.loaded.model, cache, prompt_ids, full["tokens"]))
                timings.add("teacher_forced", time.perf_counter() - t)
            if ans is None:
                self._record_forced(ex, s, received, timings, t0, forced)
            else:
                self._record(
                    ex, s, ans.text, ans.tokens, full, ans.bytes_on_wire, ans.wire_ratio, ans, timings, t0, forced
                )
        self.prefills += memo.runs

    def _reference(self, memo: PrefillMemo, req: EdgeRequest, answer: list[int]):
        """The full cache's teacher-forced log-probabilities along the full answer (the memo's prefill
        of the prompt: the same KV the cloud's own prefill computes)."""
        prompt = self.edge.prompt(req)
        pre = memo.kv(prompt)
        return forced_logprobs(self.loaded.model, fresh_cache(pre.keys, pre.values), prompt.ids, answer)

    def _record(self, ex, s: Setting, text, tokens, full, nbytes, ratio, ans, timings, t0, forced=None) -> dict:
        rec = self._base(ex, s, text, tokens, full)
        rec.update(
            bytes=nbytes,
            wire_ratio=ratio,
            prompt_len=ans.prompt_len,
            context_tokens=ans.context_tokens,
            kept=ans.kept_positions,
            timings_ms=timings.ms(),
            seconds=round(time.perf_counter() - t0, 4),
        )
        if full is None:  # the reference against itself
            rec.update(tf_top1=1.0, tf_kl=0.0)
        elif forced is not None:
            rec.update(tf_top1=forced.top1, tf_kl=forced.kl, tf_positions=forced.positions)
        self.store.add(rec)
        return rec

    def _record_forced(self, ex, s: Setting, received, timings, t0, forced) -> None:
        """A setting measured teacher-forced only (--measure tf): no answer of its own, so no F1 columns."""
        h = received.header
        start, end = h.context_span
        rec = self._base(ex, s, None, None, None)
        rec.update(
            bytes=received.wire_bytes,
            wire_ratio=received.wire_bytes / fp16_kv_bytes(self.geometry, h.n_prompt),
            prompt_len=h.n_prompt,
            context_tokens=end - start,
            kept=received.held,
            timings_ms=timings.ms(),
            seconds=round(time.perf_counter() - t0, 4),
            tf_top1=forced.top1,
            tf_kl=forced.kl,
            tf_positions=forced.positions,
        )
        self.store.add(rec)

    def _record_text(self, ex, s: Setting, full: dict, nbytes: int, ratio: float) -> None:
        rec = self._base(ex, s, full["prediction"], full["tokens"], full)
        rec.update(
            bytes=nbytes,
            wire_ratio=ratio,
            prompt_len=full["prompt_len"],
            context_tokens=full["context_tokens"],
            kept=full["kept"],
            timings_ms=full["timings_ms"],
            seconds=full["seconds"],
            tf_top1=1.0,  # the full computation itself
            tf_kl=0.0,
        )
        self.store.add(rec)

    def _base(self, ex: Example, s: Setting, text: str | None, tokens: list[int] | None, full: dict | None) -> dict:
        """The fields every record has; with text None (teacher-forced only) no answer columns."""
        rec = {
            "example": ex.id,
            "setting": s.key,
            "selector": s.selector,
            "retention": s.retention,
            "profile": s.profile_name,
            "length": ex.meta.get("length"),
            "source": ex.meta.get("source") or self.source,
            "title": ex.title,
            "meta": ex.meta,
            "prediction": text,
            "tokens": tokens,
        }
        if text is not None:
            golds = list(ex.answers)
            rec.update(
                f1=best_over_golds(f1_score, text, golds),
                em=best_over_golds(exact_match, text, golds),
                agreement_f1=1.0 if full is None else f1_score(text, full["prediction"]),
                identical=True if full is None else tokens == full["tokens"],
            )
        return rec


def measured(rec: dict | None, measure: str = "answers") -> bool:
    """Whether a record holds what `measure` asks for (a teacher-forced-only record lacks the answer)."""
    return rec is not None and (measure == "tf" or rec.get("prediction") is not None)


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


# the columns that get a paired standard error against the full answers (teacher-forced ones where recorded)
PAIRED = ("f1", "em", "agreement_f1", "identical", "tf_top1", "tf_kl")


def summarize(store: RecordStore, examples: list[Example], settings: list[Setting]) -> list[dict]:
    """One row per (length, setting) over the examples that have both that answer and the full answer.

    Each column of PAIRED has its paired standard error against full KV in row["se"] (the error of the
    setting's mean minus full's); "% of full F1" has a seeded bootstrap 95% interval. Teacher-forced
    columns cover the answers that carry them (tf_n; None for scout, whose cache is not the edge's KV).
    """
    groups: dict = {}
    for ex in examples:
        groups.setdefault(ex.meta.get("length"), []).append(ex)
    rows = []
    for length, exs in groups.items():
        for s in settings:
            pairs = [(store.get(ex.id, s), store.get(ex.id, Setting(FULL, 1.0))) for ex in exs]
            pairs = [(r, f) for r, f in pairs if r is not None and f is not None]
            if not pairs:
                continue
            recs = [r for r, _ in pairs]
            answered = [(r, f) for r, f in pairs if "f1" in r]  # all but teacher-forced-only records
            ans = [r for r, _ in answered]
            f1 = _mean(r["f1"] for r in ans) if ans else None
            full_f1 = _mean(f["f1"] for _, f in answered) if ans else None
            stages = sorted({k for r in recs for k in r["timings_ms"]})
            forced = [(r, f) for r, f in pairs if "tf_top1" in r and "tf_top1" in f]
            se = {}
            for col in PAIRED:
                have = forced if col.startswith("tf_") else answered
                se[col] = _round(paired_se([float(r[col]) for r, _ in have], [float(f[col]) for _, f in have]), 5)

            def answer_mean(col: str):
                return round(_mean(float(r[col]) for r in ans), 4) if ans else None

            rows.append(
                {
                    "selector": s.selector,
                    "retention": s.retention,
                    "profile": s.profile_name,
                    "length": length,
                    "n": len(recs),
                    "answered_n": len(ans),
                    "f1": answer_mean("f1"),
                    "em": answer_mean("em"),
                    "agreement_f1": answer_mean("agreement_f1"),
                    "identical": answer_mean("identical"),
                    "tf_top1": _round(_mean(r["tf_top1"] for r, _ in forced), 4) if forced else None,
                    "tf_kl": _round(_mean(r["tf_kl"] for r, _ in forced), 5) if forced else None,
                    "tf_n": len(forced),
                    "f1_diff": round(f1 - full_f1, 4) if ans else None,
                    "se": se,
                    "pct_of_full_f1": round(100 * f1 / full_f1, 2) if ans and full_f1 > 0 else None,
                    "pct_of_full_f1_ci": bootstrap_pct([r["f1"] for r in ans], [f["f1"] for _, f in answered])
                    if ans
                    else None,
                    "bytes": round(_mean(r["bytes"] for r in recs)),
                    "wire_ratio": round(_mean(r["wire_ratio"] for r in recs), 5),
                    "prompt_tokens": round(_mean(r["prompt_len"] for r in recs), 1),
                    "kept_positions": round(_mean(r["kept"] for r in recs), 1),
                    "answer_tokens": round(_mean(len(r["tokens"]) for r in ans), 2) if ans else None,
                    "stage_ms": {k: round(_mean(r["timings_ms"].get(k, 0.0) for r in recs), 2) for k in stages},
                    "setting": s.key,
                }
            )
    return rows


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def completeness(
    store: RecordStore, examples: list[Example], settings: list[Setting], measure: str = "answers"
) -> dict:
    """How much of the run's grid is on disk: answers recorded and expected, and whether that is all."""
    done = sum(measured(store.get(ex.id, s), measure) for ex in examples for s in settings)
    expected = len(examples) * len(settings)
    return {"partial": done < expected, "answers": done, "expected": expected}
