"""fp32: an exact passthrough of an fp32 model's KV, for checking the codec path (wire code 6)."""

import torch

from kvwire.kvcodec.encodings.passthrough import Passthrough

ENCODING = Passthrough("fp32", code=6, dtype=torch.float32)
