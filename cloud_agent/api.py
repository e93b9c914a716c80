"""The /answer request and response bodies."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from kvwire.cloud_agent.auto import AUTO, AUTO_CHOSEN_FIELDS, DEFAULT_MIN_QUALITY
from kvwire.kvcodec.modes import get_mode, mode_names
from kvwire.kvcodec.modes.scout import DEFAULT_SCOUT_PREFILL, SCOUT_PREFILLS
from kvwire.kvcodec.selectors import DEFAULT_SELECTOR, HEAD_BUDGETS, selector_names
from kvwire.kvcodec.stream import DEFAULT_QUESTION_KV, DEFAULT_TEMPLATE_KV, FIXED_SOURCES

DEFAULT_MAX_NEW_TOKENS = 32


class AnswerRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # pattern: at least one non-space character (an all-space context or question has nothing to ask about)
    question: str = Field(min_length=1, pattern=r"\S", description="the question about the context")
    context: str | None = Field(None, min_length=1, pattern=r"\S", description="the passage the question is about")
    doc_id: str | None = Field(
        None,
        min_length=1,
        max_length=128,
        description="instead of context: a document registered on the edge (docs/documents.md); kv and scout "
        "stream from the edge's cached prefix, text fetches the document's text from the edge",
    )
    mode: Literal[(*mode_names(), AUTO)] = Field(  # type: ignore[valid-type]  # the allowed values are the registry's
        "kv",
        description="; ".join(f"{name}: {get_mode(name).description}" for name in mode_names())
        + f"; {AUTO}: the cloud chooses mode, selector, retention, profile and scout_prefill from its live "
        "measurements and its quality table (docs/auto.md)",
    )
    min_quality: float = Field(
        DEFAULT_MIN_QUALITY,
        gt=0,
        le=1,
        description="mode auto: the share of full-KV quality the answer must keep, on the scale of the cloud's "
        "quality table (docs/auto.md)",
    )
    selector: str = Field(DEFAULT_SELECTOR, description="context selector: " + ", ".join(selector_names()))
    retention: float = Field(1.0, gt=0, le=1, description="share of context positions kept (0, 1]")
    profile: str | None = Field(
        None, description="precision profile (kv mode); default: the edge's --profile (kivi-4 unless configured)"
    )
    scout_prefill: Literal[SCOUT_PREFILLS] = Field(  # type: ignore[valid-type]
        DEFAULT_SCOUT_PREFILL,
        description="scout mode: sparse prefills only the kept tokens at their positions (the time saver); "
        "full prefills the whole prompt and drops the rest (docs/documents.md compares them)",
    )
    template_kv: Literal[FIXED_SOURCES] = Field(  # type: ignore[valid-type]
        DEFAULT_TEMPLATE_KV,
        description="kv/scout: stream sends the template prefix (the tokens before the context) from the edge; "
        "cloud uses this cloud's own cached KV of it, checked against the stream's template digest "
        "(docs/codec.md, fixed positions)",
    )
    question_kv: Literal[FIXED_SOURCES] = Field(  # type: ignore[valid-type]
        DEFAULT_QUESTION_KV,
        description="kv/scout: stream sends the KV of the question and template suffix from the edge; cloud "
        "prefills them here on top of the received context (their ids travel in the stream header)",
    )
    heads: Literal[HEAD_BUDGETS] | None = Field(  # type: ignore[valid-type]
        None,
        description="kv: a position set per (layer, KV head) under this budget (global: one budget over all "
        "layers and heads; layer: per layer, free across its heads), streamed in the per-head layout; default: "
        "one set for every layer and head (docs/selection.md)",
    )
    max_new_tokens: int = Field(
        DEFAULT_MAX_NEW_TOKENS,
        ge=1,
        le=4096,
        description="answer length cap in tokens, at most the cloud's --max-new-tokens (its OpenAPI schema says "
        "which); default 32, or that limit if lower",
    )
    deadline_ms: int | None = Field(
        None,
        ge=1,
        le=3_600_000,
        description=(
            "when the answer is due, from the request's arrival at the cloud. kv/scout: the edge stream is cut in time "
            "to generate max_new_tokens tokens from the positions that arrived (default: the cloud's "
            "--default-deadline-ms); text: refused at once (504) when the answer is estimated not to fit. "
            "Generation is not interrupted (docs/anytime.md)"
        ),
    )
    fallback: Literal["none", "text"] = Field(
        "none",
        description=(
            "text: when the edge stream fails (unreachable, killed, busy, rejected, nothing usable by the deadline), "
            "answer in text mode instead of an error, if the deadline leaves time (mode auto: text unless set)"
        ),
    )
    stream: bool = Field(
        False,
        description=(
            "true: answer with server-sent events, one `token` event per generated token as it exists, then one "
            "`answer` event with the whole response body (docs/daemons.md#streaming)"
        ),
    )
    temperature: float = Field(0.0, ge=0, le=2, description="0: greedy (the default); above 0: sample at it")
    top_p: float = Field(1.0, gt=0, le=1, description="sampling: draw from the smallest set of tokens of this mass")
    seed: int | None = Field(
        None, ge=0, le=2**63 - 1, description="sampling: the same seed gives the same answer (none: a fresh one)"
    )
    stop: list[Annotated[str, StringConstraints(min_length=1, max_length=64)]] = Field(
        default_factory=list, max_length=4, description="up to 4 strings; the answer ends before the first one"
    )

    @model_validator(mode="after")
    def _context_or_doc_id(self):
        if (self.context is None) == (self.doc_id is None):
            raise ValueError("send exactly one of context and doc_id")
        return self

    @model_validator(mode="after")
    def _auto_chooses(self):
        if self.mode == AUTO:
            pinned = sorted(AUTO_CHOSEN_FIELDS & self.model_fields_set)
            if pinned:
                raise ValueError(
                    f"mode auto chooses {', '.join(sorted(AUTO_CHOSEN_FIELDS))}; this request sets "
                    f"{', '.join(pinned)}: leave them out, or name a mode"
                )
        elif "min_quality" in self.model_fields_set:
            raise ValueError("min_quality applies to mode auto only")
        return self


class TimingsMs(BaseModel):
    """Milliseconds per stage. edge_*/select/encode are measured on the edge; transfer is the stream's
    wall time minus the edge's compute and the cloud's decode; prefill is the cloud's own prefill
    (scout and text); generate includes first_token."""

    edge_prefill: float = 0.0
    edge_question_prefill: float = 0.0
    select: float = 0.0
    encode: float = 0.0
    transfer: float = 0.0
    decode: float = 0.0
    inject: float = 0.0
    prefill: float = 0.0
    first_token: float = 0.0
    generate: float = 0.0
    total: float = 0.0
    time_to_first_token: float = Field(0.0, description="from the request's arrival to its first generated token")


class AutoSetting(BaseModel):
    mode: str
    selector: str
    retention: float
    profile: str | None
    scout_prefill: str | None
    label: str = Field(description="the setting in a few words, e.g. 'kv q2c@0.5 mixed-int4'")


class AutoPredicted(BaseModel):
    time_to_first_token: float
    total: float


class AutoChoice(BaseModel):
    """What mode auto chose for this request, and why (docs/auto.md)."""

    chose: AutoSetting
    quality: float = Field(description="the chosen setting's expected quality in the quality table")
    predicted_ms: AutoPredicted
    candidates: int = Field(description="settings the cloud predicted (text and the quality table's rows)")
    reason: str
    fits: bool | None = Field(description="with deadline_ms: whether the chosen setting is predicted to fit it")


class AnswerResponse(BaseModel):
    answer: str
    mode: str = Field(description="the mode that produced the answer: the requested one, or text after a fallback")
    bytes_on_wire: int = Field(
        description="codec frame bytes received from the edge; in text mode the UTF-8 bytes of context and question"
    )
    wire_ratio: float = Field(description="bytes_on_wire / FP16 KV bytes of the full prompt on this model")
    kept_positions: int
    context_tokens: int
    prompt_tokens: int
    timings_ms: TimingsMs
    request_id: str
    complete: bool = Field(
        True, description="the whole edge stream arrived (false: a deadline cut it; true in text mode)"
    )
    retention_achieved: float = Field(
        1.0, description="context positions the answer used / context tokens (1.0 in text mode)"
    )
    fallback: str | None = Field(
        None, description="text when the edge stream failed and the answer came from text mode"
    )
    fallback_reason: str | None = Field(
        None, description="why it fell back: the error the request would otherwise have got"
    )
    answer_tokens: int = Field(0, description="tokens generated (the stop token not counted)")
    finish_reason: Literal["stop", "length", "cancelled"] = Field(
        "stop", description="stop: a stop token or stop string; length: max_new_tokens; cancelled: the client left"
    )
    auto: AutoChoice | None = Field(None, description="mode auto: what was chosen, and the predicted times")


class ErrorBody(BaseModel):
    """Every error's body, whatever its status (cloud_agent/errors.py maps errors to statuses)."""

    detail: str = Field(description="what went wrong, in words a caller can act on")
    error: str = Field(description="the outcome label of kvwire_requests_total: invalid, too_long, deadline, ...")
    request_id: str | None = Field(description="the request's id (X-Request-ID), as in the cloud-agent's logs")
