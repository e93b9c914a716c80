"""mode "auto": pick mode, selector, retention and encoding per request from live measurements.

Three parts, each testable alone (docs/auto.md):
- `QualityTable`: the expected quality (share of full-KV quality) and wire ratio of each candidate setting
  on the loaded model, written by `kvwire eval --quality-table` and loaded with `cloud-agent --quality-table`.
- `CostModel`: estimates that follow change, fed by every answer the cloud serves: the link's per-stream
  latency and throughput, the edge's prefill rates (whole prompt, and question only on a cached prefix),
  its select+encode rate, the cloud's decode rate. The cloud's own prefill and per-token step come from the
  reserve estimate it already keeps for deadlines (service.ReserveEstimator). Every rate is a line fitted
  with exponential weights (`LineFit`), so a changed link or load moves it within a few requests.
- `plan()`: predicts each candidate's time to first token and total time and chooses.

The choice: among the candidates whose quality >= min_quality, the lowest predicted time to first token
(ties: the higher quality, then the fewer bytes). With a deadline: the highest quality whose predicted
total fits; when none at or above min_quality fits, the fastest of those (the stream is then cut by the
deadline logic as any stream is, docs/anytime.md). Text on the cloud's own model is always a candidate,
with quality 1.0: it is the answer every other mode approximates.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kvwire.kvcodec.errors import ConfigError
from kvwire.kvcodec.selectors.base import context_budget

AUTO = "auto"
AUTO_CHOSEN_FIELDS = frozenset({"selector", "retention", "profile", "scout_prefill"})
DEFAULT_MIN_QUALITY = 0.95
QUALITY_TABLE_VERSION = 1
TIE = 0.05  # predicted times within 5% of each other count as a tie, won by the higher quality


class LineFit:
    """An exponentially weighted least-squares line y = intercept + slope x (both kept >= 0).

    Costs have a fixed part (a forward pass's per-layer overhead, a stream's round trip) and a part that
    grows with the size: a rate alone, learnt on a small size, would charge the fixed part to every unit
    and overstate a large one's cost many times over.

    The newest point weighs `alpha`; older ones fade by (1 - alpha) each. With one x seen so far it predicts
    proportionally (y/x); an intercept that comes out negative falls back to proportional too. `n` counts
    the points fed (0: nothing known, predict() raises)."""

    def __init__(self, alpha: float):
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self.alpha = alpha
        self.n = 0
        self.w = self.x = self.y = self.xx = self.xy = 0.0

    def add(self, x: float, y: float) -> None:
        keep = 1 - self.alpha if self.w else 0.0
        self.w, self.x, self.y = keep * self.w + 1, keep * self.x + x, keep * self.y + y
        self.xx, self.xy = keep * self.xx + x * x, keep * self.xy + x * y
        self.n += 1

    def coefficients(self) -> tuple[float, float]:
        """(intercept, slope) of the fitted line."""
        if not self.n:
            raise LookupError("nothing measured yet")
        mx, my = self.x / self.w, self.y / self.w
        var = self.xx / self.w - mx * mx
        if var <= 1e-9 * max(1.0, mx * mx):  # one x so far: its rate, through the origin
            return (0.0, my / mx) if mx else (my, 0.0)
        slope = max(0.0, (self.xy / self.w - mx * my) / var)
        intercept = my - slope * mx
        if intercept < 0:  # cheaper than linear at small sizes: proportional is the closer bound
            return 0.0, self.xy / self.xx
        return intercept, slope

    def predict(self, x: float) -> float:
        intercept, slope = self.coefficients()
        return intercept + slope * x


class Ewma:
    """An exponentially weighted mean: the newest value weighs `alpha`. `at`: when it was last fed."""

    def __init__(self, alpha: float):
        self.alpha = alpha
        self.value: float | None = None
        self.n = 0
        self.at: float | None = None

    def add(self, x: float, now: float, alpha: float | None = None) -> None:
        """Feed x; `alpha` overrides the weight of this one value (LinkEstimate weighs a surprise more)."""
        a = self.alpha if alpha is None else alpha
        self.value = x if self.value is None else (1 - a) * self.value + a * x
        self.n += 1
        self.at = now


class LinkEstimate:
    """The edge-cloud link as a latency (seconds per stream or call) and a throughput.

    The throughput is kept as its inverse, seconds per byte, and averaged so: that is what predicts a
    time, and an average of rates would let one fast sample hide a link that has become slow.

    A stream's transfer time (its wall time minus the edge's compute and the cloud's decode) is latency
    plus bytes/throughput. A small stream (< MIN_THROUGHPUT_BYTES) is all latency to within the noise: it
    feeds the latency. A larger one feeds the throughput with its payload time (transfer - latency, at
    least a tenth of the transfer). One line through both (a LineFit) would not do: with streams of one size it can only
    be proportional, and small scout streams would make a fast link look slow. `probe_rtt` feeds the
    latency from a health check's round trip.

    A throughput sample that disagrees with the estimate by more than SURPRISE times (either way) weighs
    SURPRISE_ALPHA instead of alpha: a link that changed (a tc rate from 1 Gbit/s to 10 Mbit/s is 100x) is
    followed from its first stream, while the ordinary jitter of a shared host (well within 3x) still averages."""

    MIN_THROUGHPUT_BYTES = 64 * 1024
    SURPRISE = 3.0
    SURPRISE_ALPHA = 0.8

    def __init__(self, alpha: float, prior_latency_s: float, prior_bps: float, clock=time.monotonic):
        self.latency, self.s_per_byte = Ewma(alpha), Ewma(alpha)
        self.prior_latency_s, self.prior_bps = prior_latency_s, prior_bps
        self.clock = clock
        self._lock = threading.Lock()

    def observe_rtt(self, seconds: float) -> None:
        if seconds >= 0:
            with self._lock:
                self.latency.add(seconds, self.clock())

    def observe_transfer(self, nbytes: int, seconds: float) -> None:
        if nbytes <= 0 or seconds < 0:
            return
        with self._lock:
            now = self.clock()
            if nbytes < self.MIN_THROUGHPUT_BYTES:
                self.latency.add(seconds, now)
                return
            latency = self.latency.value if self.latency.value is not None else 0.0
            # a stream faster than the latency estimate says the link is fast, not infinitely so: its payload
            # is taken as at least a tenth of its time (a noisy latency must not keep the throughput unmeasured)
            payload_s = max(seconds - latency, 0.1 * seconds)
            if payload_s > 0:
                sample, known = payload_s / nbytes, self.s_per_byte.value
                surprise = known is not None and not known / self.SURPRISE <= sample <= known * self.SURPRISE
                self.s_per_byte.add(sample, now, self.SURPRISE_ALPHA if surprise else None)

    def predict(self, nbytes: int) -> float:
        with self._lock:
            latency = self.latency.value if self.latency.value is not None else self.prior_latency_s
            per_byte = self.s_per_byte.value if self.s_per_byte.value is not None else 1 / self.prior_bps
        return latency + nbytes * per_byte

    def age_s(self) -> float | None:
        """Seconds since the throughput was last measured (None: never)."""
        with self._lock:
            return None if self.s_per_byte.at is None else self.clock() - self.s_per_byte.at


@dataclass(frozen=True)
class Setting:
    """One way to answer: what /answer's fields would say."""

    mode: str
    selector: str = "q2c"
    retention: float = 1.0
    profile: str | None = None
    scout_prefill: str | None = None

    def label(self) -> str:
        if self.mode == "text":
            return "text"
        parts = [self.mode, f"{self.selector}@{self.retention:g}"]
        if self.mode == "kv":
            parts.append(self.profile or "edge-default")
        if self.mode == "scout":
            parts.append(self.scout_prefill or "sparse")
        return " ".join(parts)


