"""`kvwire bench link`: time to first token and total latency of text, kv and scout answers over a
tc-shaped link between two network namespaces, each as a ratio to text mode measured in the same run.

    kvwire bench link --bandwidth 10mbit,100mbit,1gbit --delay 20ms --tokens 512,2048

One NetLab for the whole run: edge-agent in the edge namespace, cloud-agent in the cloud namespace,
the cloud reaching the edge's gRPC port through bench.relay (which adds --delay each way) across the
shaped veth. Between bandwidths only the tbf qdisc is replaced (lab.shape); the daemons stay up.

CPU: on two real hosts each daemon has its own CPU. Here both share this machine, so each daemon
gets --threads torch threads (default 1): with 2 cores, the edge's prefill/encode and the cloud's
decode/prefill then run on a core each when they overlap (while a kv stream is in flight), instead
of 2 + 2 threads fighting over 2 cores. The relay and the request client are light extra processes.

Contexts: the distinct passages of the committed SQuAD sample (bench/data), in file order, joined by
blank lines and cut to exactly N tokens of the model's tokenizer; the question is the first
question about the FIRST passage (the one farthest from the question in the prompt).

The edge runs with its prefix cache off (--prefix-cache-bytes 0), so every kv/scout request pays
the edge's whole prefill as every text request pays the cloud's: these rows are the cold case (a
context seen for the first time); the last column shows what a cached document saves. One short warm-up request per mode before the grid pays torch's first-call costs and opens
the gRPC channel (which then stays open, as between long-running daemons).
"""

from __future__ import annotations

import re
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from kvwire.kvcodec.errors import ConfigError

# name -> the /answer request fields of that mode (besides question, context, max_new_tokens, deadline).
# scout keeps the same q2c 0.5 positions as the q2c kv row: at retention 1.0 it would only add the
# edge's prefill to text's work.
MODES: dict[str, dict] = {
    "text": {"mode": "text"},
    "kv-fp16": {"mode": "kv", "profile": "fp16", "retention": 1.0},
    "kv-mixed-int4": {"mode": "kv", "profile": "mixed-int4", "retention": 1.0},
    "kv-q2c0.5-mixed-int4": {"mode": "kv", "profile": "mixed-int4", "selector": "q2c", "retention": 0.5},
    "scout-q2c0.5": {"mode": "scout", "selector": "q2c", "retention": 0.5},
}
BASELINE = "text"
WARMUP_TOKENS = 48  # a short context: the warm-up pays first-call costs, not prefill time
DELAY_UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1000.0}


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def parse_bandwidths(text: str) -> list[str]:
    """ "10mbit,100mbit,1gbit" -> the tc rate strings, each checked (ConfigError names a bad one)."""
    from kvwire.bench.netlab.namespaces import rate_bits

    rates = _csv(text)
    if not rates:
        raise ConfigError("--bandwidth needs at least one tc rate, e.g. 10mbit,100mbit,1gbit")
    for rate in rates:
        try:
            rate_bits(rate)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    return rates


def parse_delay(text: str) -> float:
    """ "20ms" -> 20.0 (milliseconds, each way); also "0", "500us", "0.1s"."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(us|ms|s)?", text.strip().lower())
    if not m:
        raise ConfigError(f"--delay {text!r}: use a time such as 20ms, 500us or 0.1s (added each way)")
    return float(m.group(1)) * DELAY_UNITS_MS[m.group(2) or "ms"]


def parse_tokens(text: str) -> list[int]:
    """ "512,2048" -> [512, 2048], each a positive integer."""
    try:
        out = [int(x) for x in _csv(text)]
    except ValueError:
        raise ConfigError(f"--tokens {text!r}: use a comma list of context lengths, e.g. 512,2048") from None
    if not out or any(n < 1 for n in out):
        raise ConfigError(f"--tokens {text!r}: context lengths must be positive integers")
    return out


def parse_modes(text: str) -> list[str]:
    """A comma list of MODES names; text is added first if missing (every ratio divides by it)."""
    names = _csv(text)
    unknown = [n for n in names if n not in MODES]
    if unknown or not names:
        raise ConfigError(f"unknown mode(s) {', '.join(unknown) or '(none given)'}; known: {', '.join(MODES)}")
    return [BASELINE] + [n for n in dict.fromkeys(names) if n != BASELINE]


@dataclass
class LinkConfig:
    """One run's grid and setup, validated on construction."""

    bandwidths: list[str]
    delay_ms: float = 20.0
    tokens: list[int] = field(default_factory=lambda: [512, 2048])
    modes: list[str] = field(default_factory=lambda: list(MODES))
    repeats: int = 1
    model: str = "embedded"
    threads: int = 1
    max_new_tokens: int = 16
    timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if self.repeats < 1:
            raise ConfigError(f"--repeats must be >= 1, got {self.repeats}")
        if self.threads < 0:
            raise ConfigError(f"--threads must be >= 0 (0: torch's default), got {self.threads}")
        if not 1 <= self.max_new_tokens <= 256:
            raise ConfigError(
                f"--max-new-tokens must be in [1, 256] (the cloud's default cap), got {self.max_new_tokens}"
            )
        if self.timeout_s <= 0:
            raise ConfigError(f"--timeout must be > 0, got {self.timeout_s}")
        if self.delay_ms < 0:
            raise ConfigError(f"--delay must be >= 0, got {self.delay_ms}")
        self.modes = parse_modes(",".join(self.modes))

    @property
    def requests(self) -> int:
        """Requests the grid sends, warm-ups included: the run's bound is this x (timeout + 30 s) plus start-up."""
        return len(self.modes) * (1 + len(self.bandwidths) * len(self.tokens) * self.repeats)


