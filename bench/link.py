"""`kvwire bench link`: time to first token and total latency of text, kv and scout answers over a
tc-shaped link between two network namespaces, each as a ratio to text mode measured in the same run;
then a many-questions workload on one cached document (bench/link_questions.py).

    kvwire bench link --bandwidth 10mbit,100mbit,1gbit --delay 20ms --tokens 512,2048

One NetLab for the whole run, and in it one edge-agent + cloud-agent pair per case, each cloud
reaching its edge's gRPC port through its own bench.relay (which adds --delay each way) across the
shaped veth. Between bandwidths only the tbf qdisc is replaced (lab.shape); the daemons stay up.

Cases (bench/link_report.py CASES):
- cold: the context travels inline in the request, and that edge runs with its prefix cache off
  (--prefix-cache-bytes 0), so every kv/scout request pays the edge's whole prefill as every text
  request pays the cloud's (a context seen for the first time).
- cached: the context is a document registered on that edge (PUT /v1/documents/{id}) and prefilled
  once before the grid by one uncounted request; the rows ask by doc_id, so the edge prefills only
  the question. Text mode with a doc_id fetches the text from the edge (those bytes cross the link
  and count). Each streamed request's prefix-cache hit is checked on the edge's /metrics
  (kvwire_prefix_cache_hits_total / _misses_total before and after it) and shown in the table.

CPU: on two real hosts each daemon has its own CPU. Here all share this machine, so each daemon
gets --threads torch threads (default 1): with 2 cores, the edge's prefill/encode and the cloud's
decode/prefill then run on a core each when they overlap (while a kv stream is in flight), instead
of 2 + 2 threads fighting over 2 cores. Only one request is in flight at a time, so the idle pair
costs nothing but memory. The relays and the request client are light extra processes. Each
request's CPU seconds per daemon come from /proc/<pid>/stat (bench.netlab.daemons.process_cpu_seconds).

Contexts: the distinct passages of the committed SQuAD sample (bench/data), in file order, joined by
blank lines and cut to exactly N tokens of the model's tokenizer; the question is the first
question about the FIRST passage (the one farthest from the question in the prompt). One short
warm-up request per mode and pair before the grid pays torch's first-call costs and opens the gRPC
channel (which then stays open, as between long-running daemons).
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from kvwire.bench.link_report import AUTO, BASELINE, CASES, add_quality
from kvwire.kvcodec.errors import ConfigError

# name -> the /answer request fields of that mode (besides question, context/doc_id, max_new_tokens,
# deadline). scout keeps the same q2c 0.5 positions as the q2c kv row (at retention 1.0 it would only
# add the edge's prefill to text's work); sparse prefills only the kept tokens on the cloud, full the
# whole prompt (docs/documents.md).
MODES: dict[str, dict] = {
    "text": {"mode": "text"},
    "kv-fp16": {"mode": "kv", "profile": "fp16", "retention": 1.0},
    "kv-mixed-int4": {"mode": "kv", "profile": "mixed-int4", "retention": 1.0},
    "kv-q2c0.5-mixed-int4": {"mode": "kv", "profile": "mixed-int4", "selector": "q2c", "retention": 0.5},
    "scout-sparse-q2c0.5": {"mode": "scout", "selector": "q2c", "retention": 0.5, "scout_prefill": "sparse"},
    "scout-full-q2c0.5": {"mode": "scout", "selector": "q2c", "retention": 0.5, "scout_prefill": "full"},
    # the cloud chooses (docs/auto.md) at the default min_quality, without a deadline (a deadline would make it
    # take the highest quality that fits instead of the fastest): compared with the best fixed mode of its cell
    "auto": {"mode": "auto"},
}
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


def parse_cases(text: str) -> list[str]:
    """A comma list of CASES names (cold, cached), in the order given."""
    names = _csv(text)
    unknown = [n for n in names if n not in CASES]
    if unknown or not names:
        raise ConfigError(f"unknown case(s) {', '.join(unknown) or '(none given)'}; known: {', '.join(CASES)}")
    return list(dict.fromkeys(names))


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
    cases: list[str] = field(default_factory=lambda: list(CASES))
    questions: int = 20  # the many-questions workload; 0 skips it
    qa_tokens: int = 2048
    qa_bandwidth: str = "100mbit"
    qa_data: str = "squad-dev"
    quality_table: str | None = None  # the clouds' --quality-table (None: the shipped one for the model)
    # a mid-run link rate change (before, after): on the cached pair, rate_change_requests[0] auto requests at
    # the first rate, then [1] at the second, after the grid; None: not run
    rate_change: tuple[str, str] | None = None
    rate_change_requests: tuple[int, int] = (5, 10)

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
        if self.questions < 0:
            raise ConfigError(f"--questions must be >= 0 (0 skips the many-questions workload), got {self.questions}")
        if self.qa_tokens < 1:
            raise ConfigError(f"--qa-tokens must be >= 1, got {self.qa_tokens}")
        self.modes = parse_modes(",".join(self.modes))
        self.cases = parse_cases(",".join(self.cases))
        parse_bandwidths(self.qa_bandwidth)
        if self.rate_change is not None:
            parse_bandwidths(",".join(self.rate_change))
            if AUTO not in self.modes:
                self.modes = [*self.modes, AUTO]  # the rate change measures auto; its warm-up must include it
            if min(self.rate_change_requests) < 1 or max(self.rate_change_requests) > 100:
                raise ConfigError(
                    f"--rate-change-requests must be two counts in [1, 100], got {self.rate_change_requests}"
                )

    @property
    def pairs(self) -> list[str]:
        """The cases that get an edge + cloud pair: the grid's, and cached for the workload and the rate change."""
        wants_cached = self.questions or self.rate_change is not None
        return self.cases + (["cached"] if wants_cached and "cached" not in self.cases else [])

    @property
    def documents(self) -> list[int]:
        """Token counts of the documents registered (and prefilled) on the cached pair's edge."""
        if "cached" in self.cases:
            return self.tokens
        return self.tokens[:1] if self.rate_change is not None else []

    @property
    def requests(self) -> int:
        """Requests the run sends, warm-ups included: the run's bound is this x (timeout + 30 s) plus start-up."""
        warm = len(self.modes) * len(self.pairs) + len(self.documents) + bool(self.questions)
        grid = len(self.modes) * len(self.cases) * len(self.bandwidths) * len(self.tokens) * self.repeats
        change = sum(self.rate_change_requests) + 1 if self.rate_change is not None else 0  # + text at the new rate
        settle = len(self.pairs) * len(self.bandwidths) if AUTO in self.modes else 0  # link.py _settle
        return warm + settle + grid + len(self.modes) * self.questions + change


