"""Answers as they are generated: tokens to text deltas (TextStream), a worker thread's events to the
event loop (AnswerStream), and server-sent events on the wire (sse)."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import AsyncIterator, Callable, Sequence

from fastapi.responses import StreamingResponse

from kvwire.agent_common.logs import log_event
from kvwire.cloud_agent.errors import classify, message_of

log = logging.getLogger("kvwire.cloud_agent")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # proxies must not buffer the events
REPLACEMENT = "\ufffd"  # what decode() shows for the first bytes of a character whose last token is yet to come


def sse(event: str, data: dict) -> bytes:
    """One server-sent event (`event:` line, one `data:` line of JSON, blank line)."""
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


class TextStream:
    """The text of an answer as its tokens come: each token's delta is what the answer gained by it.

    The text is the answer's own (decoded without special tokens, no leading whitespace); trailing
    whitespace, a trailing broken character and anything that may be the start of a stop string are
    held back until the next token settles them, so the deltas add up to the final answer. `push` is
    the generation's on_token: it returns False once a stop string appears or `cancelled` is set.
    """

    def __init__(
        self,
        tokenizer,
        stop: Sequence[str] = (),
        emit: Callable[[int, str], None] | None = None,
        cancelled: threading.Event | None = None,
    ):
        self.tokenizer, self.stop, self.emit, self.cancelled = tokenizer, tuple(stop), emit, cancelled
        self.tokens: list[int] = []
        self.sent = ""
        self.stopped = False  # a stop string ended the answer
        self._hold = max((len(s) for s in self.stop), default=1) - 1

    def _cut(self, text: str) -> str | None:
        """`text` up to its first stop string, or None if it has none."""
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        return text[: min(hits)] if hits else None

    def _settled(self, text: str) -> str:
        text = text.rstrip().removesuffix(REPLACEMENT)
        for n in range(min(self._hold, len(text)), 0, -1):  # a tail that may grow into a stop string waits
            if any(s.startswith(text[-n:]) for s in self.stop):
                return text[:-n].rstrip()
        return text

    def _send(self, index: int, text: str) -> None:
        delta = text[len(self.sent) :] if text.startswith(self.sent) else ""
        if delta:
            self.sent = text
        if self.emit is not None:
            self.emit(index, delta)

    def push(self, token: int) -> bool:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True).lstrip()
        cut = self._cut(text)
        if cut is not None:
            self.stopped = True
            self._send(len(self.tokens) - 1, cut.rstrip())
            return False
        self._send(len(self.tokens) - 1, self._settled(text))
        return not (self.cancelled is not None and self.cancelled.is_set())

    def final(self, answer: str) -> str:
        """The answer's text, cut at its first stop string."""
        cut = self._cut(answer)
        return answer if cut is None else cut.rstrip()

    def rest(self, final: str) -> str:
        """What the deltas sent so far lack of `final` (held-back text the last token settled)."""
        return final[len(self.sent) :] if final.startswith(self.sent) else ""


class AnswerStream:
    """One streamed answer between its worker thread and the event loop.

    The worker calls `token`, then `finish(response)` or `fail(exc)`; the loop reads `events()`.
    `cancelled` is set when the reader stops (the client disconnected, or the stream ended): the
    generation sees it at its next token and stops, and the worker then frees the request's slot.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._queue: asyncio.Queue = asyncio.Queue()
        self._first = None
        self.cancelled = threading.Event()

    def _put(self, item: tuple) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    def token(self, index: int, text: str) -> None:
        self._put(("token", {"index": index, "text": text}))

    def finish(self, response) -> None:
        self._put(("answer", response))

    def fail(self, exc: BaseException) -> None:
        self._put(("error", exc))

    async def first(self) -> None:
        """Wait for the first event; raise the request's error if it failed before its first token (the
        caller then answers with a plain error response, status and all)."""
        try:
            self._first = await self._queue.get()
        except BaseException:
            self.cancelled.set()
            raise
        if self._first[0] == "error":
            self.cancelled.set()
            raise self._first[1]

    async def events(self) -> AsyncIterator[tuple[str, object]]:
        """("token", {"index", "text"}) items, then one ("answer", response) or ("error", exception)."""
        ended = False
        try:
            item = self._first or await self._queue.get()
            while True:
                yield item
                if item[0] != "token":
                    ended = True
                    return
                item = await self._queue.get()
        finally:
            self.cancelled.set()  # before the log line: whoever reads it can count on generation stopping
            if not ended:
                log_event(log, "stream_disconnected", logging.WARNING)  # generation stops at its next token


def answer_events(stream: AnswerStream, request_id: str) -> StreamingResponse:
    """/answer's server-sent events: `token` {index, text} per generated token, then `answer` (the
    response body as without streaming) or `error` {detail, error, request_id, status}."""

    async def body():
        async for kind, value in stream.events():
            if kind == "token":
                yield sse("token", value)
            elif kind == "answer":
                yield sse("answer", value.model_dump())
            else:
                status, outcome = classify(value)
                yield sse(
                    "error", {"detail": message_of(value), "error": outcome, "request_id": request_id, "status": status}
                )

    return StreamingResponse(body(), media_type="text/event-stream", headers=SSE_HEADERS)