# ---- contexts --------------------------------------------------------------------------------


def _count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def build_context(tokenizer, tokens: int) -> tuple[str, str, dict]:
    """(context, question, meta): the sample's distinct passages in file order, joined by blank lines,
    cut to `tokens` tokens of this tokenizer; the question is about the first passage.

    The cut is made on token ids and decoded; re-tokenizing the decoded text can differ by a token at
    the cut, so the cut moves until the count is exact (meta["context_tokens"] is what was reached).
    """
    from kvwire.bench.data import SQUAD_SAMPLE, load_examples

    examples = load_examples(SQUAD_SAMPLE)
    passages = list(dict.fromkeys(ex.context.strip() for ex in examples))
    question = next(ex for ex in examples if ex.context.strip() == passages[0])
    ids = tokenizer("\n\n".join(passages), add_special_tokens=False)["input_ids"]
    if len(ids) < tokens:
        raise ConfigError(
            f"the {len(passages)} sample passages are only {len(ids)} tokens of this tokenizer; "
            f"ask for at most that many --tokens"
        )
    n, text, got = tokens, "", -1
    for _ in range(8):  # converges in one or two steps
        text = tokenizer.decode(ids[:n], skip_special_tokens=True)
        got = _count(tokenizer, text)
        if got == tokens:
            break
        n = max(1, n + tokens - got)
    first = _count(tokenizer, passages[0])
    meta = {
        "context_tokens": got,
        "question_id": question.id,
        "first_passage_tokens": first,
        "answer_in_context": first <= got,
    }
    return text, question.question, meta


# ---- one run ---------------------------------------------------------------------------------


def _request(cfg: LinkConfig, mode: str, context: str, question: str) -> dict:
    # the request's deadline is its own timeout, so the cloud does not cut a slow stream short (an
    # anytime answer would make a slow link look fast); a row whose stream was cut anyway says so
    return {
        "question": question,
        "context": context,
        "max_new_tokens": cfg.max_new_tokens,
        "deadline_ms": int(cfg.timeout_s * 1000),
        **MODES[mode],
    }


def measure(res: dict) -> dict:
    """One /answer result (bench.netlab.daemons.answer) -> the measured figures.

    total_s is the client's wall time of the HTTP request, sent from inside the cloud namespace.
    The response arrives in one piece, so TTFT is derived: total_s minus the time the cloud spent
    generating after the first token (timings_ms.generate includes first_token), i.e. the moment
    the first answer token existed on the cloud, as seen from the client's clock.
    """
    if res.get("status") != 200:
        detail = res.get("body") or res.get("error")
        return {"error": f"HTTP {res.get('status')}: {detail}"[:300]}
    body = res["body"]
    t = body["timings_ms"]
    total = float(res["seconds"])
    ttft = total - (t["generate"] - t["first_token"]) / 1000
    return {
        "total_s": total,
        "ttft_s": ttft,
        "ttft_minus_edge_prefill_s": ttft - t["edge_prefill"] / 1000,
        "bytes": body["bytes_on_wire"],
        "context_tokens": body["context_tokens"],
        "prompt_tokens": body["prompt_tokens"],
        "kept_positions": body["kept_positions"],
        "answer": body["answer"],
        "timings_ms": t,
        "complete": body["complete"],  # false: a deadline cut the stream
    }