@dataclass(frozen=True)
class Candidate:
    setting: Setting
    quality: float  # share of full-KV quality, 0..1
    wire_ratio: float  # stream bytes / FP16 KV bytes of the whole prompt (kv, scout); text: unused
    quality_se: float = 0.0


TEXT = Candidate(Setting("text"), quality=1.0, wire_ratio=0.0)


@dataclass
class QualityTable:
    """Expected quality of each setting on one model (what `kvwire eval --quality-table` measured)."""

    model: str
    measure: str
    candidates: list[Candidate]
    source: str = ""

    @classmethod
    def from_dict(cls, data: dict, source: str = "") -> QualityTable:
        where = source or "quality table"
        if not isinstance(data, dict) or data.get("kvwire_quality_table") != QUALITY_TABLE_VERSION:
            raise ConfigError(f"{where}: not a KVWire quality table (version {QUALITY_TABLE_VERSION})")
        rows = data.get("rows")
        if not isinstance(rows, list) or not rows:
            raise ConfigError(f"{where}: 'rows' must be a non-empty list")
        out = []
        for i, row in enumerate(rows):
            try:
                setting = Setting(
                    mode=str(row["mode"]),
                    selector=str(row.get("selector", "q2c")),
                    retention=float(row.get("retention", 1.0)),
                    profile=row.get("profile"),
                    scout_prefill=row.get("scout_prefill"),
                )
                cand = Candidate(
                    setting, float(row["quality"]), float(row.get("wire_ratio", 0.0)), float(row.get("se", 0.0))
                )
            except (KeyError, TypeError, ValueError) as exc:
                raise ConfigError(f"{where}: row {i} is not a candidate ({exc!r}): {row!r}") from None
            if setting.mode not in ("kv", "scout", "text"):
                raise ConfigError(f"{where}: row {i}: mode {setting.mode!r} is not kv, scout or text")
            if not 0 < setting.retention <= 1 or not 0 <= cand.quality <= 1.5 or cand.wire_ratio < 0:
                raise ConfigError(f"{where}: row {i}: retention, quality or wire_ratio out of range: {row!r}")
            out.append(cand)
        return cls(str(data.get("model", "")), str(data.get("measure", "")), out, source)

    @classmethod
    def load(cls, path: str | Path) -> QualityTable:
        p = Path(path)
        try:
            data = json.loads(p.read_text())
        except FileNotFoundError:
            raise ConfigError(f"quality table {str(p)!r} does not exist") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"quality table {str(p)!r} is not valid JSON: {exc}") from None
        return cls.from_dict(data, str(p))

    def to_dict(self) -> dict:
        return {
            "kvwire_quality_table": QUALITY_TABLE_VERSION,
            "model": self.model,
            "measure": self.measure,
            "rows": [
                {**asdict(c.setting), "quality": c.quality, "se": c.quality_se, "wire_ratio": c.wire_ratio}
                for c in self.candidates
            ],
        }


