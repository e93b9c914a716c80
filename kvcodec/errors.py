"""The codec's exception types: every failure a user can cause maps to one of these."""


class KVWireError(Exception):
    """Base class of every error the codec raises on purpose."""


class ConfigError(KVWireError, ValueError):
    """A bad argument or setting (unknown name, value out of range, empty input)."""


class PromptTooLongError(ConfigError):
    """The prompt does not fit the model's context window."""


class FrameError(KVWireError):
    """A frame or stream was rejected. `reason` is a short machine-readable label
    (used as the `reason` label of `kvwire_frames_rejected_total`)."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason


class GeometryMismatchError(KVWireError):
    """A KV stream was produced by a model whose KV geometry or tokenizer differs from the receiver's."""
