"""Reports of `kvwire eval`: the Markdown tables and the Pareto plot of quality against wire ratio."""

from __future__ import annotations

from pathlib import Path

from kvwire.bench.evaluator import FULL, NONE, TEXT

STAGES = ("prefill", "select", "encode", "decode", "inject", "first_token", "generate", "teacher_forced")


def _fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _pm(row: dict, col: str, spec: str, scale: float = 1.0) -> str:
    """value ± its paired standard error against full KV (– where not measured)."""
    value, se = row.get(col), (row.get("se") or {}).get(col)
    if value is None:
        return "–"
    text = format(scale * value, spec)
    return text if se is None or row["selector"] == FULL else f"{text} ± {format(scale * se, spec)}"


def _ci(row: dict) -> str:
    pct, ci = row["pct_of_full_f1"], row.get("pct_of_full_f1_ci")
    if pct is None:
        return "–"
    return f"{pct:.1f}" if ci is None or row["selector"] == FULL else f"{pct:.1f} [{ci[0]:.0f}, {ci[1]:.0f}]"


def partial_note(done: dict, shard: str = "") -> str:
    """The line a report opens with while answers are missing ('' when the run is complete)."""
    if not done["partial"]:
        return ""
    where = f" (written by shard {shard})" if shard else ""
    return (
        f"**PARTIAL**{where}: {done['answers']} of {done['expected']} answers are on disk. The other shards "
        f"are still running or were not started; the last one to finish (or a rerun without --shard) writes "
        f"the complete report.\n\n"
    )


