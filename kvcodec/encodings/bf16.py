"""bf16: KV cast to bfloat16, no scales (wire code 2)."""

import torch

from kvwire.kvcodec.encodings.passthrough import Passthrough

ENCODING = Passthrough("bf16", code=2, dtype=torch.bfloat16)
