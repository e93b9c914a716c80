"""asym4_rot: asym4 of the Hadamard-rotated rows (token axis) (wire code 14)."""

from kvwire.kvcodec.encodings.integer import AsymmetricInt

ENCODING = AsymmetricInt("asym4_rot", code=14, bits=4, rotate=True)
