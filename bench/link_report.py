"""`kvwire bench link`'s figures: rows from measured samples, ratios to text, the Markdown tables,
the verdicts and the issue's targets. Pure functions of measurements (no lab, no model), so the
tests drive them with synthetic samples.

A grid row is one bandwidth x tokens x case x mode; a case is "cold" (the context sent inline to an
edge whose prefix cache is off) or "cached" (a document registered on the edge and prefilled before
the question). Every ratio divides by the text row of the same bandwidth, tokens and case.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

BASELINE = "text"
CASES: dict[str, str] = {
    "cold": "inline context, the edge's prefix cache off: every kv/scout request pays the edge's whole prefill",
    "cached": "a document registered on the edge (doc_id) and prefilled before the question; text fetches "
    "its text from the edge across the link",
}


def _group(row: dict) -> tuple:
    return row["bandwidth"], row["tokens"], row["case"]


def summarize(bandwidth: str, tokens: int, case: str, mode: str, request: dict, samples: list[dict]) -> dict:
    """One table row: medians over the repeats that answered (an error row if none did).

    A cached row also counts the edge's prefix-cache events its requests caused (samples'
    "cache_hits"/"cache_misses", from the edge's /metrics around each request): a cached measurement
    is only that when every streamed request was a hit.
    """
    ok = [s for s in samples if "error" not in s]
    row = {
        "table": "link",
        "bandwidth": bandwidth,
        "tokens": tokens,
        "case": case,
        "mode": mode,
        "request": request,
        "repeats": len(samples),
        "answered": len(ok),
    }
    if not ok:
        return {**row, "error": samples[0]["error"] if samples else "not run"}
    first = ok[0]
    stages = first["timings_ms"].keys()
    med = lambda key: round(statistics.median(s[key] for s in ok), 4)  # noqa: E731
    out = {
        **row,
        "bytes": int(statistics.median(s["bytes"] for s in ok)),
        "ttft_s": med("ttft_s"),
        "total_s": med("total_s"),
        "ttft_minus_edge_prefill_s": med("ttft_minus_edge_prefill_s"),
        "context_tokens": first["context_tokens"],
        "prompt_tokens": first["prompt_tokens"],
        "kept_positions": first["kept_positions"],
        "answer": first["answer"],
        "complete": all(s["complete"] for s in ok),
        "timings_ms": {k: round(statistics.median(s["timings_ms"][k] for s in ok), 1) for k in stages},
        "errors": [s["error"] for s in samples if "error" in s],
    }
    chose = [s["auto_chose"] for s in ok if s.get("auto_chose")]
    if chose:
        out["auto_chose"] = ", ".join(f"{c} x{chose.count(c)}" for c in dict.fromkeys(chose))
        out["auto_chose_counts"] = {c: chose.count(c) for c in dict.fromkeys(chose)}
        # every candidate's predicted TTFT per request (the cloud's auto_choice log line): why it chose so
        out["auto_predictions"] = [s["auto_predictions_ms"] for s in ok if s.get("auto_predictions_ms")]
        out.update(prediction_figures(ok))
    if any("cache_hits" in s for s in ok):
        out["cache_hits"] = sum(s.get("cache_hits", 0) for s in ok)
        out["cache_misses"] = sum(s.get("cache_misses", 0) for s in ok)
    return out


def prediction_figures(samples: list[dict]) -> dict:
    """Mode auto's prediction error over answered samples: each one's predicted TTFT (the response's
    auto.predicted_ms) over the TTFT the cloud measured for it (timings_ms.time_to_first_token), so > 1
    means auto expected it slower than it was; the median, the range, and the quality auto expected."""
    ratios = [
        s["auto_predicted_ttft_s"] / s["cloud_ttft_s"]
        for s in samples
        if s.get("auto_predicted_ttft_s") is not None and s.get("cloud_ttft_s")
    ]
    out: dict = {}
    if ratios:
        out["prediction_ratio"] = round(statistics.median(ratios), 3)
        out["prediction_ratios"] = [round(x, 3) for x in ratios]
    quality = [s["auto_quality"] for s in samples if s.get("auto_quality") is not None]
    if quality:
        out["auto_quality"] = round(min(quality), 4)  # the lowest it accepted in the cell
    return out


def add_ratios(rows: list[dict]) -> list[dict]:
    """ttft_vs_text and total_vs_text: each row over the text row of the same bandwidth, tokens and
    case; ttft_minus_edge_prefill_vs_text: the row's TTFT without the edge's prefill, over text's TTFT
    (what shipping KV would cost if the edge had its KV ready when the question came)."""
    base = {_group(r): r for r in rows if r["mode"] == BASELINE and "error" not in r}
    for r in rows:
        b = base.get(_group(r))
        ok = b is not None and "error" not in r
        for key, unit in (("ttft", "ttft"), ("total", "total"), ("ttft_minus_edge_prefill", "ttft")):
            r[f"{key}_vs_text"] = round(r[f"{key}_s"] / b[f"{unit}_s"], 3) if ok else None
    return rows


def _f(x, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def cache_note(row: dict) -> str:
    """The edge-cache column: off (cold), hits/requests (cached, streamed), – (text: no edge prefill)."""
    if row["case"] == "cold":
        return "off"
    if "cache_hits" not in row:
        return "–"
    n = row["cache_hits"] + row["cache_misses"]
    return f"hit {row['cache_hits']}/{n}" if row["cache_misses"] == 0 else f"MISSED {row['cache_misses']}/{n}"


def format_rows(rows: list[dict]) -> str:
    """The Markdown tables: one per case, one row per bandwidth x tokens x mode."""
    out = []
    for case in dict.fromkeys(r["case"] for r in rows):
        lines = [
            f"**{case}**: {CASES[case]}",
            "",
            "| bandwidth | tokens | mode | wire MB | TTFT s | total s | TTFT/text | total/text "
            "| (TTFT − edge prefill)/text | edge cache |",
            "|---|---:|---|---:|---:|---:|---:|---:|---:|---|",
        ]
        for r in (r for r in rows if r["case"] == case):
            if "error" in r:
                lines.append(
                    f"| {r['bandwidth']} | {r['tokens']} | {r['mode']} | error: {r['error'][:80]} | | | | | | |"
                )
                continue
            mode = r["mode"] if r["complete"] else f"{r['mode']} (stream cut)"
            lines.append(
                f"| {r['bandwidth']} | {r['tokens']} | {mode} | {r['bytes'] / 1e6:.3f} | {r['ttft_s']:.2f} | "
                f"{r['total_s']:.2f} | {_f(r['ttft_vs_text'], '.2f')} | {_f(r['total_vs_text'], '.2f')} | "
                f"{_f(r['ttft_minus_edge_prefill_vs_text'], '.2f')} | {cache_note(r)} |"
            )
        out.append("\n".join(lines))
    return "\n\n".join(out)


def verdicts(rows: list[dict]) -> list[str]:
    """One line per bandwidth x tokens x case naming the modes faster than text (ratio < 1)."""
    out = []
    for key in dict.fromkeys(_group(r) for r in rows):
        group = [r for r in rows if _group(r) == key and r["mode"] != BASELINE]
        parts = []
        for metric, label in (
            ("ttft_vs_text", "first token"),
            ("total_vs_text", "total"),
            ("ttft_minus_edge_prefill_vs_text", "first token with the edge's prefill done ahead"),
        ):
            if key[2] == "cached" and metric == "ttft_minus_edge_prefill_vs_text":
                continue  # a cached row's edge prefill is the question's alone: the column adds nothing
            wins = sorted((r[metric], r["mode"]) for r in group if r.get(metric) is not None and r[metric] < 1.0)
            parts.append(f"beats text on {label}: " + (", ".join(f"{m} ({x:.2f})" for x, m in wins) or "none"))
        out.append(f"{key[0]}, {key[1]} tokens, {key[2]}: " + "; ".join(parts))
    return out


AUTO = "auto"
AUTO_VS_ORACLE, AUTO_VS_TEXT = 1.1, 1.05  # issue 13's targets
DEFAULT_MIN_QUALITY = 0.95  # the cloud's default (cloud_agent.auto), which the bench's auto requests use


def setting_of(request: dict) -> tuple:
    """A bench mode's /answer fields as a quality-table key (cloud_agent.auto.Setting's fields, its defaults)."""
    mode = request["mode"]
    return (
        mode,
        request.get("selector", "q2c"),
        float(request.get("retention", 1.0)),
        request.get("profile") if mode == "kv" else None,
        (request.get("scout_prefill") or "sparse") if mode == "scout" else None,
    )


def add_quality(rows: list[dict], table_rows: list[dict]) -> list[dict]:
    """Each fixed row's expected quality from the quality table the cloud loaded (its rows as dicts of
    Setting fields + quality): text is 1.0 (what every other mode approximates); a setting the table does not
    list gets None, so it can never be the oracle. An auto row keeps what its responses said (auto_quality)."""

    known = {setting_of(r): float(r["quality"]) for r in table_rows}
    for r in rows:
        if r["mode"] == AUTO:
            r["quality"] = r.get("auto_quality")
        elif r["request"]["mode"] == BASELINE:
            r["quality"] = 1.0
        else:
            r["quality"] = known.get(setting_of(r["request"]))
    return rows


def auto_cells(rows: list[dict], min_quality: float = DEFAULT_MIN_QUALITY) -> list[dict]:
    """Per cell with an auto row and a text row: auto against the oracle (the fastest fixed mode measured in the
    same run whose table quality is >= min_quality: what auto should have chosen), against the fastest fixed
    mode regardless of quality, and against text; with auto's prediction error."""
    out = []
    for key in dict.fromkeys(_group(r) for r in rows):
        cell = [r for r in rows if _group(r) == key and "error" not in r]
        auto = next((r for r in cell if r["mode"] == AUTO), None)
        fixed = [r for r in cell if r["mode"] != AUTO]
        text = next((r for r in fixed if r["mode"] == BASELINE), None)
        if auto is None or text is None:
            continue
        quality = lambda r: 1.0 if r["mode"] == BASELINE else r.get("quality")  # noqa: E731
        admissible = [r for r in fixed if quality(r) is not None and quality(r) >= min_quality - 1e-9]
        oracle = min(admissible, key=lambda r: r["ttft_s"])  # text is always admissible
        fastest = min(fixed, key=lambda r: r["ttft_s"])
        c = {
            "bandwidth": key[0],
            "tokens": key[1],
            "case": key[2],
            "text_ttft_s": text["ttft_s"],
            "oracle": oracle["mode"],
            "oracle_ttft_s": oracle["ttft_s"],
            "fastest": fastest["mode"],
            "fastest_ttft_s": fastest["ttft_s"],
            "fastest_quality": fastest.get("quality"),
            "auto_ttft_s": auto["ttft_s"],
            "auto_chose": auto.get("auto_chose", "?"),
            "auto_vs_oracle": round(auto["ttft_s"] / oracle["ttft_s"], 3),
            "auto_vs_fastest": round(auto["ttft_s"] / fastest["ttft_s"], 3),
            "auto_vs_text": round(auto["ttft_s"] / text["ttft_s"], 3),
            "prediction_ratio": auto.get("prediction_ratio"),
            "prediction_ratios": auto.get("prediction_ratios", []),
            "repeats": auto["answered"] if "answered" in auto else None,
        }
        c["met"] = c["auto_vs_oracle"] <= AUTO_VS_ORACLE and c["auto_vs_text"] <= AUTO_VS_TEXT
        # independent of the host's noise: how many of auto's requests chose the oracle's very setting
        c["chose_oracle"] = sum(
            n for label, n in auto.get("auto_chose_counts", {}).items() if label == oracle_label(oracle)
        )
        out.append(c)
    return out