def parse_rate_change(text: str) -> tuple[str, str]:
    """ "1gbit:10mbit" -> ("1gbit", "10mbit"), both checked tc rates."""
    parts = [x.strip() for x in text.split(":")]
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"--rate-change {text!r}: use BEFORE:AFTER tc rates, e.g. 1gbit:10mbit")
    parse_bandwidths(",".join(parts))
    return parts[0], parts[1]


def parse_counts(text: str) -> tuple[int, int]:
    """ "5:10" -> (5, 10): requests before and after the rate change."""
    try:
        before, after = (int(x) for x in text.split(":"))
    except ValueError:
        raise ConfigError(f"--rate-change-requests {text!r}: use BEFORE:AFTER request counts, e.g. 5:10") from None
    return before, after


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


WARMUP_DOC_ID = "bench-warmup"


def doc_id_of(tokens: int) -> str:
    return f"bench-link-{tokens}"


def _request(cfg: LinkConfig, mode: str, question: str, context: str | None = None, doc_id: str | None = None) -> dict:
    # the request's deadline is its own timeout, so the cloud does not cut a slow stream short (an
    # anytime answer would make a slow link look fast); a row whose stream was cut anyway says so
    source = {"doc_id": doc_id} if doc_id is not None else {"context": context}
    deadline = {} if MODES[mode]["mode"] == "auto" else {"deadline_ms": int(cfg.timeout_s * 1000)}
    return {"question": question, **source, "max_new_tokens": cfg.max_new_tokens, **deadline, **MODES[mode]}


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
    auto = body.get("auto") or {}
    total = float(res["seconds"])
    ttft = total - (t["generate"] - t["first_token"]) / 1000
    return {
        "total_s": total,
        "ttft_s": ttft,
        "ttft_minus_edge_prefill_s": ttft - t["edge_prefill"] / 1000,
        "prefix_prefill_s": (t["edge_prefill"] - t["edge_question_prefill"]) / 1000,  # 0 on a cache hit
        "bytes": body["bytes_on_wire"],
        "context_tokens": body["context_tokens"],
        "prompt_tokens": body["prompt_tokens"],
        "kept_positions": body["kept_positions"],
        "answer": body["answer"],
        "auto_chose": auto.get("chose", {}).get("label"),
        "auto_quality": auto.get("quality"),
        "auto_predicted_ttft_s": auto["predicted_ms"]["time_to_first_token"] / 1000 if auto else None,
        "cloud_ttft_s": t["time_to_first_token"] / 1000,  # what the cloud measured (auto's prediction is of this)
        "timings_ms": t,
        "complete": body["complete"],  # false: a deadline cut the stream
        "fallback": body.get("fallback"),  # "text": the stream failed and text answered (auto's requests fall back)
    }


