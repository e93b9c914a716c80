"""The cloud-agent's side of the vLLM worker: starts it in the vLLM venv, sends requests, hands each
caller its tokens as they come (thread-safe; requests run concurrently in the worker's batch)."""

from __future__ import annotations

import itertools
import json
import os
import queue
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from kvwire.kvcodec.errors import ConfigError

# what vLLM's CPU backend needs here (../shared/ENVIRONMENT.md): one process, no OpenMP thread binding
# (6x slower generation with it on shared cores), a bounded KV space (GiB) and a loopback address
CPU_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "VLLM_CPU_KVCACHE_SPACE": "2",
    "VLLM_HOST_IP": "127.0.0.1",
}
VENV_ERROR = ".venv-vllm.error"
VLLM_DTYPES = {
    "fp32": "float32",
    "bf16": "bfloat16",
    "fp16": "float16",
}  # kvwire's names -> vLLM's  # what `make setup-vllm` writes when the venv cannot be built


class WorkerError(RuntimeError):
    """The vLLM worker failed to start, died, or refused a request."""


def default_python(root: str | os.PathLike | None = None) -> Path:
    """The .venv-vllm interpreter of the repository (the one `make setup-vllm` builds)."""
    root = Path(root) if root else Path(__file__).resolve().parents[2]
    return root / ".venv-vllm" / "bin" / "python"


def unavailable_reason(python: str | os.PathLike) -> str | None:
    """Why the vLLM venv at `python` cannot be used (None: it can): missing, or the error setup wrote."""
    python = Path(python)
    venv = python.parent.parent
    error = venv.parent / VENV_ERROR
    if error.is_file():
        return f"{error}: {error.read_text().strip()[:500]}"
    if not python.is_file():
        return f"{python} is missing: run `make setup-vllm`"
    return None


@dataclass
class WorkerResult:
    tokens: list[int]
    finish_reason: str  # stop, length, cancelled
    cached: int  # prompt tokens vLLM did not compute (the injected ones)
    first_token_s: float
    total_s: float