def oracle_label(row: dict) -> str:
    """The label auto's responses give the setting of a fixed row (cloud_agent.auto.Setting.label)."""
    from kvwire.cloud_agent.auto import Setting

    mode, selector, retention, profile, scout = setting_of(row["request"])
    return Setting(mode, selector, retention, profile, scout).label()


def auto_verdicts(rows: list[dict], min_quality: float = DEFAULT_MIN_QUALITY) -> list[str]:
    """One line per auto cell (auto_cells): against the oracle and text, the targets, and what it chose."""
    out = []
    for c in auto_cells(rows, min_quality):
        pred = "" if c["prediction_ratio"] is None else f"; predicted/measured TTFT {c['prediction_ratio']:.2f}"
        out.append(
            f"{c['bandwidth']}, {c['tokens']} tokens, {c['case']}: auto {c['auto_vs_oracle']:.2f}x the oracle "
            f"({c['oracle']}, quality >= {min_quality:g}), {c['auto_vs_text']:.2f}x text, {c['auto_vs_fastest']:.2f}x "
            f"the fastest regardless of quality ({c['fastest']}); chose {c['auto_chose']} (the oracle's setting "
            f"{c['chose_oracle']} of {c['repeats']}){pred}: "
            + ("met" if c["met"] else f"MISSED (targets <= {AUTO_VS_ORACLE:g}x oracle, <= {AUTO_VS_TEXT:g}x text)")
        )
    return out