@dataclass
class Pair:
    """One case's edge-agent and cloud-agent, their pids (for CPU time) and the edge's prefix-cache
    counters at the last reading."""

    case: str
    edge: object  # bench.netlab.daemons.Daemon
    cloud: object
    edge_pid: int = 0
    cloud_pid: int = 0
    hits: float = 0.0
    misses: float = 0.0

    def cpu(self) -> tuple[float, float]:
        from kvwire.bench.netlab.daemons import process_cpu_seconds

        return process_cpu_seconds(self.edge_pid), process_cpu_seconds(self.cloud_pid)

    def cache_events(self, lab) -> tuple[int, int]:
        """(hits, misses) of the edge's prefix cache since the last call, from its /metrics."""
        from kvwire.bench.netlab.daemons import metric_sum, metrics

        m = metrics(lab, self.edge)
        hits, misses = (
            metric_sum(m, "kvwire_prefix_cache_hits_total"),
            metric_sum(m, "kvwire_prefix_cache_misses_total"),
        )
        delta = round(hits - self.hits), round(misses - self.misses)  # counters: whole numbers sent as floats
        self.hits, self.misses = hits, misses
        return delta


def _ask(lab, pair: Pair, cfg: LinkConfig, request: dict) -> dict:
    """One request, measured: the figures of `measure`, each daemon's CPU seconds over it, and for a
    streamed request to the cached pair the edge's prefix-cache hits and misses it caused."""
    from kvwire.bench.netlab.daemons import answer

    edge0, cloud0 = pair.cpu()
    try:
        s = measure(answer(lab, pair.cloud, request, timeout=cfg.timeout_s + 30))
    except subprocess.TimeoutExpired:
        s = {"error": f"no answer within {cfg.timeout_s + 30:.0f} s"}
    edge1, cloud1 = pair.cpu()
    if "error" not in s:
        s.update(edge_cpu_s=edge1 - edge0, cloud_cpu_s=cloud1 - cloud0)
    if pair.case == "cached" and request["mode"] != BASELINE:
        s["cache_hits"], s["cache_misses"] = pair.cache_events(lab)  # after the CPU reading: not counted in it
    if request["mode"] == AUTO and "error" not in s:
        s["auto_predictions_ms"] = last_auto_choice(pair.cloud.proc.json_lines())
    return s


def last_auto_choice(log_records: list[dict]) -> dict | None:
    """The cloud's last `auto_choice` log line's per-candidate predicted TTFT (ms), edge_holds_prefix and
    what it knew: one request is in flight at a time, so that is the request just answered's."""
    rec = next((r for r in reversed(log_records) if r.get("event") == "auto_choice"), None)
    if rec is None:
        return None
    return {k: rec.get(k) for k in ("chose", "predicted_ttft_ms", "edge_holds_prefix", "known")}


