"""int2_rot: int2 of the Hadamard-rotated rows (token axis) (wire code 13)."""

from kvwire.kvcodec.encodings.integer import SymmetricInt

ENCODING = SymmetricInt("int2_rot", code=13, bits=2, rotate=True)
