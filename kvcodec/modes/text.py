"""text: no edge; the cloud prefills the plain text. The baseline every ratio divides by, and the fallback."""

from __future__ import annotations

from kvwire.kvcodec.modes.base import Mode


class TextMode(Mode):
    name = "text"
    description = "no edge: the cloud prefills the plain text (the baseline)"
    streamed = False

    @staticmethod
    def wire_bytes(context: str, question: str) -> int:
        """What crosses the link in text mode: the UTF-8 bytes of the passage and the question."""
        return len(context.encode()) + len(question.encode())
