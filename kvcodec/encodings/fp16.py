"""fp16: KV cast to IEEE half precision, no scales (wire code 1)."""

import torch

from kvwire.kvcodec.encodings.passthrough import Passthrough

ENCODING = Passthrough("fp16", code=1, dtype=torch.float16)
