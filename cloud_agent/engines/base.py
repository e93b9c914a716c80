"""The engine contract: what the cloud-agent asks of whatever runs its model."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, ClassVar

from kvwire.kvcodec.generate import GREEDY, Decoding

if TYPE_CHECKING:
    from kvwire.kvcodec.pipeline import Answer, Cloud, Timings
    from kvwire.kvcodec.stream import DecodedKV


class Engine:
    """Answers for the cloud-agent. The receiver, the stream checks and the tokenizer stay the service's
    (`cloud`, a kvcodec Cloud); an engine only turns a verified stream, or a text, into an Answer, calling
    decoding.on_token with each token as it comes. Safe to call from several threads at once: an engine
    that runs one request at a time serializes itself."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""

    def __init__(self, cloud: Cloud):
        self.cloud = cloud

    def answer(
        self,
        received: DecodedKV,
        max_new_tokens: int,
        timings: Timings | None = None,
        options: Mapping[str, str] | None = None,
        decoding: Decoding = GREEDY,
    ) -> Answer:
        raise NotImplementedError

    def answer_text(
        self,
        context: str,
        question: str,
        max_new_tokens: int,
        timings: Timings | None = None,
        decoding: Decoding = GREEDY,
    ) -> Answer:
        raise NotImplementedError

    def problem(self) -> str | None:
        """Why the engine cannot answer now (a dead worker), for /readyz; None: it can."""
        return None

    def close(self) -> None:
        """Release what the engine started (processes, files)."""
