"""One request at a time on a transformers model with h2okit's cache: prefill, then greedy decode.

The decode loop is ours (not `generate`) so that positions stay true absolute positions
after evictions, exactly `n` tokens are decoded (EOS ignored), and per-request stats are
collected from the cache. Stats follow SPEC §6; the true whole-cache ratio is ours.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from .cache import H2OCache
from . import kernels
from .arch import ArchitectureUnsupported, architecture_of
from .config import DECODE_PATHS, ConfigError, KVConfig
from .model import LoadedModel, float32_twin
from .policy import SCORERS, lossy_ratio
from .table import MIB, RequestStats

log = logging.getLogger(__name__)



@dataclass
class RequestResult:
    prompt_len: int
    tokens: list[int]
    prefill_s: float
    decode_s: float
    stats: RequestStats
    kv_lengths: list[int] = field(default_factory=list)

    @property
    def prefill_tps(self) -> float:
        return self.prompt_len / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tps(self) -> float:
        return len(self.tokens) / self.decode_s if self.decode_s > 0 else 0.0


@dataclass
class BatchResult:
    """B requests decoded together: tok/s are aggregate (all sequences' tokens over the shared time)."""

    prompt_tokens: int
    tokens: list[list[int]]
    prefill_s: float
    decode_s: float
    stats: list[RequestStats]

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tps(self) -> float:
        return sum(map(len, self.tokens)) / self.decode_s if self.decode_s > 0 else 0.0


def collect_stats(cache: H2OCache) -> RequestStats:
    stats = RequestStats()
    events = cache.events.evictions
    if events:
        last = events[-1]  # "last event wins", sticky until the next one
        plan = last.plan
        bpt = cache.layers[last.layer].bytes_per_token
        stats.h2o_keep = plan.kept_tokens / plan.length
        stats.h2o_lossy = lossy_ratio(plan.length, plan.kept_tokens, plan.run_count, bpt)
        stats.h2o_target_keep_effective = plan.target_tokens / plan.length
        stats.h2o_floor_keep = plan.floor_tokens / plan.length
        stats.h2o_quantized_keep = plan.quantized_tokens / plan.length
        stats.h2o_evict_us = last.plan_us
        stats.h2o_evictions = len(events)
    codecs = [layer.codec for layer in cache.layers if layer.codec is not None and layer.codec.measurements]
    if codecs:
        raw = sum(c.raw_bytes for c in codecs)
        packed = sum(c.compressed_bytes for c in codecs)
        stats.h2o_lossless = max(1.0, raw / packed) if packed else 1.0
        stats.h2o_codec_us = sum(c.encode_us for c in codecs) / len(codecs)
        stats.h2o_codec_decode_us = sum(c.decode_us for c in codecs) / len(codecs)
        stats.kv_lossless_mb = packed / MIB
    physical, logical = cache.physical_bytes, cache.logical_bytes
    stats.kv_phys_mb = physical / MIB
    stats.kv_logical_mb = logical / MIB
    stats.kv_alloc_mb = cache.allocated_bytes / MIB
    stats.kv_peak_mb = cache.peak_bytes / MIB
    stats.kv_true_ratio = logical / physical if physical else 1.0
    return stats




def greedy(logits: torch.Tensor) -> int | list[int]:
    """The argmax token of logits [vocab] (or of each row of [batch, vocab]), taken by numpy: torch
    reduces a vocabulary on its OpenMP threads, which woke an idle thread between every two decode
    steps (threads.py)."""
    tokens = logits.float().numpy().argmax(-1)
    return tokens.tolist() if logits.dim() > 1 else int(tokens)


class Engine:
    """A loaded model plus a KV config; `generate` runs one request from an empty cache.

    Decode steps take the fast path (fastpath.py, C kernels) when `decode_path` is "auto" and
    the model supports it, or always with "fast" (an error if it cannot); "reference" is the
    plain transformers forward. `decode_path_used` and `decode_path_note` say what runs.
    """

    def __init__(self, loaded: LoadedModel, kv: KVConfig, decode_path: str = "auto"):
        from .fastpath import FastDecoder, FastPathUnavailable

        if decode_path not in DECODE_PATHS:
            raise ValueError(f"decode path '{decode_path}' unknown; allowed: {', '.join(DECODE_PATHS)}")
        self.loaded = loaded
        self.kv = kv
        for line in kv.layer_warnings(loaded.num_layers):
            log.warning("warning: %s", line)
        windows = loaded.sliding_windows or [None] * loaded.num_layers
        sliding = [i for i in kv.h2o_layers(loaded.num_layers) if windows[i] is not None]
        if kv.evicting and sliding:
            log.info("note: %d of the H2O range's layers are sliding-window layers (%s); they keep their window "
                     "exactly and are not evicted", len(sliding), ",".join(map(str, sliding)))
        self.model = loaded.model
        self.rope_tables = None  # (layer, positions) -> RoPE (cos, sin): for a policy that moves its queries ahead
        if kv.evicting and SCORERS[kv.h2o_policy].uses_queries and kv.h2o_query_horizon:
            try:
                self.rope_tables = architecture_of(loaded.model).rope_tables
            except ArchitectureUnsupported as exc:
                raise ConfigError(f"kv_h2o_query_horizon {kv.h2o_query_horizon}: the model's RoPE tables are not "
                                  f"known for {exc}; allowed for it: 0") from None
        # bf16 weights: prefill computes in float32 (transformers' bf16 matmuls run at ~1/5 of float32's
        # speed on this CPU); decode steps stay on the bf16 model or the fast path's bf16 weights
        self.prefill_model = float32_twin(loaded.model)
        self.fast: FastDecoder | None = None
        self.decode_path_note = "transformers forward, as requested"
        if decode_path != "reference":
            try:
                self.fast = FastDecoder.for_model(loaded)
                self.decode_path_note = (f"C kernels ({kernels.vector_isa()}) for decode steps, "
                                         f"weights: {self.fast.weights.description}; "
                                         f"{self.fast.inputs_note}; "
                                         f"prefill by the transformers forward")
            except FastPathUnavailable as exc:
                if decode_path == "fast":
                    raise
                self.decode_path_note = f"transformers forward; fast path unavailable: {exc}"

    @property
    def decode_path_used(self) -> str:
        return "fast" if self.fast is not None else "reference"

    def new_cache(self) -> H2OCache:
        return H2OCache(self.loaded.num_layers, self.kv, self.loaded.sliding_windows, rope=self.rope_tables)

    @torch.inference_mode()
    def forward(self, cache: H2OCache, ids: list[int], start_pos: int, all_logits: bool = False) -> torch.Tensor:
        """Feed `ids` at absolute positions start_pos.. ; returns logits (last row, or all rows).
        One token goes through the fast path when the engine has one."""
        if len(ids) == 1 and self.fast is not None:
            return self.fast.step(cache, ids[0], start_pos).unsqueeze(0)
        chunk = cache.prefill_chunk_tokens
        if chunk and len(ids) > chunk:  # chunked prefill: the evicting layers shrink between chunks
            parts = [self.forward(cache, ids[i:i + chunk], start_pos + i, all_logits)
                     for i in range(0, len(ids), chunk)]
            return torch.cat(parts) if all_logits else parts[-1]
        input_ids = torch.tensor([ids], dtype=torch.long)
        positions = torch.arange(start_pos, start_pos + len(ids), dtype=torch.long).unsqueeze(0)
        model = self.model if len(ids) == 1 else self.prefill_model
        out = model(input_ids=input_ids, position_ids=positions, cache=cache, use_cache=True,
                         logits_to_keep=0 if all_logits else 1, h2o_cache=cache)
        return out.logits[0]

    def generate_batch(self, prompts: list[list[int]], n: int) -> BatchResult:
        """Greedy for B requests decoded together: each prompt is prefilled on its own (into its own
        cache), then `n` steps run for all of them at once on the fast path, the weights read once per
        step for the whole batch (FastDecoder.step_batch). Each sequence keeps its own cache and
        policies, so its tokens are those `generate` gives it alone."""
        if self.fast is None:
            raise ValueError(f"batched decode runs on the fast path; this engine has none ({self.decode_path_note})")
        if not prompts or not all(prompts):
            raise ValueError("batched decode needs at least one prompt, none empty")
        caches = [self.new_cache() for _ in prompts]
        started = time.perf_counter()
        next_tokens = [greedy(self.forward(cache, prompt, 0)[-1]) for cache, prompt in zip(caches, prompts)]
        prefill_s = time.perf_counter() - started
        tokens: list[list[int]] = [[] for _ in prompts]
        started = time.perf_counter()
        for step in range(n):
            for row, token in zip(tokens, next_tokens):
                row.append(token)
            logits = self.fast.step_batch(caches, next_tokens, [len(p) + step for p in prompts])
            next_tokens = greedy(logits)
        decode_s = time.perf_counter() - started
        return BatchResult(prompt_tokens=sum(map(len, prompts)), tokens=tokens, prefill_s=prefill_s,
                           decode_s=decode_s, stats=[collect_stats(cache) for cache in caches])

    def generate(self, prompt: list[int], n: int, after_prefill=None, at_end=None) -> RequestResult:
        """Greedy: prefill `prompt`, then exactly `n` decode steps (EOS ignored).
        `after_prefill(cache)` / `at_end(cache)` may look at the cache (untimed)."""
        if not prompt:
            raise ValueError("empty prompt")
        cache = self.new_cache()
        started = time.perf_counter()
        logits = self.forward(cache, prompt, 0)
        next_token = greedy(logits[-1])
        prefill_s = time.perf_counter() - started
        if after_prefill is not None:
            after_prefill(cache)
        tokens: list[int] = []
        started = time.perf_counter()
        for step in range(n):
            tokens.append(next_token)
            logits = self.forward(cache, [next_token], len(prompt) + step)
            next_token = greedy(logits[-1])
        decode_s = time.perf_counter() - started
        if at_end is not None:
            at_end(cache)
        return RequestResult(prompt_len=len(prompt), tokens=tokens, prefill_s=prefill_s, decode_s=decode_s,
                             stats=collect_stats(cache), kv_lengths=cache.seq_lengths().tolist())