SHIPPED_TABLES = {"embedded": "quality-embedded.json"}  # model setting -> cloud_agent/data/ file


def shipped_quality_table(model: str) -> QualityTable | None:
    """The quality table shipped for a model setting (the embedded default), or None."""
    name = SHIPPED_TABLES.get(model)
    if name is None:
        return None
    return QualityTable.load(Path(__file__).parent / "data" / name)


@dataclass(frozen=True)
class RequestFacts:
    """What the cloud knows of a request before choosing."""

    prompt_tokens: int
    context_tokens: int
    question_tokens: int  # question + template suffix: what the edge prefills on a cached prefix
    context_bytes: int  # UTF-8 bytes of the context (text mode ships them; kv/scout send inline ones to the edge)
    question_bytes: int
    fp16_kv_bytes: int  # of the whole prompt on this model
    max_new_tokens: int
    doc_id: str | None = None
    edge_holds_prefix: bool = False


@dataclass(frozen=True)
class Prediction:
    candidate: Candidate
    ttft_s: float
    total_s: float
    wire_bytes: int
    parts: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Plan:
    chosen: Prediction
    predictions: list[Prediction]  # every candidate considered, in the table's order
    reason: str
    fits: bool | None = None  # with a deadline: whether the chosen one is predicted to fit

    def describe(self) -> dict:
        """The response's "auto" field."""
        p = self.chosen
        return {
            "chose": {**asdict(p.candidate.setting), "label": p.candidate.setting.label()},
            "quality": p.candidate.quality,
            "predicted_ms": {"time_to_first_token": round(p.ttft_s * 1000, 3), "total": round(p.total_s * 1000, 3)},
            "candidates": len(self.predictions),
            "reason": self.reason,
            "fits": self.fits,
        }


