"""int3_rot: int3 of the Hadamard-rotated rows (token axis) (wire code 12)."""

from kvwire.kvcodec.encodings.integer import SymmetricInt

ENCODING = SymmetricInt("int3_rot", code=12, bits=3, rotate=True)
