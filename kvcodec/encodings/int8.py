"""int8: symmetric 8-bit codes, one byte each (wire code 3)."""

from kvwire.kvcodec.encodings.integer import SymmetricInt

ENCODING = SymmetricInt("int8", code=3, bits=8)
