"""The pure H2O policy: numbers in, keep-plan out (SPEC §2-§3). No torch here.

One `LayerPolicy` per H2O layer holds that layer's EMA block scores and trigger clock;
`build_plan` turns a layer's scores into a `KeepPlan` (which blocks survive). The torch
runtime feeds attention mass in and applies plans; tests drive this module directly.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

POLICIES = ("h2o", "streaming", "random", "full")


@dataclass(frozen=True)
class PlanParams:
    block_tokens: int
    sink_tokens: int
    recent_tokens: int
    keep_ratio: float  # static: target_keep_ratio; adaptive: 1/target_lossy_ratio
    policy: str = "h2o"

    def __post_init__(self):
        if self.block_tokens < 1:
            raise ValueError(f"block_tokens must be >= 1, got {self.block_tokens}")
        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}; allowed: {', '.join(POLICIES)}")


@dataclass(frozen=True)
class KeepPlan:
    """Which tokens of a layer survive one eviction. Block indices refer to the layer as it was."""

    kv: int
    block_tokens: int
    kept_blocks: np.ndarray  # ascending block indices
    floor_tokens: int
    target_tokens: int
    quantized_tokens: int
    kept_tokens: int
    runs: tuple[tuple[int, int], ...]  # ascending (begin, length) token runs

    @property
    def evicted_tokens(self) -> int:
        return self.kv - self.kept_tokens

    def kept_token_indices(self) -> np.ndarray:
        if not self.runs:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([np.arange(b, b + n, dtype=np.int64) for b, n in self.runs])


def num_blocks(kv: int, block_tokens: int) -> int:
    return -(-kv // block_tokens)


def block_sizes(kv: int, block_tokens: int) -> np.ndarray:
    nb = num_blocks(kv, block_tokens)
    sizes = np.full(nb, block_tokens, dtype=np.int64)
    if nb and kv % block_tokens:
        sizes[-1] = kv % block_tokens
    return sizes


def floor_mask(kv: int, params: PlanParams) -> np.ndarray:
    """Blocks protected by the sink and recent floors, each rounded out to whole blocks."""
    b = params.block_tokens
    nb = num_blocks(kv, b)
    protected = np.zeros(nb, dtype=bool)
    protected[: min(nb, -(-params.sink_tokens // b))] = True
    # With recent=0 this still protects a partial last block (the write head), as SPEC §3 says.
    protected[max(0, kv - params.recent_tokens) // b :] = True
    return protected


def _candidate_order(candidates: np.ndarray, scores: np.ndarray, policy: str,
                     rng: np.random.Generator | None) -> np.ndarray:
    """Unprotected block indices, best first. Ties: lower block index first (stable)."""
    if policy == "h2o":
        return candidates[np.argsort(-scores[candidates], kind="stable")]
    if policy == "streaming":
        return candidates[::-1]  # the budget extends the recent window
    if policy == "random":
        if rng is None:
            raise ValueError("the random policy needs an rng")
        return candidates[rng.permutation(len(candidates))]
    raise ValueError(f"policy {policy!r} does not select blocks")


def build_plan(kv: int, scores: np.ndarray, params: PlanParams,
               rng: np.random.Generator | None = None) -> KeepPlan | None:
    """SPEC §3 steps 1-6 for one layer. None when nothing would be evicted (floor dominates)."""
    if params.policy == "full" or kv <= 0:
        return None
    b = params.block_tokens
    sizes = block_sizes(kv, b)
    if len(scores) != len(sizes):
        raise ValueError(f"{len(scores)} block scores for {len(sizes)} blocks (kv={kv}, block={b})")
    protected = floor_mask(kv, params)
    floor_tokens = int(sizes[protected].sum())
    target = min(max(math.ceil(params.keep_ratio * kv), 1), kv)
    target = max(target, floor_tokens)
    if floor_tokens >= target:
        return None  # floor dominates: no eviction, stats untouched
    quantized = min(kv, floor_tokens + -(-(target - floor_tokens) // b) * b)

    keep = protected.copy()
    kept = floor_tokens
    for block in _candidate_order(np.flatnonzero(~protected), scores, params.policy, rng):
        if kept >= quantized:
            break
        keep[block] = True
        kept += int(sizes[block])
    if kept >= kv:
        return None  # the quantised budget covers everything
    kept_blocks = np.flatnonzero(keep)
    return KeepPlan(kv=kv, block_tokens=b, kept_blocks=kept_blocks, floor_tokens=floor_tokens,
                    target_tokens=target, quantized_tokens=quantized, kept_tokens=kept,
                    runs=_runs(kept_blocks, sizes, b))


def _runs(kept_blocks: np.ndarray, sizes: np.ndarray, b: int) -> tuple[tuple[int, int], ...]:
    runs: list[list[int]] = []
    for block in kept_blocks.tolist():
        begin, length = block * b, int(sizes[block])
        if runs and runs[-1][0] + runs[-1][1] == begin:
            runs[-1][1] += length
        else:
            runs.append([begin, length])
    return tuple((begin, length) for begin, length in runs)


def lossy_ratio(kv: int, kept: int, runs: int, bytes_per_token: int) -> float:
    """SPEC §6 h2o_lossy: logical bytes over kept bytes plus 8 bytes of run metadata per run."""
    return kv * bytes_per_token / (kept * bytes_per_token + 8 * runs)


@dataclass
class EvictionEvent:
    """What one eviction did; the runtime turns the last one into the h2o_* stats."""

    layer: int
    plan: KeepPlan
    plan_us: float


@dataclass
class LayerPolicy:
    """One H2O layer's state: EMA block scores and the per-layer trigger clock (SPEC §2-§3)."""

    layer: int
    params: PlanParams
    ema_alpha: float
    update_interval: int
    trigger_min_tokens: int
    seed: int = 0
    score_prefill: bool = False
    scores: np.ndarray = field(default_factory=lambda: np.zeros(0))
    steps_since_eviction: int = 0
    evictions: int = 0

    def reset(self) -> None:
        self.scores = np.zeros(0)
        self.steps_since_eviction = 0
        self.evictions = 0

    def observe(self, token_mass: np.ndarray, decode_step: bool = True) -> None:
        """One step's attention mass per cached token (already head- and row-averaged)."""
        kv = len(token_mass)
        current = np.add.reduceat(np.asarray(token_mass, dtype=np.float64), np.arange(0, kv, self.params.block_tokens))
        self.observe_blocks(current, decode_step)

    def observe_blocks(self, current: np.ndarray, decode_step: bool = True) -> None:
        """The same, already summed per block (the last block may be partial).
        A prefill observation (decode_step=False, opt-in) sets the initial scores; no clock tick."""
        nb = len(current)
        if nb < len(self.scores):
            raise ValueError(f"layer {self.layer}: {nb} blocks observed but {len(self.scores)} scored")
        if not decode_step:  # the prompt's attention seeds the scores (blending it would weigh it 1-a)
            self.scores = np.asarray(current, dtype=np.float64)
            return
        if nb > len(self.scores):  # new blocks start at 0
            self.scores = np.concatenate([self.scores, np.zeros(nb - len(self.scores))])
        a = self.ema_alpha
        self.scores = a * self.scores + (1.0 - a) * current
        self.steps_since_eviction += 1

    def maybe_plan(self, kv: int) -> EvictionEvent | None:
        """After a decode step: the plan to apply now, or None. Call `applied` once it is applied."""
        if kv < self.trigger_min_tokens or self.steps_since_eviction < self.update_interval:
            return None
        started = time.perf_counter()
        rng = None
        if self.params.policy == "random":
            rng = np.random.default_rng([self.seed, self.layer, self.evictions])
        plan = build_plan(kv, self.scores, self.params, rng)
        plan_us = (time.perf_counter() - started) * 1e6
        return None if plan is None else EvictionEvent(self.layer, plan, plan_us)

    def applied(self, plan: KeepPlan) -> None:
        """The layer was compacted: scores move with their blocks, the clock restarts."""
        self.scores = self.scores[plan.kept_blocks]
        self.steps_since_eviction = 0
        self.evictions += 1
