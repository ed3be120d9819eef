"""The KV cache as per-layer objects behind transformers' `Cache` interface.

Each `H2OLayer` stores its layer's K/V (`[1, kv_heads, tokens, head_dim]`, keys after
RoPE), counts every token it has ever been given, and, if it is an H2O layer, owns a
pure `LayerPolicy`. After each decode step the attention function hands the layer the
step's attention mass; the layer scores, plans and compacts itself. Only that layer is
touched: plans are per layer (SPEC §9: one plan for all layers was a defect).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from . import hugepages
from .config import CACHE_DTYPES, KVConfig
from .lossless import LayerCodec
from .policy import (EvictionEvent, KeepPlan, LayerPolicy, PlanParams, layer_budget_weights, queries_ahead,
                     runs_token_indices)
from .threads import one_blas_thread

log = logging.getLogger(__name__)
# positions [n] -> a layer's RoPE tables (cos, sin), each [n, D] numpy
RopeTables = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
DTYPES = {name: getattr(torch, name) for name in CACHE_DTYPES}


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [1, heads, T, dim] -> [1, heads, n, dim]: tokens `index` [1, n] of every head, or [heads, n],
    each head its own (one row copy per token and head: torch.gather with the index expanded over
    dim, which copies element by element, took 4x longer, ~0.37 against ~0.085 ms for 3 heads x 780
    tokens x 64, and every per-head eviction of every layer pays it for K and for V)."""
    if index.shape[0] == 1:
        return x.index_select(2, index[0])
    out = x.new_empty((1, index.shape[0], index.shape[1], x.shape[-1]))
    for head, rows in enumerate(index):
        torch.index_select(x[0, head], 0, rows, out=out[0, head])
    return out


@functools.cache
def _run_mover():
    """The kernels module, for its in-place compaction (h2k_keep_runs), or None where the kernels cannot be
    built (no C compiler): then `KVBuffer.keep_runs` gathers with torch."""
    from . import kernels  # (late: building the kernels is not part of importing the cache)

    try:
        kernels.load()
    except kernels.KernelBuildError:
        return None
    return kernels


