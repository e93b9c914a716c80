"""The OpenAI-compatible routes: POST /v1/chat/completions (streamed or not) and GET /v1/models.

A chat completion is translated into one AnswerRequest and served by AnswerService like /answer: the
last user message is the question; the context and KVWire's own options come from the request's
`kvwire` object (clients pass it in their extra body fields); without one the request is a plain chat
in text mode whose context is the conversation itself. Errors use OpenAI's shape,
{"error": {"message", "type", "param", "code"}}, with the status codes of cloud_agent/errors.py.
"""

from __future__ import annotations

import json
import time
from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kvwire.agent_common.logs import request_id_var
from kvwire.cloud_agent.api import AnswerRequest, AnswerResponse
from kvwire.cloud_agent.errors import error_response, message_of
from kvwire.cloud_agent.service import AnswerService
from kvwire.cloud_agent.streaming import SSE_HEADERS, AnswerStream
from kvwire.kvcodec.errors import ConfigError

PREFIX = "/v1/"
# OpenAI's error type per HTTP status; the code is KVWire's outcome label (cloud_agent/errors.py)
ERROR_TYPES = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error", 503: "overloaded_error"}
KEPT_HEADERS = ("retry-after", "www-authenticate")


def openai_error_response(exc: BaseException, request_id: str | None) -> JSONResponse:
    """`exc` with the status and headers error_response gives it, in OpenAI's error body."""
    plain = error_response(exc, request_id)
    status = plain.status_code
    kind = ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    body = {"error": {"message": message_of(exc), "type": kind, "param": None, "code": json.loads(plain.body)["error"]}}
    headers = {k: v for k, v in plain.headers.items() if k in KEPT_HEADERS}
    return JSONResponse(body, status_code=status, headers=headers)


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")  # name, tool_call_id and the like change nothing here

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    @property
    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class KVWireOptions(BaseModel):
    """What the OpenAI format has no field for; each field means what it means on /answer."""

    model_config = ConfigDict(extra="forbid")

    context: str | None = Field(None, description="the passage the question is about (default: the conversation)")
    doc_id: str | None = Field(None, description="a document stored on the edge instead of `context`")
    mode: str = Field("kv", description="kv, scout, text or auto (see /answer)")
    selector: str | None = None
    retention: float | None = None
    profile: str | None = None
    deadline_ms: int | None = None
    fallback: str | None = None
    min_quality: float | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="any name: this server serves one model (GET /v1/models) and answers with it")
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2, description="default 0: greedy (OpenAI's default is 1)")
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="the same as max_tokens")
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0)
    n: int = Field(1, ge=1, le=1, description="one choice only")
    user: str | None = None
    kvwire: KVWireOptions | None = None


def _question_and_conversation(messages: list[ChatMessage]) -> tuple[str, str]:
    users = [m for m in messages if m.role == "user" and m.text.strip()]
    if not users:
        raise ConfigError("messages: no user message with text; the last user message is the question")
    conversation = "\n".join(f"{m.role}: {m.text}" for m in messages if m.text.strip())
    return users[-1].text, conversation


def to_answer_request(body: ChatCompletionRequest) -> AnswerRequest:
    """The AnswerRequest a chat completion asks for; ConfigError (422) names the field at fault."""
    question, conversation = _question_and_conversation(body.messages)
    opts = body.kvwire
    fields: dict = {"question": question, "mode": "text"}
    if opts is not None:
        given = opts.model_dump(exclude_none=True, exclude={"context", "doc_id"})
        fields.update(given)
        if opts.doc_id is not None:
            if "doc_id" not in AnswerRequest.model_fields:
                raise ConfigError("kvwire.doc_id: doc_id is not supported yet; send the passage as kvwire.context")
            fields["doc_id"] = opts.doc_id
        if opts.context is not None:
            fields["context"] = opts.context
    if "context" not in fields and "doc_id" not in fields:
        fields["context"] = conversation
    if body.stop is not None:
        fields["stop"] = [body.stop] if isinstance(body.stop, str) else body.stop
    for ours, theirs in (("temperature", body.temperature), ("top_p", body.top_p), ("seed", body.seed)):
        if theirs is not None:
            fields[ours] = theirs
    max_tokens = body.max_completion_tokens or body.max_tokens
    if max_tokens is not None:
        fields["max_new_tokens"] = max_tokens
    try:
        return AnswerRequest.model_validate(fields)
    except ValidationError as exc:
        problems = "; ".join(f"{_where(e['loc'])}: {e['msg']}" for e in exc.errors())
        raise ConfigError(problems) from None


