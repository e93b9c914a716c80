"""int4_rot: int4 of the Hadamard-rotated rows (token axis) (wire code 11)."""

from kvwire.kvcodec.encodings.integer import SymmetricInt

ENCODING = SymmetricInt("int4_rot", code=11, bits=4, rotate=True)
