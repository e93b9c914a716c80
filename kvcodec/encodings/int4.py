"""int4: symmetric 4-bit codes, two per byte, the first in the low nibble (wire code 4)."""

from kvwire.kvcodec.encodings.integer import SymmetricInt

ENCODING = SymmetricInt("int4", code=4, bits=4)