def _ask(lab, cloud, cfg: LinkConfig, request: dict) -> dict:
    from kvwire.bench.netlab.daemons import answer

    try:
        return measure(answer(lab, cloud, request, timeout=cfg.timeout_s + 30))
    except subprocess.TimeoutExpired:
        return {"error": f"no answer within {cfg.timeout_s + 30:.0f} s"}


def summarize(bandwidth: str, tokens: int, mode: str, samples: list[dict], cfg: LinkConfig) -> dict:
    """One table row: medians over the repeats that answered (an error row if none did)."""
    ok = [s for s in samples if "error" not in s]
    row = {
        "bandwidth": bandwidth,
        "delay_ms": cfg.delay_ms,
        "tokens": tokens,
        "mode": mode,
        "request": MODES[mode],
        "repeats": len(samples),
        "answered": len(ok),
    }
    if not ok:
        return {**row, "error": samples[0]["error"] if samples else "not run"}
    first = ok[0]
    stages = first["timings_ms"].keys()
    return {
        **row,
        "bytes": int(statistics.median(s["bytes"] for s in ok)),
        "ttft_s": round(statistics.median(s["ttft_s"] for s in ok), 4),
        "total_s": round(statistics.median(s["total_s"] for s in ok), 4),
        "ttft_minus_edge_prefill_s": round(statistics.median(s["ttft_minus_edge_prefill_s"] for s in ok), 4),
        "context_tokens": first["context_tokens"],
        "prompt_tokens": first["prompt_tokens"],
        "kept_positions": first["kept_positions"],
        "answer": first["answer"],
        "complete": all(s["complete"] for s in ok),
        "timings_ms": {k: round(statistics.median(s["timings_ms"][k] for s in ok), 1) for k in stages},
        "errors": [s["error"] for s in samples if "error" in s],
    }


def add_ratios(rows: list[dict]) -> list[dict]:
    """ttft_vs_text and total_vs_text: each row over the text row of the same bandwidth and tokens;
    ttft_minus_edge_prefill_vs_text: the row's TTFT without the edge's prefill, over text's TTFT (what
    shipping KV would cost if the edge had its KV ready when the question came)."""
    base = {(r["bandwidth"], r["tokens"]): r for r in rows if r["mode"] == BASELINE and "error" not in r}
    for r in rows:
        b = base.get((r["bandwidth"], r["tokens"]))
        ok = b is not None and "error" not in r
        for key, unit in (("ttft", "ttft"), ("total", "total"), ("ttft_minus_edge_prefill", "ttft")):
            r[f"{key}_vs_text"] = round(r[f"{key}_s"] / b[f"{unit}_s"], 3) if ok else None
    return rows