def _describe_sample(s: dict) -> str:
    if "error" in s:
        return s["error"]
    hit = f", edge cache hit {s['cache_hits']:.0f} miss {s['cache_misses']:.0f}" if "cache_hits" in s else ""
    fell = f", fell back to {s['fallback']}" if s.get("fallback") else ""
    return f"{s['bytes']} B, TTFT {s['ttft_s']:.2f} s, total {s['total_s']:.2f} s{hit}{fell}"


def _start_pairs(lab, cfg: LinkConfig, progress) -> dict[str, Pair]:
    """One edge + relay + cloud per case, all launched before any is awaited (their model loads overlap)."""
    from kvwire.bench.netlab.daemons import (
        EDGE_GRPC_PORT,
        daemon_pid,
        edge_grpc_target,
        launch_cloud,
        launch_edge,
        ready,
        start_relay,
    )

    daemon_opts = {"threads": cfg.threads, "grace_seconds": 2}
    started = time.monotonic()
    launched = {}
    for i, case in enumerate(cfg.pairs):
        port = EDGE_GRPC_PORT + i
        target = edge_grpc_target(lab, port)
        if cfg.delay_ms > 0:
            target = start_relay(lab, target, delay_ms=cfg.delay_ms).target
        # never the user's own store; the document's one prefill is the bench's own uncounted request (register),
        # measured, instead of a put-time prefill racing the first measured request
        edge_opts = {"data_dir": str(Path(lab.workdir) / f"edge-{case}-data"), "no_prefill_documents": True}
        if case == "cold":
            edge_opts["prefix_cache_bytes"] = 0  # the cold case: see the module docstring
        launched[case] = (
            launch_edge(lab, cfg.model, grpc_port=port, **edge_opts, **daemon_opts),
            launch_cloud(lab, cfg.model, target, quality_table=cfg.quality_table, **daemon_opts),
        )
    pairs = {}
    for case, (edge_proc, cloud_proc) in launched.items():
        edge, cloud = ready(edge_proc), ready(cloud_proc)
        pairs[case] = Pair(
            case, edge, cloud, daemon_pid(edge, "kvwire.edge_agent"), daemon_pid(cloud, "kvwire.cloud_agent")
        )
    progress(
        f"{len(pairs)} daemon pair(s) ({', '.join(pairs)}) up in {time.monotonic() - started:.1f} s "
        f"(model {cfg.model}, {cfg.threads} thread(s) each)"
    )
    return pairs


def _warm_up(lab, pairs: dict[str, Pair], cfg: LinkConfig, context: str, question: str) -> None:
    """One uncounted short request per mode and pair: torch's first-call costs, the gRPC channel, and
    for the cached pair the document path (its own small document)."""
    from kvwire.bench.netlab.daemons import put_document

    for pair in pairs.values():
        if pair.case == "cached":
            put_document(lab, pair.edge, WARMUP_DOC_ID, context)
        for mode in cfg.modes:
            src = {"doc_id": WARMUP_DOC_ID} if pair.case == "cached" else {"context": context}
            warm = _ask(lab, pair, cfg, _request(cfg, mode, question, **src))
            if "error" in warm:
                raise RuntimeError(
                    f"warm-up request ({pair.case}) in mode {mode} failed: {warm['error']}\n"
                    f"edge log tail:\n{pair.edge.proc.log()[-1500:]}\ncloud log tail:\n{pair.cloud.proc.log()[-1500:]}"
                )
        if pair.case == "cached":
            pair.cache_events(lab)  # from here on, deltas are the measured requests' own


def _settle(lab, pairs: dict[str, Pair], cfg: LinkConfig, context: str, question: str, progress) -> None:
    """After the link's rate changed, one uncounted short fp16 kv stream per pair (what the cloud's own probe
    sends when its link measurement is stale, docs/auto.md): each cell then measures auto on a link its cloud
    has seen, as between long-running daemons; how fast auto follows a change is the rate-change run's."""
    for pair in pairs.values():
        src = {"doc_id": WARMUP_DOC_ID} if pair.case == "cached" else {"context": context}
        s = _ask(lab, pair, cfg, _request(cfg, "kv-fp16", question, **src))
        progress(f"settling stream ({pair.case}, uncounted): {_describe_sample(s)}")


