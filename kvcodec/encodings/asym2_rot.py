"""asym2_rot: asym2 of the Hadamard-rotated rows (token axis) (wire code 16)."""

from kvwire.kvcodec.encodings.integer import AsymmetricInt

ENCODING = AsymmetricInt("asym2_rot", code=16, bits=2, rotate=True)