def run_link(cfg: LinkConfig, progress: Callable[[str], None] = lambda s: None) -> list[dict]:
    """Start the lab and the daemons once, then for each bandwidth x tokens x repeat ask every mode in
    turn (modes interleaved, so drift in the shared CPUs' load spreads over all of them); one row per
    bandwidth x tokens x mode. Raises NetlabUnavailable when this machine cannot host the lab."""
    from transformers import AutoTokenizer

    from kvwire.bench.netlab import LinkSpec, NetLab
    from kvwire.bench.netlab.daemons import edge_grpc_target, launch_cloud, launch_edge, ready, start_relay
    from kvwire.bench.netlab.namespaces import check_available
    from kvwire.kvcodec.models import resolve_model_source

    check_available()  # before loading anything: a clear message when we are not root or lack tc
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_source(cfg.model))
    contexts = {n: build_context(tokenizer, n) for n in [WARMUP_TOKENS, *cfg.tokens]}
    rows = []
    with NetLab(LinkSpec(rate=cfg.bandwidths[0])) as lab:
        target = edge_grpc_target(lab)
        if cfg.delay_ms > 0:
            target = start_relay(lab, target, delay_ms=cfg.delay_ms).target
        daemon_opts = {"threads": cfg.threads, "grace_seconds": 2}
        started = time.monotonic()
        procs = [
            launch_edge(lab, cfg.model, prefix_cache_bytes=0, **daemon_opts),  # the cold case: see the docstring
            launch_cloud(lab, cfg.model, target, **daemon_opts),
        ]
        edge, cloud = [ready(p) for p in procs]  # both launched first: their model loads overlap
        progress(f"daemons up in {time.monotonic() - started:.1f} s (model {cfg.model}, {cfg.threads} thread(s) each)")
        context, question, _ = contexts[WARMUP_TOKENS]
        for mode in cfg.modes:
            warm = _ask(lab, cloud, cfg, _request(cfg, mode, context, question))
            if "error" in warm:
                raise RuntimeError(
                    f"warm-up request in mode {mode} failed: {warm['error']}\n"
                    f"edge log tail:\n{edge.proc.log()[-1500:]}\ncloud log tail:\n{cloud.proc.log()[-1500:]}"
                )
        for bandwidth in cfg.bandwidths:
            lab.shape(bandwidth)
            for tokens in cfg.tokens:
                context, question, _ = contexts[tokens]
                samples: dict[str, list[dict]] = {m: [] for m in cfg.modes}
                for rep in range(cfg.repeats):
                    for mode in cfg.modes:
                        s = _ask(lab, cloud, cfg, _request(cfg, mode, context, question))
                        samples[mode].append(s)
                        progress(
                            f"{bandwidth} {tokens} tokens {mode} #{rep + 1}: "
                            + (
                                s["error"]
                                if "error" in s
                                else f"{s['bytes']} B, TTFT {s['ttft_s']:.2f} s, total {s['total_s']:.2f} s"
                            )
                        )
                rows += [summarize(bandwidth, tokens, m, samples[m], cfg) for m in cfg.modes]
    return add_ratios(rows)


# ---- report ----------------------------------------------------------------------------------


def _f(x, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def format_rows(rows: list[dict]) -> str:
    """The Markdown table: one row per bandwidth x tokens x mode."""
    lines = [
        "| bandwidth | tokens | mode | wire MB | TTFT s | total s | TTFT/text | total/text | (TTFT − edge prefill)/text |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['bandwidth']} | {r['tokens']} | {r['mode']} | error: {r['error'][:80]} | | | | | |")
            continue
        mode = r["mode"] if r["complete"] else f"{r['mode']} (stream cut)"
        lines.append(
            f"| {r['bandwidth']} | {r['tokens']} | {mode} | {r['bytes'] / 1e6:.3f} | {r['ttft_s']:.2f} | "
            f"{r['total_s']:.2f} | {_f(r['ttft_vs_text'], '.2f')} | {_f(r['total_vs_text'], '.2f')} | "
            f"{_f(r['ttft_minus_edge_prefill_vs_text'], '.2f')} |"
        )
    return "\n".join(lines)


def verdicts(rows: list[dict]) -> list[str]:
    """One line per bandwidth x tokens naming the modes faster than text (ratio < 1), TTFT and total."""
    out = []
    for key in dict.fromkeys((r["bandwidth"], r["tokens"]) for r in rows):
        group = [r for r in rows if (r["bandwidth"], r["tokens"]) == key and r["mode"] != BASELINE]
        parts = []
        for metric, label in (
            ("ttft_vs_text", "first token"),
            ("total_vs_text", "total"),
            ("ttft_minus_edge_prefill_vs_text", "first token with the edge's prefill done ahead"),
        ):
            wins = sorted((r[metric], r["mode"]) for r in group if r.get(metric) is not None and r[metric] < 1.0)
            parts.append(f"beats text on {label}: " + (", ".join(f"{m} ({x:.2f})" for x, m in wins) or "none"))
        out.append(f"{key[0]}, {key[1]} tokens: " + "; ".join(parts))
    return out


def describe(cfg: LinkConfig) -> str:
    """The setup line printed under the table."""
    path = f"through bench.relay adding {cfg.delay_ms:g} ms each way" if cfg.delay_ms > 0 else "on the bare link"
    return (
        f"model {cfg.model}; edge-agent and cloud-agent in two namespaces joined by a tbf-shaped veth, the cloud "
        f"{path}; {cfg.threads} torch thread(s) per daemon; contexts cut from the SQuAD sample passages, question "
        f"about the first passage; max_new_tokens {cfg.max_new_tokens}; median of {cfg.repeats} repeat(s); "
        f"TTFT = client wall time - (generate - first_token); the last column takes the edge's prefill off "
        f"the clock, as if the edge had held the prompt's KV before the question came"
    )