def format_auto(rows: list[dict], min_quality: float = DEFAULT_MIN_QUALITY) -> str:
    """Mode auto's table: per cell, TTFT of text, the oracle (best fixed mode at or above the quality floor),
    the fastest fixed mode regardless of quality, and auto; the ratios; auto's prediction error."""
    cells = auto_cells(rows, min_quality)
    if not cells:
        return ""
    lines = [
        f"**auto** (oracle: the fastest fixed mode of the cell whose table quality is >= {min_quality:g}; "
        "predicted/measured: auto's predicted TTFT over the cloud's measured one, median [range])",
        "",
        "| case | bandwidth | tokens | text s | oracle | oracle s | fastest (any quality) | auto s | auto chose "
        "| chose the oracle's | auto/oracle | auto/text | predicted/measured | target |",
        "|---|---|---:|---:|---|---:|---|---:|---|---:|---:|---:|---:|---|",
    ]
    for c in cells:
        rng = c["prediction_ratios"]
        pred = "–" if c["prediction_ratio"] is None else f"{c['prediction_ratio']:.2f} [{min(rng):.2f}–{max(rng):.2f}]"
        fq = "" if c["fastest_quality"] is None else f", q {c['fastest_quality']:.2f}"
        lines.append(
            f"| {c['case']} | {c['bandwidth']} | {c['tokens']} | {c['text_ttft_s']:.2f} | {c['oracle']} | "
            f"{c['oracle_ttft_s']:.2f} | {c['fastest']} {c['fastest_ttft_s']:.2f} s{fq} | {c['auto_ttft_s']:.2f} | "
            f"{c['auto_chose']} | {c['chose_oracle']}/{c['repeats']} | {c['auto_vs_oracle']:.2f} | "
            f"{c['auto_vs_text']:.2f} | {pred} | "
            f"{'met' if c['met'] else 'MISSED'} |"
        )
    return "\n".join(lines)