class CostModel:
    """Live estimates of every cost a mode pays, fed by the answers this cloud serves.

    Priors stand in until a quantity is measured; `known()` says which are. The cloud's own prefill and
    per-token step come from `cloud` (an object with setup_estimate(mode, positions) and
    generation_estimate(tokens), i.e. service.ReserveEstimator), so deadlines and auto share one estimate.
    """

    ALPHA = 0.3
    # priors: a slow link and a slow edge, so an unmeasured kv path is not chosen on optimism
    PRIOR_LINK_S = 0.05  # per stream or call: round trip and setup
    PRIOR_LINK_BPS = 10e6 / 8  # 10 Mbit/s
    PRIOR_EDGE_PREFILL_S_PER_TOKEN = 2e-3
    PRIOR_EDGE_SELECT_S_PER_POSITION = 2e-5
    PRIOR_DECODE_S_PER_BYTE = 2e-9
    REMEMBERED_CONTEXTS = 256  # inline contexts the edge is assumed to hold in its prefix cache

    def __init__(self, cloud, clock=time.monotonic):
        self.cloud = cloud
        self.link = LinkEstimate(self.ALPHA, self.PRIOR_LINK_S, self.PRIOR_LINK_BPS, clock)
        self.edge_prefill = LineFit(self.ALPHA)  # prompt tokens -> s (cold prefix)
        self.edge_question = LineFit(self.ALPHA)  # question tokens -> s (cached prefix)
        self.edge_select: dict[str, LineFit] = {}  # per mode: context positions -> s (select + encode)
        self.decode = LineFit(self.ALPHA)  # wire bytes -> s
        self._seen: OrderedDict[str, None] = OrderedDict()  # inline contexts the edge is believed to hold
        self._pending: OrderedDict[str, None] = OrderedDict()  # streamed cold before the edge showed it keeps any
        self.edge_keeps_prefixes = False  # set by the first stream the edge served from its prefix cache
        self._lock = threading.Lock()

    # --- observations -------------------------------------------------------------------------------
    def observe_transfer(self, wire_bytes: int, seconds: float) -> None:
        self.link.observe_transfer(wire_bytes, seconds)

    def observe_edge(
        self, mode: str, timings_ms: dict, prompt_tokens: int, question_tokens: int, context_tokens: int
    ) -> None:
        """The edge's own timings of one stream (its prefill, question_prefill, select, encode stages)."""
        with self._lock:
            question_s = timings_ms.get("question_prefill", 0.0) / 1000
            prefill_s = timings_ms.get("prefill", 0.0) / 1000
            if question_s > 0 and prefill_s == 0:
                self.edge_question.add(question_tokens, question_s)
            elif prefill_s > 0:
                self.edge_prefill.add(prompt_tokens, prefill_s + question_s)
            select_s = (timings_ms.get("select", 0.0) + timings_ms.get("encode", 0.0)) / 1000
            if select_s > 0:
                self.edge_select.setdefault(mode, LineFit(self.ALPHA)).add(context_tokens, select_s)

    def observe_decode(self, wire_bytes: int, seconds: float) -> None:
        if wire_bytes > 0 and seconds >= 0:
            with self._lock:
                self.decode.add(wire_bytes, seconds)

    def observe_context(self, key: str | None, hit: bool) -> None:
        """A stream's prefix was (hit) or was not served from the edge's prefix cache; key: the inline context's
        (context_key), None for a document.

        A cold inline context is only believed cached on the edge once the edge has shown it keeps prefixes at
        all, by one hit (inline or a document's): an edge without a prefix cache (or one too small to keep it)
        would otherwise be predicted to hold every context it was just sent, and kv chosen on that promise.
        Contexts streamed cold before that are kept aside and believed cached from the first hit on."""
        with self._lock:
            if hit:
                if not self.edge_keeps_prefixes:
                    self.edge_keeps_prefixes = True
                    for k in self._pending:
                        self._remember(k)
                    self._pending.clear()
                if key is not None:
                    self._remember(key)
                return
            if key is None:
                return
            if key in self._seen:  # believed cached, and it was not: evicted (or the cache is gone)
                del self._seen[key]
                return
            if self.edge_keeps_prefixes:
                self._remember(key)
            else:
                self._pending[key] = None
                self._pending.move_to_end(key)
                while len(self._pending) > self.REMEMBERED_CONTEXTS:
                    self._pending.popitem(last=False)

    def _remember(self, key: str) -> None:
        self._seen[key] = None
        self._seen.move_to_end(key)
        while len(self._seen) > self.REMEMBERED_CONTEXTS:
            self._seen.popitem(last=False)

    def holds_context(self, key: str) -> bool:
        with self._lock:
            return key in self._seen

    def known(self) -> dict[str, bool]:
        with self._lock:
            return {
                "link_latency": self.link.latency.n > 0,
                "link_throughput": self.link.s_per_byte.n > 0,
                "edge_prefill": self.edge_prefill.n > 0,
                "edge_question_prefill": self.edge_question.n > 0,
                "edge_select": bool(self.edge_select),
                "decode": self.decode.n > 0,
            }

    # --- predictions --------------------------------------------------------------------------------
    def _fit(self, fit: LineFit, x: float, prior_intercept: float, prior_slope: float) -> float:
        with self._lock:
            if fit.n:
                return fit.predict(x)
        return prior_intercept + prior_slope * x

    def link_s(self, nbytes: int) -> float:
        return self.link.predict(nbytes)

    def edge_s(self, facts: RequestFacts) -> float:
        """The edge's prefill: only the question on a cached prefix (falls back to the cold rate scaled)."""
        if facts.edge_holds_prefix:
            with self._lock:
                if self.edge_question.n:
                    return self.edge_question.predict(facts.question_tokens)
            return self._fit(self.edge_prefill, facts.question_tokens, 0.0, self.PRIOR_EDGE_PREFILL_S_PER_TOKEN)
        return self._fit(self.edge_prefill, facts.prompt_tokens, 0.0, self.PRIOR_EDGE_PREFILL_S_PER_TOKEN)

    def predict(self, cand: Candidate, facts: RequestFacts) -> Prediction:
        s = cand.setting
        gen_rest = self.cloud.generation_estimate(max(0, facts.max_new_tokens - 1))
        first_step = self.cloud.generation_estimate(1)
        parts: dict[str, float] = {}
        if s.mode == "text":
            wire = facts.context_bytes + facts.question_bytes
            if facts.doc_id is not None:  # the cloud fetches the document's text from the edge
                parts["fetch"] = self.link_s(facts.context_bytes)
            parts["prefill"] = self.cloud.setup_estimate("text", facts.prompt_tokens)
        else:
            kept_context = context_budget(s.retention, facts.context_tokens)
            kept = facts.prompt_tokens - facts.context_tokens + kept_context - 1  # the last token is the cloud's
            wire = max(1, round(cand.wire_ratio * facts.fp16_kv_bytes))
            if facts.doc_id is None:  # the inline context travels to the edge first
                parts["upload"] = self.link_s(facts.context_bytes + facts.question_bytes)
            parts["edge_prefill"] = self.edge_s(facts)
            with self._lock:
                select = self.edge_select.get(s.mode)
            parts["select_encode"] = (
                select.predict(facts.context_tokens)
                if select is not None
                else self.PRIOR_EDGE_SELECT_S_PER_POSITION * facts.context_tokens
            )
            parts["transfer"] = self.link_s(wire)
            parts["decode"] = self._fit(self.decode, wire, 0.0, self.PRIOR_DECODE_S_PER_BYTE)
            if s.mode == "scout" and (s.scout_prefill or "sparse") == "full":
                positions = facts.prompt_tokens - 1
            else:
                positions = kept
            parts["setup"] = self.cloud.setup_estimate(s.mode, positions)
        parts["first_step"] = first_step
        ttft = sum(parts.values())
        return Prediction(cand, ttft, ttft + gen_rest, wire, parts)