def _where(loc: tuple) -> str:
    renamed = {"max_new_tokens": "max_tokens", "question": "messages"}
    name = ".".join(str(x) for x in loc)
    top = str(loc[0]) if loc else ""
    if top in renamed:
        return renamed[top]
    return name if top in ChatCompletionRequest.model_fields else f"kvwire.{name}"


def _usage(response: AnswerResponse) -> dict:
    return {
        "prompt_tokens": response.prompt_tokens,
        "completion_tokens": response.answer_tokens,
        "total_tokens": response.prompt_tokens + response.answer_tokens,
    }


def _kvwire(response: AnswerResponse) -> dict:
    """KVWire's figures for this answer: the /answer response body less the answer."""
    return response.model_dump(exclude={"answer"})


def _finish(response: AnswerResponse) -> str:
    return "length" if response.finish_reason == "length" else "stop"


def openai_router(service: AnswerService) -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["openai"])
    model_id = service.loaded.source
    started = int(time.time())

    @router.get("/models")
    async def models():
        """The one model this cloud-agent serves."""
        return {
            "object": "list",
            "data": [{"id": model_id, "object": "model", "created": started, "owned_by": "kvwire"}],
        }

    @router.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        """A chat completion in OpenAI's format, streamed (`stream: true`, server-sent chunks) or not;
        KVWire's options in the `kvwire` object, its figures in the response's `kvwire` field."""
        rid = request_id_var.get()
        req = to_answer_request(body)
        meta = {"id": f"chatcmpl-{rid}", "created": int(time.time()), "model": model_id}
        if not body.stream:
            response = await service.answer(req, rid)
            return {
                **meta,
                "object": "chat.completion",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": response.answer},
                        "finish_reason": _finish(response),
                        "logprobs": None,
                    }
                ],
                "usage": _usage(response),
                "kvwire": _kvwire(response),
            }
        stream = await service.answer_stream(req, rid)
        usage = body.stream_options is not None and body.stream_options.include_usage
        return StreamingResponse(_chunks(stream, meta, usage), media_type="text/event-stream", headers=SSE_HEADERS)

    return router


async def _chunks(stream: AnswerStream, meta: dict, include_usage: bool):
    """chat.completion.chunk events: the role, a content delta per token that adds text, the finish
    (with KVWire's figures), the usage when asked for, then [DONE]; an error after the first token
    comes as an error event."""

    def chunk(delta: dict, finish: str | None = None, **extra) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        data = {**meta, "object": "chat.completion.chunk", "choices": [choice], **extra}
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()

    try:
        yield chunk({"role": "assistant", "content": ""})
    except BaseException:
        stream.cancelled.set()  # closed before events() began: it would never learn that the client left
        raise
    async for kind, value in stream.events():
        if kind == "token":
            if value["text"]:
                yield chunk({"content": value["text"]})
        elif kind == "answer":
            yield chunk({}, _finish(value), kvwire=_kvwire(value))
            if include_usage:
                data = {**meta, "object": "chat.completion.chunk", "choices": [], "usage": _usage(value)}
                yield f"data: {json.dumps(data)}\n\n".encode()
        else:
            error = json.loads(openai_error_response(value, meta["id"].removeprefix("chatcmpl-")).body)
            yield f"data: {json.dumps(error, ensure_ascii=False)}\n\n".encode()
    yield b"data: [DONE]\n\n"
