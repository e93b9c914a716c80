"""The mode contract: what crosses the link, how the edge streams it, how the cloud answers from it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, ClassVar

from kvwire.kvcodec.errors import ConfigError
from kvwire.kvcodec.generate import GREEDY, Decoding

if TYPE_CHECKING:
    from kvwire.kvcodec.pipeline import Answer, Cloud, Timings
    from kvwire.kvcodec.stream import DecodedKV


class Mode:
    """One mode; a subclass sets the class attributes and, if the edge streams it, `answer`.

    streamed: the edge sends a frame stream for it (header, chunks, trailer); False: nothing comes
    from the edge and the cloud prefills the text itself.
    carries_kv: the stream's chunks carry quantized KV, so the edge needs a precision profile and the
    cloud the same KV geometry; False: the header's kept positions are the whole message.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    streamed: ClassVar[bool] = True
    carries_kv: ClassVar[bool] = False

    def answer(
        self,
        cloud: Cloud,
        received: DecodedKV,
        max_new_tokens: int,
        timings: Timings | None = None,
        options: Mapping[str, str] | None = None,
        decoding: Decoding = GREEDY,
    ) -> Answer:
        """Generate on `cloud` from a received stream (complete, or cut by a deadline), choosing tokens as
        `decoding` says (greedy by default). options: the request's per-mode choices (e.g. scout_prefill);
        a mode reads the ones it knows."""
        raise ConfigError(f"mode {self.name!r} is not streamed: the cloud answers it from the text")

    def setup_positions(self, prompt_len: int, kept: int) -> int:
        """Prompt positions the cloud's work between the stream's end and the first generation step
        scales with (kept: positions received); the reserve estimate measures seconds per position."""
        return prompt_len
