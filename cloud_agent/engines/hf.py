"""hf: the cloud's Hugging Face transformers model in this process, one forward pass at a time (the
default, and the embedded demo's engine). Pruned caches keep their absolute position ids."""

from __future__ import annotations

import threading

from kvwire.cloud_agent.engines.base import Engine
from kvwire.kvcodec.generate import GREEDY


class HfEngine(Engine):
    name = "hf"
    description = "transformers in the cloud-agent's process, one request's forward passes at a time"

    def __init__(self, cloud, settings=None):
        super().__init__(cloud)
        self.lock = threading.Lock()  # the model lock: forward passes run one at a time

    def answer(self, received, max_new_tokens, timings=None, options=None, decoding=GREEDY):
        with self.lock:
            return self.cloud.answer(received, max_new_tokens, timings, options, decoding)

    def answer_text(self, context, question, max_new_tokens, timings=None, decoding=GREEDY):
        with self.lock:
            return self.cloud.answer_text(context, question, max_new_tokens, timings, decoding)
