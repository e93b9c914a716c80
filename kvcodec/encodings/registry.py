"""The tensor-encoding registry: every encoding by name and by wire code, one file each beside this one.

Adding an encoding of an existing family is one file here (`ENCODING = SymmetricInt("int2", code=7,
bits=2)`; `rotate=True` for its Hadamard-rotated form) plus its line in `_MODULES`; the Quantizer, the stream's tensor heads and the shared test
matrix (tests/test_encodings.py) read it from here. A new family is a new Encoding subclass
(base.py is the contract).

Where the facts live. The registry is the codec's: a name and a wire code are facts of the
profile format and of the frame format, which kvcodec owns, and `kernels/` (the lowest layer) must
never import kvcodec. What the kernels need is keyed by code width, not by name, and stays in
kernels/layout.py: which widths they implement (`SUPPORTED_BITS`) and how codes fill bytes
(`unit_values`, `packed_row_bytes`). An integer encoding is refused at import if its width is not
one of those, so a name can never outrun the kernels; a new width is kernel work (layout.py, the
reference and the Triton packers) before it is one file here.
"""

from __future__ import annotations

from kvwire.kvcodec.encodings import (
    asym2,
    asym2_rot,
    asym3,
    asym3_rot,
    asym4,
    asym4_rot,
    bf16,
    fp16,
    fp32,
    int2,
    int2_rot,
    int3,
    int3_rot,
    int4,
    int4_rot,
    int8,
)
from kvwire.kvcodec.encodings.base import Encoding
from kvwire.kvcodec.errors import ConfigError

_BY_NAME: dict[str, Encoding] = {}
_BY_CODE: dict[int, Encoding] = {}


def register_encoding(encoding: Encoding) -> Encoding:
    """Add `encoding`; ValueError (and nothing registered) if its name or wire code is taken or invalid."""
    name, code = encoding.name, encoding.code
    if not isinstance(name, str) or not name:
        raise ValueError(f"{type(encoding).__name__} has no name")
    if type(code) is not int or not 1 <= code <= 255:
        raise ValueError(f"encoding {name!r}: wire code {code!r} is not a byte value in [1, 255]")
    if name in _BY_NAME:
        raise ValueError(f"tensor encoding {name!r} is already registered (wire code {_BY_NAME[name].code})")
    if code in _BY_CODE:
        raise ValueError(f"encoding {name!r}: wire code {code} is already taken by {_BY_CODE[code].name!r}")
    _BY_NAME[name] = _BY_CODE[code] = encoding
    return encoding


# The order is the order of the names in messages and of the test matrix.
_MODULES = (
    fp32,
    fp16,
    bf16,
    int8,
    int4,
    int3,
    int2,
    asym4,
    asym3,
    asym2,
    int4_rot,
    int3_rot,
    int2_rot,
    asym4_rot,
    asym3_rot,
    asym2_rot,
)
for _module in _MODULES:
    register_encoding(_module.ENCODING)


def get_encoding(name: str) -> Encoding:
    """The encoding called `name`; ConfigError listing the known names otherwise."""
    try:
        return _BY_NAME[name]
    except (KeyError, TypeError):  # TypeError: an unhashable name from a JSON profile
        raise ConfigError(f"unknown tensor encoding {name!r}; known: {', '.join(_BY_NAME)}") from None


def encoding_names() -> list[str]:
    return list(_BY_NAME)


def encodings() -> list[Encoding]:
    """Every registered encoding, in registration order."""
    return list(_BY_NAME.values())
