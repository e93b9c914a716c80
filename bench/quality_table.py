"""Mode auto's quality table from `kvwire eval` rows (docs/auto.md): one row per kv or scout setting, with
its expected quality on one scale (a share of full-KV quality) and its wire ratio."""

from __future__ import annotations

from kvwire.cloud_agent.auto import QUALITY_TABLE_VERSION, QualityTable

MEASURES = {
    "tf_top1": "teacher-forced top-1 agreement with the full cache",
    "agreement_f1": "agreement F1 with the full-KV answer",
}


def quality_table(rows: list[dict], measure: str, model: str, data: str) -> tuple[dict, list[str]]:
    """(the table as JSON data, the settings left out and why). Baselines (full, text) are not rows: the
    cloud adds text itself, with quality 1.0. Rows without the measure (scout has no teacher-forced score)
    are left out."""
    out, skipped = [], []
    for r in rows:
        if r["selector"] in ("full", "text"):
            continue
        value = r.get(measure)
        if value is None:
            skipped.append(f"{r['setting']}: no {measure}")
            continue
        scout = r["profile"].startswith("scout-")
        out.append(
            {
                "mode": "scout" if scout else "kv",
                "selector": "q2c" if r["selector"] == "none" else r["selector"],
                "retention": 1.0 if r["selector"] == "none" else r["retention"],
                "profile": None if scout else r["profile"],
                "scout_prefill": r["profile"].removeprefix("scout-") if scout else None,
                "quality": round(float(value), 4),
                "se": (r.get("se") or {}).get(measure) or 0.0,
                "wire_ratio": r["wire_ratio"],
                "n": r["n"],
            }
        )
    n = max((r["n"] for r in rows), default=0)
    table = {
        "kvwire_quality_table": QUALITY_TABLE_VERSION,
        "model": model,
        "measure": f"{MEASURES[measure]}, {data}, {n} questions (kvwire eval)",
        "rows": out,
    }
    QualityTable.from_dict(table, "the written quality table")  # what the cloud will load must load
    return table, skipped
