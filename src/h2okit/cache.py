"""The KV cache as per-layer objects behind transformers' `Cache` interface.

Each `H2OLayer` stores its layer's K/V (`[1, kv_heads, tokens, head_dim]`, keys after
RoPE), counts every token it has ever been given, and, if it is an H2O layer, owns a
pure `LayerPolicy`. After each decode step the attention function hands the layer the
step's attention mass; the layer scores, plans and compacts itself. Only that layer is
touched: plans are per layer (SPEC §9: one plan for all layers was a defect).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .config import KVConfig
from .policy import EvictionEvent, KeepPlan, LayerPolicy, PlanParams

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class H2OLayer(CacheLayerMixin):
    is_sliding = False

    def __init__(self, layer_idx: int, policy: LayerPolicy | None, store_dtype: torch.dtype,
                 on_event=None):
        super().__init__()
        self.layer_idx = layer_idx
        self.policy = policy
        self.store_dtype = store_dtype
        self.on_event = on_event
        self.tokens_seen = 0

    # --- transformers' CacheLayerMixin interface -------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.compute_dtype = key_states.dtype
        shape = (*key_states.shape[:2], 0, key_states.shape[-1])
        self.keys = key_states.new_zeros(shape, dtype=self.store_dtype)
        self.values = value_states.new_zeros((*value_states.shape[:2], 0, value_states.shape[-1]),
                                             dtype=self.store_dtype)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if key_states.shape[0] != 1:
            raise ValueError("h2okit's cache serves batch size 1 (one request at a time)")
        self.keys = torch.cat([self.keys, key_states.to(self.store_dtype)], dim=-2)
        self.values = torch.cat([self.values, value_states.to(self.store_dtype)], dim=-2)
        self.tokens_seen += key_states.shape[-2]
        if self.store_dtype != self.compute_dtype:  # a narrower storage dtype is rounded on write
            return self.keys.to(self.compute_dtype), self.values.to(self.compute_dtype)
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[-2]

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.keys = self.values = None
        self.is_initialized = False
        self.tokens_seen = 0
        if self.policy is not None:
            self.policy.reset()

    # --- H2O ---------------------------------------------------------------------------
    @property
    def scores_attention(self) -> bool:
        return self.policy is not None

    def observe_decode_step(self, token_mass: torch.Tensor) -> None:
        """Feed one decode step's per-token attention mass; evict if the layer's clock says so."""
        self.policy.observe(token_mass.detach().to(torch.float64).numpy())
        event = self.policy.maybe_plan(self.get_seq_length())
        if event is not None:
            self.compact(event.plan)
            self.policy.applied(event.plan)
            if self.on_event is not None:
                self.on_event(event)

    def compact(self, plan: KeepPlan) -> None:
        """Really remove evicted tokens: kept runs move to the front, in order (all KV heads)."""
        if plan.kv != self.get_seq_length():
            raise ValueError(f"layer {self.layer_idx}: plan for {plan.kv} tokens, layer holds "
                             f"{self.get_seq_length()}")
        index = torch.from_numpy(plan.kept_token_indices()).to(self.keys.device)
        self.keys = self.keys.index_select(2, index)
        self.values = self.values.index_select(2, index)

    @property
    def physical_bytes(self) -> int:
        if self.keys is None:
            return 0
        return (self.keys.numel() + self.values.numel()) * self.keys.element_size()

    @property
    def logical_bytes(self) -> int:
        if self.keys is None:
            return 0
        per_token = 2 * self.keys.shape[0] * self.keys.shape[1] * self.keys.shape[-1] * self.keys.element_size()
        return self.tokens_seen * per_token

    @property
    def bytes_per_token(self) -> int:
        """SPEC §6 Bpt = kv_heads * head_dim * dtype_bytes * 2 (K and V)."""
        return 2 * self.keys.shape[1] * self.keys.shape[-1] * self.keys.element_size()


@dataclass
class CacheEvents:
    evictions: list[EvictionEvent] = field(default_factory=list)


class H2OCache(Cache):
    """A transformers `Cache` made of `H2OLayer`s, configured from a KVConfig."""

    def __init__(self, num_layers: int, kv: KVConfig, log=None):
        self.kv = kv
        self.h2o_layer_ids = kv.h2o_layers(num_layers) if kv.evicting else range(0)
        self.events = CacheEvents()
        self._log = log
        params = PlanParams(block_tokens=kv.h2o_block_tokens, sink_tokens=kv.h2o_sink_tokens,
                            recent_tokens=kv.h2o_recent_tokens, keep_ratio=kv.keep_ratio,
                            policy=kv.h2o_policy if kv.h2o_policy != "full" else "h2o")
        store_dtype = DTYPES[kv.cache_dtype]
        layers = []
        for i in range(num_layers):
            policy = None
            if i in self.h2o_layer_ids:
                policy = LayerPolicy(layer=i, params=params, ema_alpha=kv.h2o_ema_alpha,
                                     update_interval=kv.h2o_update_interval,
                                     trigger_min_tokens=kv.h2o_trigger_min_tokens, seed=kv.h2o_seed)
            layers.append(H2OLayer(i, policy, store_dtype, on_event=self._record))
        super().__init__(layers=layers)

    def _record(self, event: EvictionEvent) -> None:
        self.events.evictions.append(event)
        if self.kv.h2o_log_stats and self._log is not None:
            p = event.plan
            self._log(f"[H2O] layer={event.layer} kv={p.kv} keep={p.kept_tokens} evict={p.evicted_tokens} "
                      f"runs={len(p.runs)} target={p.target_tokens} floor={p.floor_tokens} "
                      f"quantized={p.quantized_tokens} plan_us={event.plan_us:.1f}")

    def reset(self) -> None:
        for layer in self.layers:
            layer.reset()
        self.events = CacheEvents()

    @property
    def physical_bytes(self) -> int:
        return sum(layer.physical_bytes for layer in self.layers)

    @property
    def logical_bytes(self) -> int:
        return sum(layer.logical_bytes for layer in self.layers)

    def seq_lengths(self) -> np.ndarray:
        return np.array([layer.get_seq_length() for layer in self.layers])