class KVBuffer:
    """One layer's K and V in preallocated `[1, heads, capacity, dim]` buffers: a decode step writes
    its token in place instead of concatenating (copying) the whole cache, and compaction moves
    the kept tokens to the front in place. Capacity grows by doubling, so appends are amortised O(1)."""

    HEADROOM = 256  # free slots added on (re)allocation
    # Huge pages only when rounding the pair up to whole huge pages adds at most this share of its bytes:
    # a huge page is committed whole on first touch, and one P=512 layer of the default model (1.2 MB)
    # would take 2 MB, 70 % more memory for the K/V this tool exists to shrink.
    HUGE_MAX_ROUNDING = 1 / 8

    def __init__(self, key_states: torch.Tensor, value_states: torch.Tensor, dtype: torch.dtype):
        self.length = 0
        self.k = key_states.new_empty((*key_states.shape[:2], 0, key_states.shape[-1]), dtype=dtype)
        self.v = value_states.new_empty((*value_states.shape[:2], 0, value_states.shape[-1]), dtype=dtype)
        self.bytes_per_token = 2 * self.k.shape[1] * self.k.shape[-1] * self.k.element_size()  # K and V
        self._addresses: tuple[int, int, int] | None = None  # (K, V, head stride) until the buffers move
        self.moves = 0  # how often the buffers were reallocated (a kernel holding their addresses checks it)

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def views(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[:, :, :self.length], self.v[:, :, :self.length]

    def _reserve(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        k, v = self._allocate(max(needed + self.HEADROOM, 2 * self.capacity))
        k[:, :, :self.length] = self.k[:, :, :self.length]
        v[:, :, :self.length] = self.v[:, :, :self.length]
        self.k, self.v = k, v
        self._addresses = None
        self.moves += 1

    def _allocate(self, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Empty K and V buffers for at least `capacity` tokens. When whole huge pages fit the pair to
        within HUGE_MAX_ROUNDING, K and V share one buffer of them (hugepages.py: a decode step streams
        all of them; the TLB misses of 4 KB pages cost a batch's attention ~4 %) and the capacity grows
        to fill it; otherwise they are torch's memory."""
        batch, heads, dim = self.k.shape[0], self.k.shape[1], self.k.shape[-1]
        per_token = batch * self.bytes_per_token
        pages = hugepages.whole_pages(capacity * per_token)
        if pages > (1 + self.HUGE_MAX_ROUNDING) * capacity * per_token or not hugepages.available():
            return (self.k.new_empty((batch, heads, capacity, dim)), self.v.new_empty((batch, heads, capacity, dim)))
        capacity = pages // per_token
        half = capacity * per_token // 2
        pair = hugepages.empty_bytes(2 * half)
        return tuple(pair[i * half:(i + 1) * half].view(self.k.dtype).view(batch, heads, capacity, dim)
                     for i in (0, 1))

    def layout(self) -> tuple[int, int, int, int]:
        """(K address, V address of slot 0, head stride in elements, tokens held), with room for one more
        token, for a kernel that writes the next token itself; `commit(1)` then counts it. The addresses
        are kept until the buffers move (asking torch for them was a visible share of a batched step)."""
        self._reserve(self.length + 1)
        if self._addresses is None:
            self._addresses = (self.k.data_ptr(), self.v.data_ptr(), self.k.stride(1))
        return *self._addresses, self.length

    def next_slot(self) -> tuple[int, int, int]:
        """(K address, V address, head stride in elements) of the slot the next token goes to."""
        k, v, stride, length = self.layout()
        offset = length * self.k.shape[-1] * self.k.element_size()
        return k + offset, v + offset, stride

    def commit(self, n: int) -> None:
        self.length += n

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        n = keys.shape[2]
        self._reserve(self.length + n)
        self.k[:, :, self.length:self.length + n] = keys  # casts to the storage dtype
        self.v[:, :, self.length:self.length + n] = values
        self.length += n

    def keep(self, index: torch.Tensor) -> None:
        """Keep tokens `index` ([1, n] for all heads, or [kv_heads, n] per head; ascending per row),
        moved to the front in order. The gathers copy before the write: no aliasing."""
        n = index.shape[1]
        self.k[:, :, :n] = gather_tokens(self.k[:, :, :self.length], index)
        self.v[:, :, :n] = gather_tokens(self.v[:, :, :self.length], index)
        self.length = n

    def keep_runs(self, runs: tuple[tuple[tuple[int, int], ...], ...]) -> None:
        """`keep` of the tokens in `runs` (per row, one for every head or one per head: ascending, disjoint
        (begin, length) token runs, every row as many tokens), in place by the kernels where they are
        built: only the runs not yet at their place move, each by one memmove. An eviction at P=2048
        (28 layers, ~30 % kept) compacted in ~11 ms through `keep`'s gathers, ~3.7 ms so
        (docs/measurements.md, "Evictions in place")."""
        kernels = _run_mover()
        one_head_after_another = self.k.shape[0] == 1 and self.k.stride(2) == self.k.shape[-1] and self.k.stride(3) == 1
        if kernels is None or self.k.device.type != "cpu" or not one_head_after_another:
            self.keep(torch.from_numpy(runs_token_indices(runs)).to(self.k.device))
            return
        pairs = np.array([pair for row in runs for pair in row], dtype=np.int64).reshape(-1)
        counts = np.array([len(row) for row in runs], dtype=np.int32)
        size = self.k.element_size()
        kernels.load().h2k_keep_runs(kernels.ptr(self.k), kernels.ptr(self.v), self.k.stride(1) * size,
                                     self.k.shape[1], self.k.shape[-1] * size,
                                     kernels.ffi.cast("long *", pairs.ctypes.data),
                                     kernels.ffi.cast("int *", counts.ctypes.data), len(runs), torch.get_num_threads())
        self.length = sum(length for _, length in runs[0])

    def replace(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Hold exactly these tokens (after store mode moved some of them out)."""
        self.length = 0
        self.append(keys, values)

    @property
    def allocated_bytes(self) -> int:
        return (self.k.numel() + self.v.numel()) * self.k.element_size()


class H2OLayer(CacheLayerMixin):
    """One layer's raw K/V in a preallocated buffer, its eviction policy (if it evicts) and its codec
    measurement (if in scope: `estimate`/`full`). `ColdStoreLayer` adds the `store` mode."""

    is_sliding = False

    def __init__(self, layer_idx: int, policy: LayerPolicy | None, store_dtype: torch.dtype,
                 on_event=None, codec: LayerCodec | None = None):
        super().__init__()
        self.layer_idx = layer_idx
        self.policy = policy
        self.codec = codec
        self.store_dtype = store_dtype
        self.on_event = on_event
        self.on_size = None  # the cache's callback: the change of this layer's physical bytes, after every change
        self._size_counted = 0  # this layer's physical bytes as the cache has counted them
        self.tokens_seen = 0
        self._queries: np.ndarray | None = None  # [query_window, q_heads, D] ring of recent queries
        self._queries_recorded = 0
        self.query_scale = 1.0  # the attention's logit scale, recorded with the queries
        # positions [n] -> this layer's RoPE tables (cos, sin) [n, D] as numpy: H2OCache sets it (or refuses
        # to build) whenever the policy moves its queries ahead (kv_h2o_query_horizon)
        self.rope_tables: RopeTables | None = None

    # `keys` and `values` (transformers' attributes) are views of the buffer's live tokens, sliced again
    # on the first read after the buffer grew: a fused decode step grows every layer of every sequence,
    # and slicing two views each time was a visible share of a batched step's Python time.
    def _fresh_views(self) -> None:
        if self._views_stale:
            self._keys, self._values = self.buffer.views()
            self._views_stale = False

    @property
    def keys(self) -> torch.Tensor | None:
        self._fresh_views()
        return self._keys

    @keys.setter
    def keys(self, value: torch.Tensor | None) -> None:
        self._keys, self._views_stale = value, False

    @property
    def values(self) -> torch.Tensor | None:
        self._fresh_views()
        return self._values

    @values.setter
    def values(self, value: torch.Tensor | None) -> None:
        self._values = value

    # --- transformers' CacheLayerMixin interface -------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.compute_dtype = key_states.dtype
        self.buffer = KVBuffer(key_states, value_states, self.store_dtype)
        self.keys, self.values = self.buffer.views()
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        keys, values = self.append(key_states, value_states)
        if self.store_dtype != key_states.dtype:  # a narrower storage dtype is rounded on write; the caller
            # gets its own dtype back (a float32 prefill of a bf16 model, then bf16 decode steps)
            return keys.to(key_states.dtype), values.to(key_states.dtype)
        return keys, values

    def append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add new tokens; returns all of the layer's K/V in storage dtype (both decode paths use this)."""
        if key_states.shape[0] != 1:
            raise ValueError("h2okit's cache serves batch size 1 (one request at a time)")
        self.buffer.append(key_states, value_states)
        return self._grown(key_states.shape[-2])

    def _grown(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The buffer holds `n` more tokens: the count and size follow; all K/V as `full_kv`."""
        self._count_grown(n)
        return self.full_kv()

    def _count_grown(self, n: int, counted: bool = False) -> None:
        """The buffer holds `n` more tokens (`counted`: the cache has added their bytes already)."""
        self._views_stale = True  # the views are sliced again when next read
        self.tokens_seen += n
        if counted:
            self._size_counted += n * self.buffer.bytes_per_token
        else:
            self._report_size()

    def _report_size(self) -> None:
        if self.on_size is not None:
            physical = self.physical_bytes
            self.on_size(physical - self._size_counted)
            self._size_counted = physical

    def decode_slot(self) -> tuple[int, int, int] | None:
        """Where a kernel may write the next decode token's K/V directly (see KVBuffer.next_slot), or
        None when it must go through `append`."""
        if not self.is_initialized:
            return None
        return self.buffer.next_slot()

    def commit_slot(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The token written into `decode_slot` is in; returns all K/V as `append` does."""
        self.buffer.commit(1)
        return self._grown(1)

    def decode_layout(self) -> tuple[int, int, int, int, int] | None:
        """For a kernel that runs a whole decode step (the fast path's fused step): K and V addresses of
        slot 0, the head stride in elements, the tokens held (the new token goes to that slot, room for
        it is made) and the first slot the step attends to; None when the token must go through
        `append` (nothing cached yet, or store mode). `after_fused_step` then counts the token."""
        if not self.is_initialized:
            return None
        return *self.buffer.layout(), 0

    @property
    def appends_in_place(self) -> bool:
        """A fused decode step's slot for this layer needs nothing but its length and RoPE rows until the
        buffer moves (and, when it scores, until its scores' storage changes): no codec, every slot
        attended, no queries recorded (store mode has a codec, a sliding layer moves its first visible
        slot, a layer that keeps its queries gets a new ring row each step). Evictions only shorten it."""
        return self.codec is None and not self.is_sliding and not self.needs_queries

    def after_fused_step(self, scored: bool) -> None:
        """A fused step wrote this token's K/V into the `decode_layout` slot and, if `scored`, updated the
        scores in place (LayerPolicy.in_place_update); the rest of `after_decode_blocks` follows. The
        cache counted the token's bytes before (H2OCache.after_fused_step)."""
        self.buffer.commit(1)
        self._count_grown(1, counted=True)
        if self.policy is not None:
            if scored:
                self.policy.observed_in_place(self.get_seq_length())
            else:
                self.policy.tick()
        self._evict_and_measure()

    def full_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All of the layer's K/V in storage dtype."""
        return self.keys, self.values

    def _this_steps_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The K/V this decode step attended to (a store layer keeps its decoded copy for the step)."""
        return self.full_kv()

    def attended_tokens(self) -> int:
        """Tokens the next decode step attends to: every cached one and itself."""
        return self.get_seq_length() + 1

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return 0 if self._keys is None else self.buffer.length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.keys = self.values = self.buffer = None
        self.is_initialized = False
        self.tokens_seen = self._size_counted = 0
        self._queries, self._queries_recorded = None, 0
        if self.policy is not None:
            self.policy.reset()
        if self.codec is not None:
            self.codec.reset()

    # --- recent queries (for a policy that `uses_queries`) ------------------------------
    @property
    def needs_queries(self) -> bool:
        """Does this layer keep its recent queries (an evicting layer whose scorer plans from them)?"""
        return self.policy is not None and self.policy.uses_queries

    def _query_ring(self, q_heads: int, dim: int) -> np.ndarray:
        if self._queries is None or self._queries.shape[1:] != (q_heads, dim):
            self._queries = np.zeros((self.policy.query_window, q_heads, dim), dtype=np.float32)
            self._queries_recorded = 0
        return self._queries

    def record_queries(self, queries: torch.Tensor, scale: float) -> None:
        """queries [q_heads, n, D] (after RoPE, unscaled, as attention takes them): the ring keeps the last
        `query_window` rows; `scale` is the attention's logit scale."""
        q_heads, n, dim = queries.shape
        ring = self._query_ring(q_heads, dim)
        rows = queries[:, -len(ring):].detach().float().transpose(0, 1).numpy()  # [m, q_heads, D]
        # the query of the i-th recording goes to row i % len(ring), so the ring always holds the last ones
        ring[(self._queries_recorded + n - len(rows) + np.arange(len(rows))) % len(ring)] = rows
        self._queries_recorded += n
        self.query_scale = scale

    def query_slot(self, q_heads: int, dim: int, scale: float) -> np.ndarray:
        """The ring row a decode step writes its query into itself (the fast path's fused step), [q_heads, D];
        counted as recorded now."""
        ring = self._query_ring(q_heads, dim)
        row = ring[self._queries_recorded % len(ring)]
        self._queries_recorded += 1
        self.query_scale = scale
        return row

    def recent_queries(self) -> np.ndarray:
        """[n, q_heads, D]: the recorded queries still in the ring (in no particular order)."""
        if self._queries is None:
            return np.zeros((0, 0, 0), dtype=np.float32)
        return self._queries[:min(self._queries_recorded, len(self._queries))]

    def recent_query_positions(self) -> np.ndarray:
        """[n]: the position each row of `recent_queries` was asked at. Every token the layer sees is
        recorded once, in order (prompt rows, then one per decode step), so the r-th recording is the
        query of position r, and ring row i holds the latest r with r % len(ring) == i."""
        if self._queries is None:
            return np.zeros(0, dtype=np.int64)
        ring, recorded = len(self._queries), self._queries_recorded
        rows = np.arange(min(recorded, ring))
        return recorded - 1 - (recorded - 1 - rows) % ring

    def queries_for_plan(self) -> np.ndarray:
        """The recent queries as the scorer takes them: moved ahead to the next `query_horizon`
        positions (policy.queries_ahead) when the policy asks for it, else as recorded."""
        queries = self.recent_queries()
        horizon = self.policy.query_horizon
        if horizon == 0 or len(queries) == 0:
            return queries
        own_cos, own_sin = self.rope_tables(self.recent_query_positions())
        # the next query is at position `recorded`, the one after at recorded + 1, ...
        ahead_cos, ahead_sin = self.rope_tables(np.arange(self._queries_recorded, self._queries_recorded + horizon))
        return queries_ahead(queries, own_cos, own_sin, ahead_cos.mean(axis=0), ahead_sin.mean(axis=0))

    def _plan(self, length: int, force: bool) -> EvictionEvent | None:
        """The policy's plan if one is due (`force`: chunked prefill), with what its scorer needs: value
        norms, and for one that `uses_queries` the keys [kv_heads, T, D], the recent queries and the
        attention's scale (its products on one BLAS thread: threads.one_blas_thread)."""
        if not (self.policy.due(length) or (force and length >= self.policy.trigger_min_tokens)):
            return None
        norms = self.value_norms() if self.policy.params.value_norm else None
        if not self.policy.uses_queries:
            return self.policy.maybe_plan(length, self.tokens_seen, norms, force=force)
        keys, _ = self._this_steps_kv()
        with one_blas_thread():
            return self.policy.maybe_plan(length, self.tokens_seen, norms, force=force, keys=keys[0].float().numpy(),
                                          queries=self.queries_for_plan(), scale=self.query_scale)

    # --- H2O ---------------------------------------------------------------------------
    @property
    def scores_prefill(self) -> bool:
        return self.needs_mass and self.policy.score_prefill

    @property
    def needs_mass(self) -> bool:
        """Does this layer's decode step need the attention mass (an evicting, attention-scored layer)?"""
        return self.policy is not None and self.policy.uses_attention

    def block_mass(self, head_mass: torch.Tensor) -> np.ndarray:
        """[kv_heads, T] per-token mass -> [kv_heads, blocks] sums, in torch, so only one value per
        head and block crosses into numpy."""
        b = self.policy.params.block_tokens
        mass = head_mass.detach().float()
        if b == 1:
            return mass.to(torch.float64).numpy()
        padded = torch.nn.functional.pad(mass, (0, -mass.shape[-1] % b))
        return padded.view(mass.shape[0], -1, b).sum(dim=2).to(torch.float64).numpy()

    def value_norms(self) -> np.ndarray:
        """[kv_heads, blocks]: the mean L2 norm of each block's value vectors, per KV head."""
        _, values = self._this_steps_kv()
        norms = values[0].float().norm(dim=-1)  # [kv_heads, T]
        b = self.policy.params.block_tokens
        t = norms.shape[-1]
        sums = torch.nn.functional.pad(norms, (0, -t % b)).view(norms.shape[0], -1, b).sum(-1)
        counts = torch.full((sums.shape[1],), float(b))
        if t % b:
            counts[-1] = t % b
        return (sums / counts).to(torch.float64).numpy()

    def observe_prefill(self, head_mass: torch.Tensor) -> None:
        self.policy.observe_blocks(self.block_mass(head_mass), decode_step=False)

    @property
    def mass_block(self) -> int:
        """The block size this layer's decode steps need the attention mass summed in (0: no mass)."""
        return self.policy.params.block_tokens if self.needs_mass else 0

    def after_decode_step(self, head_mass: torch.Tensor | None) -> None:
        """After a decode step's attention: scoring and eviction, then the codec's cadence.
        `head_mass` is the step's attention mass per KV head and cached token, [kv_heads, T]
        (None when the layer needs none: see `needs_mass`)."""
        self.after_decode_blocks(self.block_mass(head_mass) if head_mass is not None else None)

    def after_decode_blocks(self, block_mass: np.ndarray | None) -> None:
        """`after_decode_step` with the mass already summed per KV head and block of `mass_block`
        tokens, [kv_heads, blocks] (the fast path's kernel sums it)."""
        if self.policy is not None:
            if block_mass is not None:
                self.policy.observe_blocks(block_mass)
            else:
                self.policy.tick()
        self._evict_and_measure()

    def _evict_and_measure(self) -> None:
        """After a decode step was scored: the eviction if one is due, then the codec's cadence."""
        if self.policy is not None:
            length = self.get_seq_length()
            event = self._plan(length, force=False)
            if event is not None:
                self.compact(event.plan)
                self.policy.applied(event.plan)
                if self.on_event is not None:
                    self.on_event(event)
        if self.codec is not None and self.codec.due(self.get_seq_length()):
            self.run_codec()

    def run_codec(self) -> None:
        """The codec's cadence came due: measure the layer's K/V (estimate / full modes)."""
        self.codec.measure(self.keys, self.values)

    def after_prefill_chunk(self, head_mass: torch.Tensor | None) -> None:
        """Chunked prefill: the chunk's attention (its rows' mean mass per KV head and token) is one
        observation, and the layer evicts down to its budget now if it holds trigger_min_tokens,
        whatever the decode-step clock says, so that the prompt never sits whole in the cache."""
        if head_mass is not None:
            self.policy.observe_blocks(self.block_mass(head_mass))
        else:
            self.policy.tick()
        event = self._plan(self.get_seq_length(), force=True)
        if event is not None:
            self.compact(event.plan)
            self.policy.applied(event.plan)
            if self.on_event is not None:
                self.on_event(event)

    def _check_plan(self, plan: KeepPlan) -> None:
        if plan.length != self.get_seq_length():
            raise ValueError(f"layer {self.layer_idx}: plan for {plan.length} tokens, layer holds "
                             f"{self.get_seq_length()}")

    def compact(self, plan: KeepPlan) -> None:
        """Really remove evicted tokens: kept runs move to the front, in order (per plan row: all KV
        heads, or each head its own)."""
        self._check_plan(plan)
        self.buffer.keep_runs(plan.runs)
        self.keys, self.values = self.buffer.views()
        self._report_size()

    @property
    def _cold_bytes(self) -> int:
        return 0

    @property
    def physical_bytes(self) -> int:
        """Bytes of the live raw tokens plus the cold frames."""
        if self._keys is None:
            return 0
        return self.buffer.length * self.bytes_per_token + self._cold_bytes

    @property
    def allocated_bytes(self) -> int:
        """Bytes reserved by the raw buffers (live tokens plus free slots) and cold frames."""
        return 0 if self._keys is None else self.buffer.allocated_bytes + self._cold_bytes

    @property
    def logical_bytes(self) -> int:
        return 0 if self._keys is None else self.tokens_seen * self.bytes_per_token

    @property
    def bytes_per_token(self) -> int:
        """SPEC §6 Bpt = kv_heads * head_dim * dtype_bytes * 2 (K and V)."""
        return self.buffer.bytes_per_token


class SlidingWindowLayer(H2OLayer):
    """A sliding-window attention layer (5 of every 6 of Gemma 3's): a query sees the last `window`
    tokens, itself included, so a token older than that can never be attended again.

    The rule for such layers: they keep their window semantics exactly, and are neither evicted by
    H2O nor covered by the codec (H2OCache leaves them out of both scopes). Tokens that left the
    window are dropped: after a prefill (or chunk) has attended, the layer keeps its last window - 1
    tokens (`drop_outside_window`); in decode, the buffer trims to them before a new token once it
    holds TRIM_SLACK more (one copy per TRIM_SLACK steps, not one per step). So the layer holds at
    most window - 1 + TRIM_SLACK tokens between steps. Attention reads the last `window` slots
    (`visible`). Its logical size, what a full cache of this layer holds, is its window."""

    is_sliding = True
    TRIM_SLACK = 16

    def __init__(self, layer_idx: int, window: int, store_dtype: torch.dtype, on_event=None):
        super().__init__(layer_idx, None, store_dtype, on_event)
        self.window = window

    def drop_outside_window(self, slack: int = 0) -> None:
        """Keep the last window - 1 tokens if the layer holds more than that plus `slack`."""
        keep = self.window - 1
        buffer = getattr(self, "buffer", None)
        if buffer is not None and buffer.length > keep + slack:
            n = buffer.length
            buffer.keep_runs((((n - keep, keep),),))
            self.keys, self.values = buffer.views()
            self._report_size()

    def decode_slot(self) -> tuple[int, int, int] | None:
        self.drop_outside_window(self.TRIM_SLACK)
        return super().decode_slot()

    def append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.drop_outside_window(self.TRIM_SLACK)  # each new token still sees its window - 1 predecessors
        return super().append(key_states, value_states)

    def decode_layout(self) -> tuple[int, int, int, int, int] | None:
        self.drop_outside_window(self.TRIM_SLACK)
        layout = super().decode_layout()
        if layout is None:
            return None
        *addresses, length, _ = layout
        return *addresses, length, max(0, length + 1 - self.window)

    def visible(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What a decode step attends to: the last `window` slots (the layer never compacts, so
        slots are consecutive positions)."""
        return keys[:, :, -self.window:], values[:, :, -self.window:]

    def attended_tokens(self) -> int:
        return min(self.get_seq_length() + 1, self.window)

    @property
    def logical_bytes(self) -> int:
        return 0 if self._keys is None else min(self.tokens_seen, self.window) * self.bytes_per_token


class ColdStoreLayer(H2OLayer):
    """`store` mode, the way transformers' QuantizedLayer keeps a hot window beside a cold store:
    tokens that leave the recent window (block-aligned) are held as gear_delta frames and decoded
    when attention needs them; the hot tail stays raw in the buffer. The saving is real: the
    physical size counts the frames, not the raw cold tokens."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._step_kv = None  # this step's decoded cold + hot K/V, dropped after the step

    def decode_slot(self) -> None:
        return None  # appends go through `append`, which re-joins the cold part

    def decode_layout(self) -> None:
        return None

    def full_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Cold frames decoded, then the hot part."""
        self._step_kv = None
        cold = self.codec.load_cold()
        if cold is None:
            return self.keys, self.values
        self._step_kv = (torch.cat([cold[0], self.keys], dim=2), torch.cat([cold[1], self.values], dim=2))
        return self._step_kv

    def _this_steps_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._step_kv if self._step_kv is not None else self.full_kv()

    def get_seq_length(self) -> int:
        return 0 if self._keys is None else self.buffer.length + self.codec.cold_tokens

    def reset(self) -> None:
        super().reset()
        self._step_kv = None

    def after_decode_blocks(self, block_mass: np.ndarray | None) -> None:
        super().after_decode_blocks(block_mass)
        self._step_kv = None

    def run_codec(self) -> None:
        """Move the tokens that left the raw window into a new cold frame."""
        self.buffer.replace(*self.codec.store_cold(self.keys, self.values))
        self.keys, self.values = self.buffer.views()
        self._report_size()

    def compact(self, plan: KeepPlan) -> None:
        """Everything becomes raw again (the kept tokens), and the codec re-packs the cold part later."""
        if not self.codec.cold:
            return super().compact(plan)
        self._check_plan(plan)
        index = torch.from_numpy(plan.kept_token_indices()).to(self.keys.device)
        keys, values = self._this_steps_kv()
        self.codec.cold = []
        self.buffer.replace(gather_tokens(keys, index), gather_tokens(values, index))
        self.keys, self.values = self.buffer.views()
        self._step_kv = None
        self._report_size()

    @property
    def _cold_bytes(self) -> int:
        return self.codec.cold_compressed_bytes


@dataclass
class CacheEvents:
    evictions: list[EvictionEvent] = field(default_factory=list)


class H2OCache(Cache):
    """A transformers `Cache` made of `H2OLayer`s, configured from a KVConfig. `sliding_windows`
    gives, per layer, the model's attention window (None: global attention); a windowed layer is a
    `SlidingWindowLayer`, outside the H2O and codec scopes. `rope` (layer, positions) -> (cos, sin)
    gives the model's RoPE tables, which a policy that moves its queries ahead needs."""

    def __init__(self, num_layers: int, kv: KVConfig, sliding_windows: list[int | None] | None = None,
                 rope: Callable[[int, np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None):
        self.kv = kv
        windows = list(sliding_windows) if sliding_windows is not None else [None] * num_layers
        if len(windows) != num_layers:
            raise ValueError(f"{len(windows)} sliding windows for {num_layers} layers")
        self.sliding_layer_ids = frozenset(i for i, w in enumerate(windows) if w is not None)
        self.h2o_layer_ids = [i for i in (kv.h2o_layers(num_layers) if kv.evicting else range(0))
                              if i not in self.sliding_layer_ids]
        self.events = CacheEvents()
        weights = dict(zip(self.h2o_layer_ids, layer_budget_weights(len(self.h2o_layer_ids),
                                                                     kv.h2o_layer_budget_slope)))
        store_dtype = DTYPES[kv.cache_dtype]
        self.lossless_layer_ids = kv.lossless_layers(num_layers) - self.sliding_layer_ids
        layers = []
        for i in range(num_layers):
            if windows[i] is not None:
                layers.append(SlidingWindowLayer(i, windows[i], store_dtype, on_event=self._record))
                layers[-1].on_size = self._resized
                continue
            codec = None
            if i in self.lossless_layer_ids:
                codec = LayerCodec(mode=kv.lossless_runtime_mode, update_interval=kv.h2o_update_interval,
                                   trigger_min_tokens=kv.h2o_trigger_min_tokens,
                                   raw_window_tokens=kv.h2o_recent_tokens, align_tokens=kv.h2o_block_tokens)
            policy = None
            if i in self.h2o_layer_ids:
                w = weights[i]
                params = PlanParams(block_tokens=kv.h2o_block_tokens, sink_tokens=kv.h2o_sink_tokens,
                                    recent_tokens=kv.h2o_recent_tokens, keep_ratio=min(1.0, kv.keep_ratio * w),
                                    budget_basis=kv.h2o_budget_basis,
                                    budget_tokens=max(1, round(kv.h2o_budget_tokens * w)),
                                    per_head=kv.h2o_per_head, value_norm=kv.h2o_value_norm,
                                    score_pool=kv.h2o_score_pool)
                policy = LayerPolicy(layer=i, params=params, ema_alpha=kv.h2o_ema_alpha,
                                     update_interval=kv.h2o_update_interval,
                                     trigger_min_tokens=kv.h2o_trigger_min_tokens, policy=kv.h2o_policy,
                                     seed=kv.h2o_seed, score_prefill=kv.h2o_score_prefill,
                                     query_window=kv.h2o_query_window, query_horizon=kv.h2o_query_horizon)
            layer_class = ColdStoreLayer if codec is not None and codec.mode == "store" else H2OLayer
            layers.append(layer_class(i, policy, store_dtype, on_event=self._record, codec=codec))
            layers[-1].on_size = self._resized
            if policy is not None and policy.uses_queries and policy.query_horizon:
                if rope is None:
                    raise ValueError("kv_h2o_query_horizon > 0 needs the model's RoPE tables (H2OCache's rope)")
                layers[-1].rope_tables = lambda positions, layer=i: rope(layer, positions)
        super().__init__(layers=layers)
        self._bytes = 0  # the layers' physical bytes as they reported them
        self.peak_bytes = 0  # the most K/V (raw tokens + cold frames) the cache held at any moment
        self._token_bytes: int | None = None  # one token's bytes over all layers (a fused step adds them)

    def _resized(self, change: int) -> None:
        self._bytes += change
        self.peak_bytes = max(self.peak_bytes, self._bytes)

    def after_fused_step(self, scored: list[bool]) -> None:
        """A fused decode step wrote one token into every layer before any of this runs: the cache's
        size grows by all of them at once (so the peak holds them all, as memory did), then each layer
        counts its token, scores and evicts (H2OLayer.after_fused_step; an eviction reports the smaller
        size). One update instead of a report per layer, which was half of this bookkeeping at batch 8.
        `scored`: per layer, whether the step updated its scores."""
        if self._token_bytes is None:
            self._token_bytes = sum(layer.bytes_per_token for layer in self.layers)
        self._resized(self._token_bytes)
        for layer, layer_scored in zip(self.layers, scored):
            layer.after_fused_step(layer_scored)

    @property
    def prefill_chunk_tokens(self) -> int:
        """Chunked prefill (kv_h2o_prefill_chunk_tokens): 0 when nothing evicts or it is off."""
        return self.kv.h2o_prefill_chunk_tokens if self.h2o_layer_ids else 0

    def _record(self, event: EvictionEvent) -> None:
        self.events.evictions.append(event)
        if self.kv.h2o_log_stats:  # the seed's `[H2O] ...` line per eviction
            p = event.plan
            log.info("[H2O] layer=%d kv=%d keep=%d evict=%d runs=%d target=%d floor=%d quantized=%d plan_us=%.1f",
                     event.layer, p.length, p.kept_tokens, p.evicted_tokens, p.run_count, p.target_tokens,
                     p.floor_tokens, p.quantized_tokens, event.plan_us)

    def reset(self) -> None:
        for layer in self.layers:
            layer.reset()
        self.events = CacheEvents()
        self._bytes = self.peak_bytes = 0
        self._token_bytes = None

    # transformers' Cache offers these for beam search, speculative decoding and offloading; each would
    # leave the preallocated buffers, the per-layer token counts and the policies out of step.
    def _unsupported(self, name: str):
        raise NotImplementedError(f"H2OCache.{name} is not supported: h2okit's cache serves one greedy request "
                                  "per cache (per-layer buffers, token counts and eviction state)")

    def reorder_cache(self, *args, **kwargs):
        self._unsupported("reorder_cache")

    def crop(self, *args, **kwargs):
        self._unsupported("crop")

    def offload(self, *args, **kwargs):
        self._unsupported("offload")

    def prefetch(self, *args, **kwargs):
        self._unsupported("prefetch")

    def batch_repeat_interleave(self, *args, **kwargs):
        self._unsupported("batch_repeat_interleave")

    def batch_select_indices(self, *args, **kwargs):
        self._unsupported("batch_select_indices")

    @property
    def physical_bytes(self) -> int:
        return sum(layer.physical_bytes for layer in self.layers)

    @property
    def logical_bytes(self) -> int:
        return sum(layer.logical_bytes for layer in self.layers)

    @property
    def allocated_bytes(self) -> int:
        return sum(layer.allocated_bytes for layer in self.layers)

    def seq_lengths(self) -> np.ndarray:
        return np.array([layer.get_seq_length() for layer in self.layers])

    def attended_tokens(self) -> np.ndarray:
        """Per layer, the tokens the next decode step attends to (cache length + 1; a sliding layer's
        at most its window)."""
        return np.array([layer.attended_tokens() for layer in self.layers])