# ---- targets (issue 11) ------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A ratio a mode's cached rows must stay at or under: in the named cells, or (None) every measured one."""

    mode: str
    max_ratio: float
    bandwidths: tuple[str, ...] | None = None
    tokens: tuple[int, ...] | None = None
    case: str = "cached"
    metric: str = "ttft_vs_text"

    def describe(self) -> str:
        where = []
        if self.tokens:
            where.append(f"a {self.case} {'/'.join(map(str, self.tokens))}-token document")
        else:
            where.append(f"a {self.case} document")
        where.append(f"at {'/'.join(self.bandwidths)}" if self.bandwidths else "on every link")
        return f"{self.mode} on {' '.join(where)}: TTFT <= {self.max_ratio:g}x text's"

    def cells(self, rows: list[dict]) -> list[dict]:
        return [
            r
            for r in rows
            if r.get("table", "link") == "link"
            and r["mode"] == self.mode
            and r["case"] == self.case
            and (self.bandwidths is None or r["bandwidth"] in self.bandwidths)
            and (self.tokens is None or r["tokens"] in self.tokens)
        ]


TARGETS = (
    Target("kv-q2c0.5-mixed-int4", 0.25, bandwidths=("100mbit",), tokens=(2048,)),
    Target("scout-sparse-q2c0.5", 0.7),
)


def target_verdicts(rows: list[dict], targets=TARGETS) -> list[str]:
    """One line per target: met / MISSED / not measured, with every cell's ratio. A cell whose edge
    missed its cache, or that has no answer, cannot meet a target."""
    out = []
    for t in targets:
        cells = t.cells(rows)
        if not cells:
            out.append(f"target {t.describe()}: not measured (no such row in this run)")
            continue
        parts, met = [], True
        for r in cells:
            ratio = r.get(t.metric)
            ok = ratio is not None and ratio <= t.max_ratio and r.get("cache_misses", 0) == 0 and r["complete"]
            met &= ok
            note = "no answer" if ratio is None else f"{ratio:.2f}"
            if ratio is not None and r.get("cache_misses", 0):
                note += " (edge cache missed)"
            parts.append(f"{r['bandwidth']} {r['tokens']} {note}")
        out.append(f"target {t.describe()}: {'met' if met else 'MISSED'} ({', '.join(parts)})")
    return out


