"""vllm: the answers run in a vLLM engine (continuous batching, paged KV; tensor parallel on GPU hosts) in a
worker process of the vLLM venv; received KV goes in through the KVWire connector (docs/vllm.md).

The service keeps its receiver, stream checks, tokenizer and transformers model (the template prefix KV is
computed with it); per request this engine writes a handoff file (kvcodec/handoff.py) in a private folder,
names it in the request, and deletes it when the answer is done. Pruned KV is re-rotated to contiguous
positions (vLLM numbers a request's tokens 0..n-1); a scout stream's kept tokens are the prompt.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
import time

import torch

from kvwire.cloud_agent.engines.base import Engine
from kvwire.cloud_agent.vllm_engine.client import VllmWorker
from kvwire.kvcodec.contiguous import Template, contiguous_prompt
from kvwire.kvcodec.errors import ConfigError
from kvwire.kvcodec.generate import GREEDY, Generation
from kvwire.kvcodec.handoff import write_handoff
from kvwire.kvcodec.models import DTYPES
from kvwire.kvcodec.modes import get_mode
from kvwire.kvcodec.prompt import build_prompt, model_window
from kvwire.kvcodec.rerotate import rope_inv_freq

SHM = "/dev/shm"  # handoff files in memory where the host has it: written and read once, never persisted


class VllmEngine(Engine):
    name = "vllm"
    description = "a vLLM engine in a worker process (.venv-vllm), fed through the KVWire KV connector"

    def __init__(self, cloud, settings=None, worker: VllmWorker | None = None):
        """settings: the cloud's (vllm_* options) when this engine starts its own worker; worker: one
        already started (tests share one per module), which close() leaves running."""
        super().__init__(cloud)
        self._owns_worker = worker is None
        if worker is None:
            if settings is None:
                raise ConfigError("the vllm engine needs the cloud's settings or a started worker")
            worker = VllmWorker(
                model=cloud.loaded.source,
                python=settings.vllm_python,
                dtype=settings.vllm_dtype,
                block_size=settings.vllm_block_size,
                max_model_len=model_window(cloud.loaded.model) or 4096,
                max_num_seqs=settings.max_concurrency,
                tensor_parallel_size=settings.vllm_tensor_parallel_size,
                log_file=settings.vllm_log_file,
            )
        self.worker = worker
        self.dtype = DTYPES[worker.dtype]
        self._dir = tempfile.mkdtemp(prefix="kvwire-vllm-", dir=SHM if os.path.isdir(SHM) else None)
        self._ids = itertools.count()
        try:
            self._inv_freq = rope_inv_freq(cloud.loaded.model)
        except ValueError:
            self._inv_freq = None  # no RoPE: only streams whose positions do not move can be served
        self.last_cached = 0

    def _template(self, header) -> Template | None:
        if header.template != "cloud":
            return None
        keys, values = self.cloud.templates.kv()
        return Template(list(self.cloud.templates.ids), keys, values)

    def answer(self, received, max_new_tokens, timings=None, options=None, decoding=GREEDY):
        h = received.header
        if h.per_head:  # the service refuses `heads` first; a stream built elsewhere is refused here
            raise ConfigError("a per-head stream needs the hf engine (vLLM's attention reads one position set)")
        if not get_mode(h.mode).carries_kv and (options or {}).get("scout_prefill", "sparse") != "sparse":
            raise ConfigError("scout_prefill full is the hf engine's: on vllm a scout's kept tokens are the prompt")
        started = time.perf_counter()
        request = contiguous_prompt(received, self._template(h), self._inv_freq, self.dtype)
        path = None
        if request.handoff is not None:
            path = os.path.join(self._dir, f"{next(self._ids)}.safetensors")
            write_handoff(path, request.handoff)
        if timings is not None:
            timings.add("inject", time.perf_counter() - started)
        try:
            gen = self._generate(request.ids, max_new_tokens, path, decoding)
        finally:
            if path is not None:
                os.unlink(path)
        return self.cloud.answer_of(gen, h.n_prompt, h.context_span, h.mode, timings, received)

    def answer_text(self, context, question, max_new_tokens, timings=None, decoding=GREEDY):
        cloud = self.cloud
        prompt = build_prompt(cloud.loaded.tokenizer, context, question, max_len=model_window(cloud.loaded.model))
        text = get_mode("text")
        gen = self._generate(list(prompt.ids), max_new_tokens, None, decoding)
        span = (prompt.context_start, prompt.context_end)
        return cloud.answer_of(
            gen, len(prompt.ids), span, text.name, timings, wire_bytes=text.wire_bytes(context, question)
        )

    def _generate(self, ids, max_new_tokens, path, decoding) -> Generation:
        res = self.worker.generate(
            ids,
            max_new_tokens,
            kv_path=path,
            stop=sorted(self.cloud.stop),
            temperature=decoding.temperature,
            top_p=decoding.top_p,
            seed=decoding.seed,
            on_token=decoding.on_token,
        )
        steps = len(res.tokens) + (res.finish_reason == "stop")
        self.last_cached = res.cached  # prompt tokens vLLM took from the handoff (tests and benchmarks read it)
        return Generation(res.tokens, torch.empty(0), res.first_token_s, res.total_s, steps, res.finish_reason)

    def problem(self) -> str | None:
        code = self.worker.proc.poll()
        return None if code is None else f"the vLLM worker exited with {code} (log: --vllm-log-file)"

    def close(self) -> None:
        if self._owns_worker:
            self.worker.close()
        shutil.rmtree(self._dir, ignore_errors=True)