def register(lab, pair: Pair, cfg: LinkConfig, doc_id: str, text: str, question: str, progress) -> dict:
    """Put a document on the cached pair's edge and prefill it with one uncounted kv request (the
    prefill a put-time prefill would do); that request's measured sample (prefix_prefill_s, edge_cpu_s)."""
    from kvwire.bench.netlab.daemons import put_document

    meta = put_document(lab, pair.edge, doc_id, text)
    s = _ask(lab, pair, cfg, _request(cfg, "kv-q2c0.5-mixed-int4", question, doc_id=doc_id))
    if "error" in s:
        raise RuntimeError(
            f"prefilling document {doc_id} failed: {s['error']}\nedge log tail:\n{pair.edge.proc.log()[-1500:]}"
        )
    progress(
        f"document {doc_id} ({meta['tokens']} tokens) registered and prefilled on the edge: "
        f"{s['prefix_prefill_s']:.2f} s prefill, {s['edge_cpu_s']:.2f} edge CPU s, cache miss {s['cache_misses']:.0f}"
    )
    return s


@dataclass
class LinkResult:
    """What a run measured: the grid's rows, and the many-questions workload's rows and document."""

    rows: list[dict]
    question_rows: list[dict] = field(default_factory=list)
    question_meta: dict | None = None
    question_samples: list[dict] = field(default_factory=list)
    rate_change: list[dict] = field(default_factory=list)


def run_link(cfg: LinkConfig, progress: Callable[[str], None] = lambda s: None) -> LinkResult:
    """Start the lab and one daemon pair per case once, then for each bandwidth x tokens x repeat ask
    every case and mode in turn (interleaved, so drift in the shared CPUs' load spreads over all of
    them); one row per bandwidth x tokens x case x mode. Then, unless cfg.questions is 0, the
    many-questions workload on the cached pair at cfg.qa_bandwidth. Raises NetlabUnavailable when
    this machine cannot host the lab."""
    from transformers import AutoTokenizer

    from kvwire.bench.data import load_examples
    from kvwire.bench.link_questions import QA_DOC_ID, pick_question_set, run_questions
    from kvwire.bench.link_report import add_ratios, summarize, summarize_questions
    from kvwire.bench.netlab import LinkSpec, NetLab
    from kvwire.bench.netlab.namespaces import check_available
    from kvwire.kvcodec.models import resolve_model_source

    check_available()  # before loading anything: a clear message when we are not root or lack tc
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_source(cfg.model))
    contexts = {n: build_context(tokenizer, n) for n in [WARMUP_TOKENS, *cfg.tokens]}
    qs = None
    if cfg.questions:  # chosen before the lab starts: a missing data set fails at once
        qs = pick_question_set(load_examples(cfg.qa_data), cfg.qa_tokens, cfg.questions, lambda t: _count(tokenizer, t))
    rows: list[dict] = []
    result = LinkResult(rows)
    with NetLab(LinkSpec(rate=cfg.bandwidths[0])) as lab:
        pairs = _start_pairs(lab, cfg, progress)
        context, question, _ = contexts[WARMUP_TOKENS]
        _warm_up(lab, pairs, cfg, context, question)
        for tokens in cfg.documents:
            context, question, _ = contexts[tokens]
            register(lab, pairs["cached"], cfg, doc_id_of(tokens), context, question, progress)
        for bandwidth in cfg.bandwidths:
            lab.shape(bandwidth)
            if AUTO in cfg.modes:
                _settle(lab, pairs, cfg, *contexts[WARMUP_TOKENS][:2], progress)
            for tokens in cfg.tokens:
                context, question, _ = contexts[tokens]
                samples: dict[tuple[str, str], list[dict]] = {(c, m): [] for c in cfg.cases for m in cfg.modes}
                for rep in range(cfg.repeats):
                    for case in cfg.cases:
                        src = {"doc_id": doc_id_of(tokens)} if case == "cached" else {"context": context}
                        for mode in rotated(cfg.modes, rep):
                            s = _ask(lab, pairs[case], cfg, _request(cfg, mode, question, **src))
                            samples[case, mode].append(s)
                            progress(f"{bandwidth} {tokens} tokens {case} {mode} #{rep + 1}: {_describe_sample(s)}")
                rows += [
                    summarize(bandwidth, tokens, c, m, MODES[m], samples[c, m]) for c in cfg.cases for m in cfg.modes
                ]
        if cfg.rate_change is not None:
            _, question, _ = contexts[cfg.documents[0]]
            result.rate_change = run_rate_change(
                lab, pairs["cached"], cfg, doc_id_of(cfg.documents[0]), question, progress
            )
        if qs is not None:
            pair = pairs["cached"]
            lab.shape(cfg.qa_bandwidth)
            first = register(lab, pair, cfg, QA_DOC_ID, qs.text, qs.questions[0].question, progress)
            result.question_samples = run_questions(
                lambda mode, q: _ask(lab, pair, cfg, _request(cfg, mode, q, doc_id=QA_DOC_ID)),
                qs,
                cfg.modes,
                progress,
            )
            result.question_rows = summarize_questions(result.question_samples)
            result.question_meta = {
                **qs.meta(),
                "bandwidth": cfg.qa_bandwidth,
                "prefix_prefill_s": first["prefix_prefill_s"],
                "prefix_edge_cpu_s": first["edge_cpu_s"],
            }
    add_ratios(rows)
    add_quality(rows, quality_rows(cfg))
    return result


