"""int3: symmetric 3-bit codes, eight in three bytes (a little-endian 24-bit word; wire code 5)."""

from kvwire.kvcodec.encodings.integer import SymmetricInt

ENCODING = SymmetricInt("int3", code=5, bits=3)
