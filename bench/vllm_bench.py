"""`kvwire bench vllm`: the cloud's two engines side by side (docs/vllm.md). It prints figures; it never
passes or fails.

quality: SQuAD questions answered from kv streams at several retentions and from scout streams, by the hf
engine (kept positions keep their absolute position ids) and the vllm engine (kept positions close ranks,
keys re-rotated; and, as a control, closed ranks without the re-rotation). Each answer is compared with the
same engine's answer from the full text (token-for-token agreement, F1) and with the gold answers (F1).

concurrency: N kv requests at once (their streams made beforehand: the cloud's side is measured, from
receiving a stream to the last token), answers per second and time to first token per engine.
"""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass

import torch

from kvwire.bench.data import load_examples, pick
from kvwire.bench.squad_metrics import best_over_golds, f1_score
from kvwire.cloud_agent.engines.hf import HfEngine
from kvwire.cloud_agent.engines.vllm import VllmEngine
from kvwire.cloud_agent.vllm_engine.client import VllmWorker
from kvwire.kvcodec.contiguous import contiguous_prompt
from kvwire.kvcodec.generate import Decoding
from kvwire.kvcodec.handoff import write_handoff
from kvwire.kvcodec.models import load_model
from kvwire.kvcodec.pipeline import Cloud, Edge, EdgeRequest


@dataclass
class Engines:
    loaded: object
    edge: Edge
    hf: HfEngine
    vllm: VllmEngine

    def close(self) -> None:
        self.vllm.close()
        self.vllm.worker.close()


def start(model: str | None, vllm_dtype: str, max_num_seqs: int = 16, log_file: str | None = None) -> Engines:
    loaded = load_model(model)
    cloud = Cloud(loaded)
    worker = VllmWorker(loaded.source, dtype=vllm_dtype, max_num_seqs=max_num_seqs, log_file=log_file)
    return Engines(loaded, Edge(loaded), HfEngine(cloud), VllmEngine(cloud, worker=worker))


def _unrotated(engines: Engines, received, max_new_tokens: int) -> list[int]:
    """The control: kept positions closed up for vLLM but their keys left rotated at the original positions."""
    vl = engines.vllm
    request = contiguous_prompt(received, vl._template(received.header), torch.zeros_like(vl._inv_freq), vl.dtype)
    path = f"{vl._dir}/control.safetensors"
    write_handoff(path, request.handoff)
    res = vl.worker.generate(request.ids, max_new_tokens, kv_path=path, stop=sorted(vl.cloud.stop))
    return res.tokens


def quality(engines: Engines, data: str, questions: int, retentions, profile: str, max_new_tokens: int, progress=print):
    """Rows: one per (engine, setting) with mean agreement with that engine's full-text answer and F1."""
    tok = engines.loaded.tokenizer
    examples = pick(load_examples(data), questions)
    scores: dict[tuple[str, str], list[tuple[float, float, float]]] = {}

    def score(engine: str, setting: str, tokens: list[int], full: list[int], golds) -> None:
        text, full_text = tok.decode(tokens, skip_special_tokens=True), tok.decode(full, skip_special_tokens=True)
        row = (float(tokens == full), f1_score(text, full_text), best_over_golds(f1_score, text, list(golds)))
        scores.setdefault((engine, setting), []).append(row)

    for i, ex in enumerate(examples):
        started = time.monotonic()
        full = {
            "hf": engines.hf.answer_text(ex.context, ex.question, max_new_tokens).tokens,
            "vllm": engines.vllm.answer_text(ex.context, ex.question, max_new_tokens).tokens,
        }
        for name in full:
            score(name, "text", full[name], full[name], ex.answers)
        for r in retentions:
            for mode in ("kv", "scout"):
                if mode == "scout" and r == 1.0:
                    continue
                req = EdgeRequest(ex.context, ex.question, mode, "q2c" if r < 1 else None, r, profile)
                received = engines.hf.cloud.receive(engines.edge.stream(req))
                setting = f"{mode} {r:g}"
                score("hf", setting, engines.hf.answer(received, max_new_tokens).tokens, full["hf"], ex.answers)
                score("vllm", setting, engines.vllm.answer(received, max_new_tokens).tokens, full["vllm"], ex.answers)
                if mode == "kv" and r < 1:
                    control = _unrotated(engines, received, max_new_tokens)
                    score("vllm, not re-rotated", setting, control, full["vllm"], ex.answers)
        progress(f"question {i + 1}/{len(examples)}: {time.monotonic() - started:.1f} s")
    rows = []
    for (engine, setting), vals in scores.items():
        rows.append(
            {
                "engine": engine,
                "setting": setting,
                "questions": len(vals),
                "same_tokens_as_full": round(statistics.mean(v[0] for v in vals), 3),
                "f1_vs_full": round(statistics.mean(v[1] for v in vals), 3),
                "f1_vs_gold": round(statistics.mean(v[2] for v in vals), 3),
            }
        )
    return rows


def concurrency(
    engines: Engines, data: str, levels, retention: float, profile: str, max_new_tokens: int, progress=print
):
    """Rows: one per (engine, concurrent requests) with answers/s and time to first token."""
    examples = pick(load_examples(data), max(levels))
    streams = []
    for ex in examples:
        req = EdgeRequest(ex.context, ex.question, "kv", "q2c" if retention < 1 else None, retention, profile)
        streams.append(list(engines.edge.stream(req)))
    rows = []
    for name, engine in (("hf", engines.hf), ("vllm", engines.vllm)):
        engine.answer(engine.cloud.receive(streams[0]), 4)  # warm
        for n in levels:
            ttft, tokens = [0.0] * n, [0] * n
            go = threading.Barrier(n + 1)

            def ask(i: int) -> None:
                go.wait()
                t0 = time.perf_counter()
                seen = []

                def on_token(_t: int) -> bool:
                    if not seen:
                        ttft[i] = time.perf_counter() - t0
                    seen.append(_t)
                    return True

                ans = engine.answer(
                    engine.cloud.receive(streams[i]), max_new_tokens, decoding=Decoding(on_token=on_token)
                )
                tokens[i] = len(ans.tokens)

            threads = [threading.Thread(target=ask, args=(i,)) for i in range(n)]
            for t in threads:
                t.start()
            go.wait()
            t0 = time.perf_counter()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t0
            rows.append(
                {
                    "engine": name,
                    "concurrent": n,
                    "answers_per_s": round(n / wall, 3),
                    "tokens_per_s": round(sum(tokens) / wall, 1),
                    "ttft_mean_s": round(statistics.mean(ttft), 3),
                    "ttft_max_s": round(max(ttft), 3),
                    "wall_s": round(wall, 2),
                }
            )
            progress(f"{name} x{n}: {rows[-1]}")
    return rows


def format_rows(rows: list[dict]) -> str:
    if not rows:
        return "(no rows)"
    keys = list(rows[0])
    widths = {k: max(len(k), *(len(str(r[k])) for r in rows)) for k in keys}
    lines = ["  ".join(k.ljust(widths[k]) for k in keys)]
    lines += ["  ".join(str(r[k]).ljust(widths[k]) for k in keys) for r in rows]
    return "\n".join(lines)