def quality_rows(cfg: LinkConfig) -> list[dict]:
    """The rows of the quality table the clouds loaded (the report's oracle filters by them)."""
    from kvwire.cloud_agent.auto import QualityTable, shipped_quality_table

    table = QualityTable.load(cfg.quality_table) if cfg.quality_table else shipped_quality_table(cfg.model)
    return table.to_dict()["rows"] if table is not None else []


def rotated(modes: list[str], rep: int) -> list[str]:
    """The modes in the order repeat `rep` asks them: rotated by one each repeat, so that a drift in the shared
    CPUs' load (or a background probe) does not always land on the same mode."""
    k = rep % len(modes)
    return modes[k:] + modes[:k]


def run_rate_change(lab, pair: Pair, cfg: LinkConfig, doc_id: str, question: str, progress) -> list[dict]:
    """The link's rate changes under a running cloud: cfg.rate_change_requests[0] auto requests at the first
    rate, then the tc rate is replaced and [1] more at the second, then one text request there for reference.
    Bounded: a fixed count of requests, each within cfg.timeout_s + 30 s. One sample per request, with its
    index, phase (before/after/text) and rate."""
    before, after = cfg.rate_change
    out = []
    for phase, rate, count, mode in (
        ("before", before, cfg.rate_change_requests[0], AUTO),
        ("after", after, cfg.rate_change_requests[1], AUTO),
        ("text", after, 1, BASELINE),
    ):
        lab.shape(rate)
        for i in range(count):
            s = _ask(lab, pair, cfg, _request(cfg, mode, question, doc_id=doc_id))
            s.update(phase=phase, rate=rate, index=i + 1)
            out.append(s)
            chose = f" chose {s.get('auto_chose')}" if mode == AUTO else ""
            progress(f"rate change {phase} {rate} #{i + 1}:{chose} {_describe_sample(s)}")
    return out


def describe(cfg: LinkConfig) -> str:
    """The setup line printed under the tables."""
    path = f"through bench.relay adding {cfg.delay_ms:g} ms each way" if cfg.delay_ms > 0 else "on the bare link"
    return (
        f"model {cfg.model}; one edge-agent + cloud-agent pair per case ({', '.join(cfg.pairs)}) in two namespaces "
        f"joined by a tbf-shaped veth, each cloud {path}; {cfg.threads} torch thread(s) per daemon; contexts cut "
        f"from the SQuAD sample passages, question about the first passage; max_new_tokens {cfg.max_new_tokens}; "
        f"median of {cfg.repeats} repeat(s); TTFT = client wall time - (generate - first_token); the "
        f"(TTFT − edge prefill) column takes the edge's prefill off the clock, as if the edge had held the "
        f"prompt's KV before the question came; CPU s = the daemon process's utime + stime (/proc/<pid>/stat) "
        f"over the request"
    )