def markdown_table(rows: list[dict]) -> str:
    """One quality/bytes table and one stage-time table per context length group.

    "±" is the paired standard error against full KV over the same questions; the interval after
    "% of full F1" is the seeded bootstrap 95% interval; top-1 and KL are the teacher-forced scores.
    """
    out = []
    for length in dict.fromkeys(r["length"] for r in rows):
        group = [r for r in rows if r["length"] == length]
        if length is not None:
            out.append(f"### Context {length} tokens\n")
        out.append(
            "| selector | retention | profile | n | F1 | EM | % of full F1 [95% CI] | agreement F1 | identical | "
            "top-1 agreement | KL (nats/token) | bytes | wire ratio |"
        )
        out.append("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in group:
            out.append(
                f"| {r['selector']} | {r['retention']:g} | {r['profile']} | {r['n']} | {_pm(r, 'f1', '.3f')} | "
                f"{_fmt(r['em'], '.3f')} | {_ci(r)} | {_pm(r, 'agreement_f1', '.3f')} | "
                f"{_pm(r, 'identical', '.0f', 100)}% | {_pm(r, 'tf_top1', '.3f')} | {_pm(r, 'tf_kl', '.4f')} | "
                f"{r['bytes']:,} | {r['wire_ratio']:.4f} |"
            )
        out.append("")
        timed = [r for r in group if r["selector"] != TEXT]
        out.append("| selector | retention | profile | " + " | ".join(f"{s} ms" for s in STAGES) + " | answer tokens |")
        out.append("|---|---:|---|" + "---:|" * (len(STAGES) + 1))
        for r in timed:
            cells = " | ".join(f"{r['stage_ms'].get(s, 0.0):.1f}" for s in STAGES)
            out.append(
                f"| {r['selector']} | {r['retention']:g} | {r['profile']} | {cells} | {_fmt(r['answer_tokens'], '.1f')} |"
            )
        out.append("")
    return "\n".join(out)


def pareto_points(rows: list[dict], metric: str = "pct_of_full_f1") -> list[dict]:
    """Rows not dominated by another (lower or equal wire ratio with a higher or equal `metric`)."""
    pts = [r for r in rows if r["selector"] not in (FULL, TEXT) and r.get(metric) is not None]
    front = [
        r
        for r in pts
        if not any(
            o is not r
            and o["wire_ratio"] <= r["wire_ratio"]
            and o[metric] >= r[metric]
            and (o["wire_ratio"] < r["wire_ratio"] or o[metric] > r[metric])
            for o in pts
        )
    ]
    return sorted(front, key=lambda r: r["wire_ratio"])


TOP1_FLOOR = 0.95  # the quality goal's teacher-forced floor: the full answer's next token at 95% of positions


def frontier_text(rows: list[dict], floor: float = TOP1_FLOOR) -> str:
    """Per context length group: the teacher-forced Pareto front (top-1 agreement against wire ratio) and
    the cheapest setting whose top-1 agreement is at least `floor` ('' when no row has teacher-forced scores)."""
    out = []
    for length in dict.fromkeys(r["length"] for r in rows):
        group = [r for r in rows if r["length"] == length]
        front = pareto_points(group, "tf_top1")
        if not front:
            continue
        where = f" ({length} tokens)" if length is not None else ""
        out.append(f"Teacher-forced Pareto front{where}, cheapest first:")
        out.extend(
            f"- {_name(r)}: wire ratio {r['wire_ratio']:.4f}, top-1 {_pm(r, 'tf_top1', '.3f')}, "
            f"KL {_pm(r, 'tf_kl', '.4f')}"
            for r in front
        )
        held = [r for r in front if r["tf_top1"] >= floor]
        out.append(
            f"Cheapest with top-1 >= {floor:g}: {_name(held[0])} at wire ratio {held[0]['wire_ratio']:.4f}"
            if held
            else f"No setting reaches top-1 {floor:g}."
        )
        out.append("")
    return "\n".join(out)


def _name(row: dict) -> str:
    return f"{row['selector']} {row['retention']:g} {row['profile']}"


def pareto_plot(rows: list[dict], path: Path, title: str) -> None:
    """Quality against wire ratio, one line per selector (NONE = all positions, quantization only),
    one column per context length: % of full-KV F1 on top (the Pareto front dashed), agreement with
    the full-KV answer (less noisy than gold F1 on few questions), and teacher-forced top-1 agreement
    (the least noisy; kv rows only; its Pareto front dashed). A measure no setting has (F1 after
    --measure tf) gets no panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = list(dict.fromkeys(r["length"] for r in rows))
    panels = [
        (metric, label)
        for metric, label in (
            ("pct_of_full_f1", "% of full-KV F1"),
            ("agreement_f1", "agreement with the full-KV answer (F1)"),
            ("tf_top1", "teacher-forced top-1 agreement with full KV"),
        )
        if any(r.get(metric) is not None for r in rows if r["selector"] not in (FULL, TEXT))
    ] or [("pct_of_full_f1", "% of full-KV F1")]  # a panel without points (empty) rather than no figure
    fig, axes = plt.subplots(len(panels), len(lengths), figsize=(6.2 * len(lengths), 4.1 * len(panels)), squeeze=False)
    for col, length in enumerate(lengths):
        group = [r for r in rows if r["length"] == length and r["selector"] not in (FULL, TEXT)]
        n = max((r["n"] for r in rows if r["length"] == length), default=0)
        for ax, (metric, label) in zip((axes[i][col] for i in range(len(panels))), panels):
            pts_all = [r for r in group if r[metric] is not None]
            for selector in dict.fromkeys(r["selector"] for r in pts_all):
                pts = sorted((r for r in pts_all if r["selector"] == selector), key=lambda r: r["wire_ratio"])
                ax.plot(
                    [r["wire_ratio"] for r in pts],
                    [r[metric] for r in pts],
                    marker="o",
                    label="none (all positions)" if selector == NONE else selector,
                )
                for r in pts:
                    ax.annotate(
                        r["profile"] + ("" if r["retention"] >= 1 else f"@{r['retention']:g}"),
                        (r["wire_ratio"], r[metric]),
                        fontsize=6,
                        xytext=(3, 3),
                        textcoords="offset points",
                    )
            if metric in ("pct_of_full_f1", "tf_top1"):
                front = pareto_points(pts_all, metric)
                if front:
                    ax.plot(
                        [r["wire_ratio"] for r in front],
                        [r[metric] for r in front],
                        "k--",
                        lw=0.8,
                        alpha=0.5,
                        label="Pareto front",
                    )
            ax.axhline(100 if metric == "pct_of_full_f1" else 1.0, color="grey", lw=0.8, ls=":")
            ax.set_xscale("log")
            ax.set_xlabel("wire ratio (bytes on the wire / FP16 KV bytes of the prompt)")
            ax.set_ylabel(label)
            ax.set_title(f"{title}" + (f", {length} tokens" if length is not None else "") + f" (n={n})", fontsize=9)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
