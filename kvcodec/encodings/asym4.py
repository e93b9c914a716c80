"""asym4: asymmetric 4-bit codes (scale + zero point), packed like int4 (wire code 8)."""

from kvwire.kvcodec.encodings.integer import AsymmetricInt

ENCODING = AsymmetricInt("asym4", code=8, bits=4)
