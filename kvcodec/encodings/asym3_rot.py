"""asym3_rot: asym3 of the Hadamard-rotated rows (token axis) (wire code 15)."""

from kvwire.kvcodec.encodings.integer import AsymmetricInt

ENCODING = AsymmetricInt("asym3_rot", code=15, bits=3, rotate=True)