class VllmWorker:
    """One worker process (kvwire.cloud_agent.vllm_engine.worker) and the threads that talk to it."""

    def __init__(
        self,
        model: str,
        python: str | os.PathLike | None = None,
        dtype: str = "bf16",
        block_size: int = 32,
        max_model_len: int = 4096,
        max_num_seqs: int = 16,
        tensor_parallel_size: int = 1,
        env: dict[str, str] | None = None,
        start_timeout_s: float = 600.0,
        log_file: str | os.PathLike | None = None,
    ):
        python = Path(python) if python else default_python()
        reason = unavailable_reason(python)
        if reason:
            raise ConfigError(f"--engine vllm needs the vLLM venv: {reason}")
        if dtype not in VLLM_DTYPES:
            raise ConfigError(f"vLLM dtype {dtype!r}: use one of {', '.join(VLLM_DTYPES)}")
        self.block_size, self.dtype = block_size, dtype
        req_r, self._req_w = os.pipe()
        self._rep_r, rep_w = os.pipe()
        child_env = {**CPU_ENV, **os.environ, **(env or {})}  # the cloud's environment overrides the CPU defaults
        child_env.pop("PYTHONPATH", None)  # the vLLM venv has its own kvwire (installed editable, --no-deps)
        cmd = [
            str(python),
            "-m",
            "kvwire.cloud_agent.vllm_engine.worker",
            "--model",
            model,
            "--requests-fd",
            str(req_r),
            "--replies-fd",
            str(rep_w),
            "--dtype",
            VLLM_DTYPES[dtype],
            "--block-size",
            str(block_size),
            "--max-model-len",
            str(max_model_len),
            "--max-num-seqs",
            str(max_num_seqs),
            "--tensor-parallel-size",
            str(tensor_parallel_size),
        ]
        self._log = open(log_file, "ab") if log_file else subprocess.DEVNULL  # noqa: SIM115 - lives as long as the worker
        self.proc = subprocess.Popen(cmd, pass_fds=(req_r, rep_w), env=child_env, stdout=self._log, stderr=self._log)
        os.close(req_r)
        os.close(rep_w)
        self._requests = os.fdopen(self._req_w, "w", buffering=1)
        self._send_lock = threading.Lock()
        self._waiting: dict[str, queue.Queue] = {}
        self._ids = itertools.count()
        self._ready: queue.Queue = queue.Queue()
        self._reader = threading.Thread(target=self._read, name="vllm-replies", daemon=True)
        self._reader.start()
        try:
            hello = self._ready.get(timeout=start_timeout_s)
        except queue.Empty:
            self.close()
            raise WorkerError(f"the vLLM worker did not start in {start_timeout_s:.0f} s") from None
        if hello is None:
            code = self.proc.wait()
            raise WorkerError(f"the vLLM worker exited with {code} before it was ready (log: {log_file or 'off'})")
        self.start_s = hello["start_s"]

    def _read(self) -> None:
        with os.fdopen(self._rep_r, "r") as replies:
            for line in replies:
                msg = json.loads(line)
                if msg.get("ready"):
                    self._ready.put(msg)
                    continue
                box = self._waiting.get(msg["id"])
                if box is not None:
                    box.put(msg)
        self._ready.put(None)  # the worker is gone: wake everyone
        for box in list(self._waiting.values()):
            box.put(None)

    def _send(self, obj: dict) -> None:
        with self._send_lock:
            try:
                self._requests.write(json.dumps(obj) + "\n")
            except (OSError, ValueError) as exc:  # a closed pipe: the worker is gone or was closed
                raise WorkerError(f"the vLLM worker is not running ({self.proc.poll()})") from exc

    def generate(
        self,
        prompt: Sequence[int],
        max_tokens: int,
        kv_path: str | None = None,
        stop: Sequence[int] = (),
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        on_token: Callable[[int], bool] | None = None,
    ) -> WorkerResult:
        """Generate from `prompt` (token ids), with the KV of its leading tokens from kv_path (a handoff
        file) when given; on_token is called with every token as it arrives and returns False to stop."""
        rid = f"kvwire-{next(self._ids)}"
        box: queue.Queue = queue.Queue()
        self._waiting[rid] = box
        started = time.perf_counter()
        first_s, tokens, cancelled = 0.0, [], False
        try:
            self._send(
                {
                    "op": "generate",
                    "id": rid,
                    "prompt": list(prompt),
                    "kv": kv_path,
                    "max_tokens": max_tokens,
                    "temperature": temperature,
                    "top_p": top_p,
                    "seed": seed,
                    "stop": list(stop),
                }
            )
            while True:
                try:
                    msg = box.get(timeout=5.0)
                except queue.Empty:
                    if self._reader.is_alive():
                        continue
                    msg = None  # the reader ended before this request was registered: nothing will come
                if msg is None:
                    raise WorkerError(f"the vLLM worker exited ({self.proc.poll()}) during a request")
                if msg.get("finish") == "error":
                    raise WorkerError(f"the vLLM worker refused the request: {msg.get('error')}")
                new = [t for t in msg["tokens"] if t not in stop]
                if new and not tokens:
                    first_s = time.perf_counter() - started
                for t in new:
                    if cancelled:
                        break  # tokens generated after the caller said stop are not its answer's
                    tokens.append(t)
                    if on_token is not None and on_token(t) is False:
                        cancelled = True
                        self._send({"op": "abort", "id": rid})
                if msg["done"]:
                    finish = msg.get("finish") or "length"
                    if cancelled or finish not in ("stop", "length"):  # vLLM's abort: the request was stopped
                        finish = "cancelled"
                    if not first_s:
                        first_s = time.perf_counter() - started
                    return WorkerResult(tokens, finish, msg.get("cached", 0), first_s, time.perf_counter() - started)
        finally:
            self._waiting.pop(rid, None)

    def close(self) -> None:
        """Close the request pipe (the worker returns and exits), then wait for it; kill it if it hangs."""
        try:
            self._requests.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self._log is not subprocess.DEVNULL:
            self._log.close()