# ---- the many-questions workload --------------------------------------------------------------------


def mean_se(xs: list[float]) -> tuple[float, float]:
    """Mean and its standard error (0 for a single value)."""
    m = statistics.fmean(xs)
    return m, (statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else 0.0)


def summarize_questions(samples: list[dict]) -> list[dict]:
    """samples: one per question x mode ({"mode", "question", "ttft_s", "total_s", "edge_cpu_s",
    "cloud_cpu_s", "f1", ...} or {"mode", "question", "error"}). One row per mode, in first-seen
    order: means and standard errors over the questions it answered; ttft_vs_text is the mean of the
    per-question ratios to text's TTFT on the same question (paired), with its standard error."""
    text = {s["question"]: s for s in samples if s["mode"] == BASELINE and "error" not in s}
    rows = []
    for mode in dict.fromkeys(s["mode"] for s in samples):
        mine = [s for s in samples if s["mode"] == mode]
        ok = [s for s in mine if "error" not in s]
        row = {"table": "questions", "mode": mode, "questions": len(mine), "answered": len(ok)}
        if not ok:
            rows.append({**row, "error": mine[0]["error"] if mine else "not run"})
            continue
        for key in ("ttft_s", "total_s", "edge_cpu_s", "cloud_cpu_s", "f1"):
            row[key], row[f"{key}_se"] = (round(x, 4) for x in mean_se([s[key] for s in ok]))
        cpu = [s["edge_cpu_s"] + s["cloud_cpu_s"] for s in ok]
        row["cpu_s"], row["cpu_s_se"] = (round(x, 4) for x in mean_se(cpu))
        paired = [s["ttft_s"] / text[s["question"]]["ttft_s"] for s in ok if s["question"] in text]
        row["ttft_vs_text"], row["ttft_vs_text_se"] = (round(x, 3) for x in mean_se(paired)) if paired else (None, None)
        row["bytes"] = int(statistics.median(s["bytes"] for s in ok))
        chose = [s["auto_chose"] for s in ok if s.get("auto_chose")]
        if chose:
            row["auto_chose"] = ", ".join(f"{c} x{chose.count(c)}" for c in dict.fromkeys(chose))
        if any("cache_hits" in s for s in ok):
            row["cache_hits"] = sum(s.get("cache_hits", 0) for s in ok)
            row["cache_misses"] = sum(s.get("cache_misses", 0) for s in ok)
        rows.append(row)
    return rows


def _pm(row: dict, key: str, spec: str) -> str:
    return f"{format(row[key], spec)} ± {format(row[key + '_se'], spec)}"


def format_questions(rows: list[dict], meta: dict) -> str:
    """The many-questions table: per answer, mean ± standard error over the questions."""
    lines = [
        f"**many questions**: one {meta['context_tokens']}-token document ({meta['title']}, "
        f"{meta['paragraphs']} paragraphs) registered on the edge and prefilled once "
        f"({meta['prefix_prefill_s']:.2f} s edge prefill, {meta['prefix_edge_cpu_s']:.2f} edge CPU s), "
        f"then {meta['questions']} questions in each mode at {meta['bandwidth']}; per answer, mean ± SE",
        "",
        "| mode | answered | TTFT s | TTFT/text (paired) | edge CPU s | cloud CPU s | edge+cloud CPU s "
        "| wire MB | F1 | edge cache |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['mode']} | 0/{r['questions']} | error: {r['error'][:80]} | | | | | | | |")
            continue
        ratio = "–" if r["ttft_vs_text"] is None else _pm(r, "ttft_vs_text", ".2f")
        cache = "–"
        if "cache_hits" in r:
            n = r["cache_hits"] + r["cache_misses"]
            cache = f"hit {r['cache_hits']}/{n}" if not r["cache_misses"] else f"MISSED {r['cache_misses']}/{n}"
        lines.append(
            f"| {r['mode']} | {r['answered']}/{r['questions']} | {_pm(r, 'ttft_s', '.2f')} | {ratio} | "
            f"{_pm(r, 'edge_cpu_s', '.3f')} | {_pm(r, 'cloud_cpu_s', '.3f')} | {_pm(r, 'cpu_s', '.3f')} | "
            f"{r['bytes'] / 1e6:.3f} | {_pm(r, 'f1', '.2f')} | {cache} |"
        )
    return "\n".join(lines)


