"""asym3: asymmetric 3-bit codes (scale + zero point), packed like int3 (wire code 9)."""

from kvwire.kvcodec.encodings.integer import AsymmetricInt

ENCODING = AsymmetricInt("asym3", code=9, bits=3)
