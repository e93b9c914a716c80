"""StreamReceiver: one stream's frames into a decoder, with an optional cut, for every receiver (the cloud
daemon, eval, the demo). It owns what all of them must get right the same way: the header is checked
against the receiving model before anything is allocated, a stream of another mode is refused, a cut
stream gives the positions that arrived (never a half-verified one), and every frame and every
rejection is reported to a hook (the daemon's metrics)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from kvwire.kvcodec.errors import FrameError, KVWireError
from kvwire.kvcodec.stream import DecodedKV, StreamDecoder
from kvwire.kvcodec.wire import FRAME_TYPES, HEADER


class NothingToAnswerError(KVWireError):
    """A cut stream left nothing an answer can use: no header, or not every template/question position."""


class StreamReceiver:
    """Feed one stream's frames; then `result()` (the whole verified stream) or, after `cut()`, what arrived.

    decoder: a fresh StreamDecoder whose on_header checks the stream against the receiving model.
    expect_mode: refuse (FrameError "wrong_mode") a stream whose header names another mode.
    on_frame(kind, nbytes): called for every frame fed, kind "header"/"chunk"/"trailer", or "rejected"
    for one that failed verification. on_reject(reason): called once for the FrameError that failed the
    stream, whether feed() or result() found it (after a failed feed, callers do not ask for a result).
    """

    def __init__(
        self,
        decoder: StreamDecoder,
        expect_mode: str | None = None,
        on_frame: Callable[[str, int], None] | None = None,
        on_reject: Callable[[str], None] | None = None,
    ):
        self.decoder, self.expect_mode = decoder, expect_mode
        self.on_frame, self.on_reject = on_frame, on_reject
        self.decode_s = 0.0  # seconds spent verifying and decoding
        self.was_cut = False

    def feed(self, frame: bytes) -> str:
        """Verify and apply one frame; returns its kind. FrameError (and the on_header check's error) propagate."""
        t = time.perf_counter()
        kind = "rejected"
        try:
            code = self.decoder.feed(frame)
            if code == HEADER and self.expect_mode is not None and self.decoder.header.mode != self.expect_mode:
                raise FrameError(
                    "wrong_mode", f"asked for a {self.expect_mode} stream, got a {self.decoder.header.mode} stream"
                )
            kind = FRAME_TYPES[code]
            return kind
        except FrameError as exc:
            self._rejected(exc)
            raise
        finally:
            if self.on_frame is not None:
                self.on_frame(kind, len(frame))
            self.decode_s += time.perf_counter() - t

    def feed_all(self, frames: Iterable[bytes], stop: Callable[[int, int], bool] | None = None) -> StreamReceiver:
        """Feed frames in order; with `stop(frames_fed, bytes_fed)` returning True the stream is cut there
        (eval and tests simulate a deadline this way). Returns self, for `.result()`."""
        fed = nbytes = 0
        for frame in frames:
            if stop is not None and stop(fed, nbytes):
                self.cut()
                break
            self.feed(frame)
            fed, nbytes = fed + 1, nbytes + len(frame)
        return self

    def cut(self) -> None:
        """The stream ends here without its trailer (a deadline): result() gives what arrived."""
        self.was_cut = True

    def result(self) -> DecodedKV:
        """The decoded stream: complete (verified trailer), or after a cut the positions that arrived.

        FrameError for a stream that failed or ended early without a cut; NothingToAnswerError for a cut
        stream without its header or without every template and question position."""
        try:
            if not self.was_cut or self.decoder.finished:
                return self.decoder.result()
            if self.decoder.failed is None and self.decoder.header is None:
                raise NothingToAnswerError("cut before the edge sent its header: nothing to answer from")
            decoded = self.decoder.partial()  # a stream that failed verification raises here: never answered from
        except FrameError as exc:
            self._rejected(exc)
            raise
        if decoded.missing_fixed:
            raise NothingToAnswerError(
                f"cut before {decoded.missing_fixed} template/question positions arrived: nothing to answer from"
            )
        return decoded

    def _rejected(self, exc: FrameError) -> None:
        if self.on_reject is not None:
            self.on_reject(exc.reason)
