"""asym2: asymmetric 2-bit codes (scale + zero point), packed like int2 (wire code 10)."""

from kvwire.kvcodec.encodings.integer import AsymmetricInt

ENCODING = AsymmetricInt("asym2", code=10, bits=2)
