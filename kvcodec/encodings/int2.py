"""int2: symmetric 2-bit codes in [-2, 1], four per byte, the first in bits 0-1 (wire code 7)."""

from kvwire.kvcodec.encodings.integer import SymmetricInt

ENCODING = SymmetricInt("int2", code=7, bits=2)