def plan(
    cost: CostModel,
    table: QualityTable | None,
    facts: RequestFacts,
    min_quality: float = DEFAULT_MIN_QUALITY,
    deadline_s: float | None = None,
    allowed=lambda setting: True,
) -> Plan:
    """Choose a setting for one request (module docstring: the rule). `allowed` filters settings the request
    or the cloud cannot use (e.g. kv across different models)."""
    cands = [TEXT] + [c for c in (table.candidates if table else []) if c.setting.mode != "text" and allowed(c.setting)]
    preds = [cost.predict(c, facts) for c in cands]
    eligible = [p for p in preds if p.candidate.quality >= min_quality] or [preds[0]]

    def fastest(ps: list[Prediction], key=lambda p: p.ttft_s) -> Prediction:
        best = min(key(p) for p in ps)
        near = [p for p in ps if key(p) <= best * (1 + TIE) + 1e-9]
        return max(near, key=lambda p: (p.candidate.quality, -p.wire_bytes))

    if deadline_s is None:
        chosen = fastest(eligible)
        return Plan(chosen, preds, f"lowest predicted time to first token with quality >= {min_quality:g}")
    fitting = [p for p in eligible if p.total_s <= deadline_s]
    if fitting:
        top = max(p.candidate.quality for p in fitting)
        chosen = fastest([p for p in fitting if p.candidate.quality >= top - 1e-9])
        return Plan(chosen, preds, "highest quality predicted to fit the deadline", fits=True)
    chosen = fastest(eligible, key=lambda p: p.total_s)
    return Plan(chosen, preds, f"nothing with quality >= {min_quality:g} is predicted to fit: the fastest", fits=False)
