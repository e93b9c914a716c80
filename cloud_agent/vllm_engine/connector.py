"""KVWireConnector: a vLLM KV connector (kv_consumer) that writes the KV a KVWire cloud received into
vLLM's paged cache, so vLLM computes only the rest of the prompt (docs/vllm.md).

Runs inside vLLM (the .venv-vllm interpreter), loaded by `KVTransferConfig(kv_connector="KVWireConnector",
kv_connector_module_path="kvwire.cloud_agent.vllm_engine.connector", kv_role="kv_consumer")`. A request
names its handoff file (kvcodec/handoff.py) in `kv_transfer_params={"kvwire_kv": PATH}`; the scheduler
side reports the tokens of it that match the prompt's ids (all but the last prompt token at most), the worker side loads them before the
forward pass. Requests without that parameter are untouched.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.logger import init_logger
from vllm.model_executor.models.utils import extract_layer_index

from kvwire.kvcodec.handoff import handoff_token_ids, matched_prefix, read_handoff, usable_tokens

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

log = init_logger(__name__)

PARAM = "kvwire_kv"  # the kv_transfer_params key naming a request's handoff file


@dataclass
class Load:
    path: str
    block_ids: list[int]
    start: int  # first token to write (tokens before it are vLLM's own prefix-cache hits)
    end: int  # one past the last


@dataclass
class KVWireMetadata(KVConnectorMetadata):
    loads: list[Load] = field(default_factory=list)


def slot_mapping(block_ids: list[int], block_size: int, start: int, end: int) -> torch.Tensor:
    """[end - start] slots of tokens start..end-1 of a request whose blocks are block_ids."""
    tokens = torch.arange(start, end)
    blocks = torch.tensor(block_ids, dtype=torch.long)[tokens // block_size]
    return blocks * block_size + tokens % block_size


class KVWireConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config=None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self.block_size = vllm_config.cache_config.block_size
        self._matched: dict[str, tuple[str, int, int]] = {}  # scheduler: request id -> (path, start, end)
        self._load: dict[str, tuple[str, int, int]] = {}  # allocated, waiting for build_connector_meta
        self.loaded_tokens = 0  # worker: tokens written into the paged cache (tests read it)

    # ---- scheduler side
    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        path = (request.kv_transfer_params or {}).get(PARAM)
        if not path:
            return 0, False
        prompt = list(request.prompt_token_ids or [])
        held = handoff_token_ids(path)  # a missing or foreign file raises here, not in the forward pass
        end = usable_tokens(matched_prefix(held, prompt), len(prompt))
        if end <= num_computed_tokens:
            return 0, False
        self._matched[request.request_id] = (path, num_computed_tokens, end)
        return end - num_computed_tokens, False

    def update_state_after_alloc(self, request: Request, blocks, num_external_tokens: int) -> None:
        matched = self._matched.pop(request.request_id, None)
        if matched is not None and num_external_tokens > 0:
            self._load[request.request_id] = matched

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = KVWireMetadata()
        for req in scheduler_output.scheduled_new_reqs:
            if req.req_id in self._load:
                path, start, end = self._load.pop(req.req_id)
                meta.loads.append(Load(path, list(req.block_ids[0]), start, end))
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):  # resumed after preemption: all its blocks are new
            if req_id in self._load and cached.new_block_ids[i] is not None:
                path, start, end = self._load.pop(req_id)
                meta.loads.append(Load(path, list(cached.new_block_ids[i][0]), start, end))
        return meta

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._matched.pop(request.request_id, None)
        self._load.pop(request.request_id, None)
        return False, None

    # ---- worker side
    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        if not isinstance(meta, KVWireMetadata) or not meta.loads:
            return
        layers = {
            name: layer
            for name, layer in forward_context.no_compile_layers.items()
            if getattr(layer, "kv_cache", None) is not None and hasattr(layer, "impl")
        }
        for load in meta.loads:
            handoff = read_handoff(load.path)
            slots = slot_mapping(load.block_ids, self.block_size, load.start, load.end)
            for name, layer in layers.items():
                index = extract_layer_index(name)
                cache = layer.kv_cache[0] if isinstance(layer.kv_cache, list) else layer.kv_cache
                # k, v: [tokens, local kv_heads, head_dim], this rank's heads under tensor parallelism
                k = self._heads(handoff.keys[index], cache.shape[1])[:, load.start : load.end]
                v = self._heads(handoff.values[index], cache.shape[1])[:, load.start : load.end]
                k = k.transpose(0, 1).to(cache.dtype).contiguous()
                v = v.transpose(0, 1).to(cache.dtype).contiguous()
                write_layer(layer, k, v, cache, slots.to(cache.device))
            self.loaded_tokens += load.end - load.start
            log.debug("kvwire: loaded %d tokens from %s", load.end - load.start, load.path)

    @staticmethod
    def _heads(kv: torch.Tensor, local: int) -> torch.Tensor:
        """This tensor-parallel rank's KV heads of kv [kv_heads, tokens, head_dim]."""
        total = kv.shape[0]
        if local == total:
            return kv
        from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

        rank, world = get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
        first = rank * local if total >= world else rank * total // world  # fewer heads than ranks: replicated
        return kv[first : first + local]

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # start_load_kv writes every layer before the forward pass

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata, **kwargs: Any) -> None:
        return  # a consumer saves nothing

    def wait_for_save(self) -> None:
        return


def write_layer(layer, k: torch.Tensor, v: torch.Tensor, cache: torch.Tensor, slots: torch.Tensor) -> None:
    """Write k, v [tokens, kv_heads, head_dim] into one layer's paged cache at `slots`, the way the layer's
    attention backend writes its own KV: on CPU its layout is ISA-specific (per block and head, keys
    transposed), so it goes through vLLM's cpu_attn_reshape_and_cache op, never by indexing."""
    if cache.device.type == "cpu":
        from vllm import _custom_ops as ops

        blocks, heads, block_size, _ = cache.shape
        key_cache, value_cache = cache.view(blocks, heads, block_size * 2, -1).chunk(2, dim=2)
        ops.cpu_attn_reshape_and_cache(
            k,
            v,
            key_cache,
            value_cache,
            slots,
            layer.isa,
            k_scale=layer._k_scale_float,
            v_scale=layer._v_scale_float,
            kv_cache_dtype=layer.impl.kv_cache_dtype,
        )
    else:  # GPU backends: the backend's own cache update (reshape_and_cache_flash and kin)
        layer.impl.do_kv_cache_update(layer, k, v, cache, slots)