# ---- the link's rate changing mid-run (issue 13) ---------------------------------------------------


def summarize_rate_change(samples: list[dict]) -> dict:
    """samples: one per request of the rate-change run ({"phase": before|after|text, "rate", "index",
    "auto_chose", "ttft_s", ...} or with "error"). What auto chose before the change (the last before-request's
    choice), how many requests after the change it took to choose otherwise (switched_at: the 1-based index of
    the first after-request with another choice; None: it never did), and the TTFT of the requests up to and
    including that one and after it, against text's at the new rate."""
    ok = [s for s in samples if "error" not in s]
    before = [s for s in ok if s["phase"] == "before"]
    after = [s for s in ok if s["phase"] == "after"]
    text = [s for s in ok if s["phase"] == "text"]
    old = before[-1]["auto_chose"] if before else None
    switched = next((s for s in after if s["auto_chose"] != old), None)
    at = switched["index"] if switched else None
    until = [s for s in after if at is None or s["index"] <= at]
    later = [s for s in after if at is not None and s["index"] > at]
    med = lambda xs: round(statistics.median(xs), 3) if xs else None  # noqa: E731
    return {
        "before_rate": samples[0]["rate"] if samples else None,
        "after_rate": after[0]["rate"] if after else None,
        "chose_before": old,
        "chose_after": switched["auto_chose"] if switched else None,
        "switched_at": at,
        "ttft_before_s": med([s["ttft_s"] for s in before]),
        "ttft_until_switch_s": [round(s["ttft_s"], 3) for s in until],
        "ttft_after_switch_s": med([s["ttft_s"] for s in later]),
        "text_ttft_s": text[0]["ttft_s"] if text else None,
        "errors": [s["error"] for s in samples if "error" in s],
        "failed_before_switch": sum(
            1 for s in samples if "error" in s and s["phase"] == "after" and (at is None or s["index"] < at)
        ),
    }


def format_rate_change(samples: list[dict]) -> str:
    """The rate-change run: one line per request, then the summary line."""
    lines = [
        "**rate change**: auto on the cached document while the link's tc rate is replaced mid-run",
        "",
        "| # | phase | rate | auto chose | TTFT s | predicted TTFT s | predicted/measured |",
        "|---:|---|---|---|---:|---:|---:|",
    ]
    for n, s in enumerate(samples, 1):
        if "error" in s:
            lines.append(f"| {n} | {s['phase']} | {s['rate']} | error: {s['error'][:60]} | | | |")
            continue
        pred = s.get("auto_predicted_ttft_s")
        ratio = f"{pred / s['cloud_ttft_s']:.2f}" if pred is not None and s.get("cloud_ttft_s") else "–"
        chose = s.get("auto_chose") or "text (reference)"
        if s.get("fallback"):
            chose += f" (the stream failed: {s['fallback']} answered)"
        lines.append(
            f"| {n} | {s['phase']} | {s['rate']} | {chose} | {s['ttft_s']:.2f} | {_f(pred, '.2f')} | {ratio} |"
        )
    r = summarize_rate_change(samples)
    if r["switched_at"] is None:
        summary = f"auto kept {r['chose_before']} for all {len(r['ttft_until_switch_s'])} requests after the change"
    else:
        summary = (
            f"auto switched from {r['chose_before']} to {r['chose_after']} on request {r['switched_at']} after the "
            f"change ({r['switched_at'] - 1 - r['failed_before_switch']} answered the old way first"
            + (f", {r['failed_before_switch']} failed" if r["failed_before_switch"] else "")
            + ")"
        )
    until = ", ".join(f"{x:.2f}" for x in r["ttft_until_switch_s"])
    lines += [
        "",
        f"- {r['before_rate']} → {r['after_rate']}: {summary}; TTFT of the requests up to the switch {until} s, "
        f"median after it {_f(r['ttft_after_switch_s'], '.2f')} s, text at {r['after_rate']} "
        f"{_f(r['text_ttft_s'], '.2f')} s; median TTFT before the change {_f(r['ttft_before_s'], '.2f')} s",
    ]
    return "\n".join(lines)
