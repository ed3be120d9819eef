"""The pure eviction policy: numbers in, keep-plan out (SPEC §2-§3, §10). No torch here.

Three separate pieces, so that each can be read and tested alone:
- a **budget** (`PlanParams.budget_tokens_for`): how many tokens a layer keeps, by basis
  `current` (the seed: ratio × the layer's current length), `seen` (ratio × tokens the layer
  has seen) or `tokens` (a fixed count); the sink and recent floors are part of it;
- a **scorer** (`SCORERS`, one small class per policy, as kvpress has one press per method):
  it folds each decode step's attention mass into per-block scores, and only scores;
- **selection** (`build_plan`): floors first, then the best-scoring blocks up to the budget,
  either one choice for the whole layer or one per KV head (`per_head`: every head keeps the
  same number of tokens, its own ones, so K/V stay rectangular).

One `LayerPolicy` per evicting layer holds its scorer state and trigger clock; the torch
runtime feeds attention mass in and applies plans; tests drive this module directly.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

BUDGET_BASES = ("current", "seen", "tokens")


def _grown(state: np.ndarray, rows: int, nb: int) -> np.ndarray:
    """`state` with `rows` rows (if it had no columns) and at least `nb` columns, new ones 0."""
    if state.shape[0] != rows and state.shape[1] == 0:
        state = np.zeros((rows, 0))
    if nb > state.shape[1]:
        state = np.concatenate([state, np.zeros((state.shape[0], nb - state.shape[1]))], axis=1)
    return state


def block_sums(values: np.ndarray, block_tokens: int) -> np.ndarray:
    """[rows, tokens] -> [rows, blocks]: each block's sum (the last block may be partial)."""
    return np.add.reduceat(values, np.arange(0, values.shape[1], block_tokens), axis=1)


def _take_blocks(state: np.ndarray, kept_blocks: np.ndarray) -> np.ndarray:
    """Each row's kept blocks (a shared plan's one row serves every row of a per-head state); a new array."""
    if kept_blocks.shape[0] == 1:
        return state[:, kept_blocks[0]]
    return np.take_along_axis(state, kept_blocks, axis=1)


# --- scorers ---------------------------------------------------------------------------------
class Scorer:
    """Per-block scores of one layer, `[heads, blocks]` (heads = 1 when selection is shared).

    `observe` gets one decode step's attention mass per block (new blocks appear at the end);
    `seed` the prompt's (opt-in); `scores` is read at plan time; `keep` re-maps the state
    after compaction (each row keeps its own blocks). Higher scores are kept first.

    A scorer whose step is `scores = decay * scores + gain * mass` says so (`rule`); the fast path's
    fused decode step then applies that rule in C to the same array (`storage`), in numpy's
    arithmetic, so the scores do not depend on which path computed them. The array has spare
    columns, zero beyond the scored blocks, so that new blocks start at 0 without a reallocation.
    """

    name: ClassVar[str] = ""
    uses_attention: ClassVar[bool] = True  # False: the runtime need not compute attention mass
    uses_queries: ClassVar[bool] = False  # True: plans need the layer's keys and its recent queries (`prepare`)
    doc: ClassVar[str] = ""

    def __init__(self, alpha: float = 0.9, seed: int = 0, layer: int = 0):
        self.alpha, self.seed, self.layer = alpha, seed, layer
        self._store = np.zeros((1, 0))  # [rows, capacity]; columns from _blocks on are 0
        self._blocks = 0
        self.evictions = 0

    @property
    def state(self) -> np.ndarray:
        """The scores of the blocks scored so far, [rows, blocks] (a view)."""
        return self._store[:, :self._blocks]

    @state.setter
    def state(self, value: np.ndarray) -> None:
        self._store = np.array(value, dtype=np.float64, ndmin=2)
        self._blocks = self._store.shape[1]

    def rule(self) -> tuple[float, float] | None:
        """(decay, gain) of this scorer's step, or None when its step is not of that form."""
        return None

    def storage(self, rows: int, nb: int) -> np.ndarray:
        """The scores' backing array, [rows, capacity >= nb], for an update of `nb` blocks in place."""
        if self._store.shape[0] != rows and self._blocks == 0:
            self._store = np.zeros((rows, 0))
        if nb > self._store.shape[1]:
            grown = np.zeros((self._store.shape[0], max(nb + 64, 2 * self._store.shape[1])))
            grown[:, :self._blocks] = self.state
            self._store = grown
        return self._store

    def serves(self, store: np.ndarray, nb: int) -> bool:
        """Is `store` (from `storage`) still the backing array, with room for `nb` blocks? Then a fused step
        may update it in place again without asking `storage`."""
        return store is self._store and nb <= store.shape[1]

    def updated_in_place(self, nb: int) -> None:
        """`rule` was applied to the first `nb` blocks of `storage` (by the fused decode step)."""
        self._blocks = max(self._blocks, nb)

    def _apply(self, mass: np.ndarray, decay: float, gain: float) -> None:
        nb = mass.shape[1]
        scores = self.storage(mass.shape[0], nb)[:, :nb]
        scores[...] = decay * scores + gain * mass
        self._blocks = max(self._blocks, nb)

    def observe(self, mass: np.ndarray) -> None:
        rule = self.rule()
        if rule is not None:  # (scorers that need no attention ignore it)
            self._apply(mass, *rule)

    def seed_prompt(self, mass: np.ndarray) -> None:
        self.state = mass

    def scores(self, nb: int) -> np.ndarray:
        """[rows, nb] scores (a copy; blocks never observed score 0)."""
        return np.array(self.storage(self._store.shape[0], nb)[:, :nb])

    def keep(self, kept_blocks: np.ndarray) -> None:
        """kept_blocks: [heads or 1, k] ascending block indices of the old layout. The kept scores move to the
        front of the same storage (zeros after them), so a fused step's pointer to it stays valid and the
        next step needs no new array (a new one per eviction refilled every evicting layer's slot)."""
        if self._blocks:  # (scorers that need no attention never hold state)
            kept = _take_blocks(self.state, kept_blocks)  # (a copy: writing it back cannot alias)
            self._store[:, :kept.shape[1]] = kept
            self._store[:, kept.shape[1]:self._blocks] = 0.0
            self._blocks = kept.shape[1]
        self.evictions += 1


class EMAScorer(Scorer):
    name = "h2o"
    doc = "the seed's H2O: exponential moving average of attention mass (kv_h2o_ema_alpha)"

    def rule(self):
        return self.alpha, 1.0 - self.alpha


class LastStepScorer(Scorer):
    name = "tova"
    doc = "TOVA: the latest decode step's attention only"

    def rule(self):
        return 0.0, 1.0


class MeanScorer(Scorer):
    """H2O's accumulated attention is biased towards old tokens (they were visible to more queries);
    dividing by how many steps each block has been visible removes that age bias."""

    name = "mean"
    doc = "accumulated attention / steps each block was visible (H2O without its age bias)"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.age = np.zeros((1, 0))

    def observe(self, mass):
        self._apply(mass, 1.0, 1.0)
        self.age = _grown(self.age, *mass.shape) + 1.0

    def seed_prompt(self, mass):
        super().seed_prompt(mass)
        self.age = np.ones_like(self.state)

    def scores(self, nb):
        state = super().scores(nb)
        age = _grown(self.age, state.shape[0], nb)
        return np.divide(state, age, out=np.zeros_like(state), where=age > 0)

    def keep(self, kept_blocks):
        self.age = _take_blocks(self.age, kept_blocks)
        super().keep(kept_blocks)


class WindowScorer(Scorer):
    """SnapKV's observation window, in decode: the attention of the queries since the last eviction
    (kv_h2o_update_interval of them), summed; the window restarts after each eviction."""

    name = "window"
    doc = "attention summed over the decode steps since the last eviction (SnapKV-like window)"

    def rule(self):
        return 1.0, 1.0

    def keep(self, kept_blocks):
        super().keep(kept_blocks)
        self.state[:] = 0.0


class RecencyScorer(Scorer):
    name = "streaming"
    uses_attention = False
    doc = "StreamingLLM: sink + the most recent tokens (the budget extends the recent window)"

    def scores(self, nb):
        return np.arange(nb, dtype=np.float64)[None, :]


class RandomScorer(Scorer):
    name = "random"
    uses_attention = False
    doc = "random blocks under the same floors and budget (seeded by kv_h2o_seed, layer, eviction)"

    def scores(self, nb):
        return np.random.default_rng([self.seed, self.layer, self.evictions]).random((1, nb))


def expected_attention(keys: np.ndarray, queries: np.ndarray, scale: float) -> np.ndarray:
    """[kv_heads, tokens]: the attention a query drawn from N(mean, covariance) of `queries` would pay each
    key, per query head, summed over each KV head's query heads (divided by all query heads, as SPEC §2's
    mass). keys [kv_heads, T, D] (after RoPE, as cached), queries [n, q_heads, D] (after RoPE, unscaled).

    For q ~ N(mu, S), E[exp(s q.k)] = exp(s mu.k + s^2 k'Sk / 2), so each key's expected logit is
    s mu.k + s^2 k'Sk / 2 and its expected attention the softmax of those over the keys (kvpress's
    Expected Attention, with the queries' statistics taken after RoPE: the recent queries' mean keeps the
    slowly rotating dimensions and averages the fast ones out)."""
    kv_heads, tokens, dim = keys.shape
    n, q_heads, _ = queries.shape
    group = q_heads // kv_heads
    q = np.asarray(queries, dtype=np.float32)
    mean = q.mean(axis=0)  # [q_heads, D]
    # k'Sk = |C k|^2 / (n - 1) with C the centred queries: one product per KV head with its query heads'
    # mean and centred queries stacked, [group (n + 1), D] @ [D, T] (cheaper than S itself while n < D)
    rows = np.concatenate([mean[None], q - mean], axis=0)  # [n + 1, q_heads, D]
    out = np.zeros((kv_heads, tokens))
    for g in range(kv_heads):
        heads = np.ascontiguousarray(rows[:, g * group:(g + 1) * group].transpose(1, 0, 2)).reshape(-1, dim)
        products = (heads @ np.asarray(keys[g], dtype=np.float32).T).reshape(group, n + 1, tokens)
        logits = scale * products[:, 0].astype(np.float64)  # [group, T]
        if n > 1:
            centred = products[:, 1:]
            logits += 0.5 * scale * scale * np.einsum("gnt,gnt->gt", centred, centred).astype(np.float64) / (n - 1)
        logits -= logits.max(axis=1, keepdims=True)
        probs = np.exp(logits)
        out[g] = (probs / probs.sum(axis=1, keepdims=True)).sum(axis=0)
    return out / q_heads


def rotate_half(x: np.ndarray) -> np.ndarray:
    """RoPE's pairing as transformers applies it (Llama, Gemma 3): dimension i turns with i + D/2."""
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def queries_ahead(queries: np.ndarray, own_cos: np.ndarray, own_sin: np.ndarray, ahead_cos: np.ndarray,
                  ahead_sin: np.ndarray) -> np.ndarray:
    """The recent queries moved to the positions the next queries will take (kvpress's n_future_positions).

    queries [n, q_heads, D] after RoPE at their own positions, whose tables are own_cos/own_sin [n, D];
    ahead_cos/ahead_sin [D]: the tables averaged over the next positions. Each query is turned back to
    position 0 (R(-p) q) and then by the averaged rotation (mean over f of R(f)), which is a rotation
    shrunk where the angle turns fast over the horizon. The tables may carry a RoPE attention factor
    (cos^2 + sin^2 = a^2): turning back divides it out, so the result carries the factor once, as a query
    rotated at one position does. Returns float32 [n, q_heads, D]."""
    q = np.asarray(queries, dtype=np.float32)
    own_cos, own_sin = np.asarray(own_cos, np.float32)[:, None], np.asarray(own_sin, np.float32)[:, None]
    factor_sq = own_cos * own_cos + own_sin * own_sin
    at_zero = (q * own_cos - rotate_half(q) * own_sin) / factor_sq
    ahead_cos, ahead_sin = np.asarray(ahead_cos, np.float32), np.asarray(ahead_sin, np.float32)
    return (at_zero * ahead_cos + rotate_half(at_zero) * ahead_sin).astype(np.float32)


class ExpectedAttentionScorer(Scorer):
    """kvpress's Expected Attention: no past attention at all. At plan time each key scores the attention
    the layer's next queries are expected to pay it, modelling them as a Gaussian fitted to its recent
    queries (`expected_attention`). Scores are per KV head ([kv_heads, blocks]); a shared choice sums them
    (after the value-norm weighting, per head)."""

    name = "expected"
    uses_attention = False
    uses_queries = True
    doc = "expected attention of the next queries (Gaussian fitted to the recent ones; kvpress)"
    # Added to every token's expected attention (probabilities, ~1/T each), as kvpress's epsilon, so that
    # the value-norm weighting still separates keys no query is expected to attend.
    EPSILON = 1e-4

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._token_scores: np.ndarray | None = None
        self._block = 1

    def prepare(self, keys: np.ndarray, queries: np.ndarray, scale: float, block_tokens: int) -> None:
        """The layer's keys and recent queries for the next `scores` (see `expected_attention`)."""
        if len(queries) == 0:
            raise ValueError(f"layer {self.layer}: expected attention needs at least one recorded query")
        self._token_scores = expected_attention(keys, queries, scale) + self.EPSILON
        self._block = block_tokens

    def scores(self, nb):
        if self._token_scores is None:
            raise RuntimeError(f"layer {self.layer}: `prepare` must run before expected-attention scores")
        tokens, self._token_scores = self._token_scores, None
        block_scores = block_sums(tokens, self._block)
        if block_scores.shape[1] != nb:
            raise ValueError(f"layer {self.layer}: {block_scores.shape[1]} blocks of keys for {nb} blocks")
        return block_scores


SCORERS: dict[str, type[Scorer]] = {cls.name: cls for cls in (
    EMAScorer, LastStepScorer, MeanScorer, WindowScorer, RecencyScorer, RandomScorer, ExpectedAttentionScorer)}
# "full" is a policy too: the same runtime, no eviction (the baseline of every comparison).
POLICIES: tuple[str, ...] = (*SCORERS, "full")


# --- the plan ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class PlanParams:
    block_tokens: int
    sink_tokens: int
    recent_tokens: int
    keep_ratio: float  # static: target_keep_ratio; adaptive: 1/target_lossy_ratio
    budget_basis: str = "current"
    budget_tokens: int = 0  # basis "tokens": the fixed number of kept tokens
    per_head: bool = False
    value_norm: bool = False  # weigh each block's score by its values' mean L2 norm (per head or pooled)
    score_pool: int = 1  # plan-time max pooling of the scores over this many blocks (odd; 1: off)

    def __post_init__(self):
        if self.block_tokens < 1:
            raise ValueError(f"block_tokens must be >= 1, got {self.block_tokens}")
        if self.score_pool < 1 or self.score_pool % 2 == 0:
            raise ValueError(f"score_pool must be an odd number >= 1, got {self.score_pool}")
        if self.budget_basis not in BUDGET_BASES:
            raise ValueError(f"unknown budget basis {self.budget_basis!r}; allowed: {', '.join(BUDGET_BASES)}")

    def budget_tokens_for(self, length: int, seen: int) -> int:
        """The kept-token budget of a layer holding `length` tokens after seeing `seen`, in [1, length]."""
        if self.budget_basis == "tokens":
            budget = self.budget_tokens
        else:
            budget = math.ceil(self.keep_ratio * (length if self.budget_basis == "current" else seen))
        return min(max(budget, 1), length)

    def floor_tokens_max(self) -> int:
        """Most tokens the floors can hold (sink and recent each rounded out to whole blocks, plus
        one more block where the recent window straddles a boundary)."""
        b = self.block_tokens
        return (-(-self.sink_tokens // b) + -(-self.recent_tokens // b) + 1) * b


@dataclass(frozen=True)
class KeepPlan:
    """Which tokens of a layer survive one eviction. Block indices refer to the layer as it was.
    `kept_blocks` has one row for a shared choice, one per KV head for a per-head one."""

    length: int
    block_tokens: int
    kept_blocks: np.ndarray  # [rows, k] ascending block indices per row
    floor_tokens: int
    target_tokens: int
    quantized_tokens: int
    kept_tokens: int  # per row (every row keeps the same count)
    runs: tuple[tuple[tuple[int, int], ...], ...]  # per row: ascending (begin, length) token runs

    @property
    def evicted_tokens(self) -> int:
        return self.length - self.kept_tokens

    @property
    def run_count(self) -> int:
        """Runs over all rows: what h2o_lossy's 8-byte-per-run metadata counts."""
        return sum(len(r) for r in self.runs)

    @property
    def per_head(self) -> bool:
        return self.kept_blocks.shape[0] > 1

    def kept_token_indices(self) -> np.ndarray:
        """[rows, kept_tokens] ascending token indices per row."""
        return runs_token_indices(self.runs)


def runs_token_indices(runs: tuple[tuple[tuple[int, int], ...], ...]) -> np.ndarray:
    """Per row ascending (begin, length) token runs, every row as many tokens -> [rows, tokens] indices."""
    return np.stack([_run_tokens(np.asarray(row, dtype=np.int64).reshape(-1, 2)) for row in runs])


def num_blocks(length: int, block_tokens: int) -> int:
    return -(-length // block_tokens)


def block_sizes(length: int, block_tokens: int) -> np.ndarray:
    nb = num_blocks(length, block_tokens)
    sizes = np.full(nb, block_tokens, dtype=np.int64)
    if nb and length % block_tokens:
        sizes[-1] = length % block_tokens
    return sizes


def floor_mask(length: int, params: PlanParams) -> np.ndarray:
    """Blocks protected by the sink and recent floors, each rounded out to whole blocks."""
    b = params.block_tokens
    nb = num_blocks(length, b)
    protected = np.zeros(nb, dtype=bool)
    protected[: min(nb, -(-params.sink_tokens // b))] = True
    # With recent=0 this still protects a partial last block (the write head), as SPEC §3 says.
    protected[max(0, length - params.recent_tokens) // b :] = True
    return protected


def _trim_floors(length: int, params: PlanParams, sizes: np.ndarray, budget: int) -> np.ndarray:
    """Floors that exceed a `seen`/`tokens` budget are cut to fit it (the budget is what it says):
    the newest block first (the write head), then the sink blocks in order, then the newest recent ones."""
    b, nb = params.block_tokens, len(sizes)
    sink = range(min(nb - 1, -(-params.sink_tokens // b)))
    recent = range(nb - 2, max(0, length - params.recent_tokens) // b - 1, -1)
    trimmed = np.zeros(nb, dtype=bool)
    trimmed[nb - 1] = True
    total = int(sizes[nb - 1])
    for i in [*sink, *(i for i in recent if i not in sink)]:
        if total + sizes[i] <= budget:
            trimmed[i] = True
            total += int(sizes[i])
    return trimmed


def build_plan(length: int, scores: np.ndarray, params: PlanParams, seen: int | None = None) -> KeepPlan | None:
    """SPEC §3 steps 1-6 for one layer (with §10's budget bases). `scores` is [rows, blocks] (or
    [blocks]): one row = one choice for all KV heads. None when nothing would be evicted."""
    if length <= 0:
        return None
    scores = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    b = params.block_tokens
    sizes = block_sizes(length, b)
    if scores.shape[1] != len(sizes):
        raise ValueError(f"{scores.shape[1]} block scores for {len(sizes)} blocks (length={length}, block={b})")
    protected = floor_mask(length, params)
    floor_tokens = int(sizes[protected].sum())
    budget = params.budget_tokens_for(length, length if seen is None else seen)
    if params.budget_basis == "current":  # SPEC §3 as the seed had it: floors win, blocks round up
        target = max(budget, floor_tokens)
        if floor_tokens >= target:
            return None  # floor dominates: no eviction, stats untouched
        quantized = min(length, floor_tokens + -(-(target - floor_tokens) // b) * b)
    else:  # floors come out of the budget; the rest is the nearest whole number of blocks
        target = budget
        protected[-1] = True  # the write head, even with no recent floor
        floor_tokens = int(sizes[protected].sum())
        if floor_tokens > target:
            protected = _trim_floors(length, params, sizes, target)
            floor_tokens = int(sizes[protected].sum())
        quantized = floor_tokens + (max(0, target - floor_tokens) + b // 2) // b * b  # nearest (half down)
    candidates = np.flatnonzero(~protected)  # always whole blocks: the partial last block is protected
    extra = min(len(candidates), (quantized - floor_tokens) // b + (1 if (quantized - floor_tokens) % b else 0))
    kept_tokens = floor_tokens + int(sizes[candidates[:extra]].sum()) if extra else floor_tokens
    if kept_tokens >= length:
        return None  # the quantised budget covers everything
    rows = []
    for row in scores:
        best = candidates[np.argsort(-row[candidates], kind="stable")[:extra]]  # ties: lower index first
        keep = protected.copy()
        keep[best] = True
        rows.append(np.flatnonzero(keep))
    kept_blocks = np.stack(rows)
    return KeepPlan(length=length, block_tokens=b, kept_blocks=kept_blocks, floor_tokens=floor_tokens,
                    target_tokens=target, quantized_tokens=quantized, kept_tokens=kept_tokens,
                    runs=tuple(_runs(row, sizes, b) for row in kept_blocks))


def _runs(kept_blocks: np.ndarray, sizes: np.ndarray, b: int) -> tuple[tuple[int, int], ...]:
    """Ascending kept blocks -> their (begin, length) token runs, neighbouring blocks merged (in numpy:
    at block 1 a plan keeps hundreds of blocks per row, and a Python loop over them was most of it)."""
    blocks = np.asarray(kept_blocks, dtype=np.int64)
    if blocks.size == 0:
        return ()
    begins, ends = blocks * b, blocks * b + sizes[blocks]
    starts = np.ones(len(blocks), dtype=bool)  # blocks that start a run (not np.r_: ~15 us a call)
    np.not_equal(begins[1:], ends[:-1], out=starts[1:])
    first = np.flatnonzero(starts)
    last = np.append(first[1:], len(blocks)) - 1
    return tuple(zip(begins[first].tolist(), (ends[last] - begins[first]).tolist()))


def _run_tokens(runs: np.ndarray) -> np.ndarray:
    """[(begin, length)] -> the token indices they cover, ascending."""
    begins, lengths = runs[:, 0], runs[:, 1]
    # token i of the concatenation sits in run r at begin_r + (i - tokens before run r)
    return np.arange(int(lengths.sum()), dtype=np.int64) + np.repeat(begins - (np.cumsum(lengths) - lengths), lengths)


def max_pool(scores: np.ndarray, width: int) -> np.ndarray:
    """[rows, blocks] -> each block's max over the `width` blocks centred on it (odd width; the ends see
    fewer), as SnapKV pools its observation window's scores so that a kept token keeps its neighbours."""
    if width <= 1 or scores.shape[1] == 0:
        return scores
    half = width // 2
    padded = np.pad(scores, ((0, 0), (half, half)), constant_values=-np.inf)
    return np.lib.stride_tricks.sliding_window_view(padded, width, axis=1).max(axis=2)


def layer_budget_weights(layers: int, slope: float) -> np.ndarray:
    """Per-layer multipliers of the budget, mean 1 (the same total): 1 + slope at the first evicting
    layer falling linearly to 1 - slope at the last (slope > 0: more for lower layers, as PyramidKV)."""
    if layers <= 1:
        return np.ones(max(layers, 0))
    return 1.0 + slope * (1.0 - 2.0 * np.arange(layers) / (layers - 1))


def lossy_ratio(length: int, kept: int, runs: int, bytes_per_token: int) -> float:
    """SPEC §6 h2o_lossy: logical bytes over kept bytes plus 8 bytes of run metadata per run."""
    return length * bytes_per_token / (kept * bytes_per_token + 8 * runs)


@dataclass
class EvictionEvent:
    """What one eviction did; the runtime turns the last one into the h2o_* stats."""

    layer: int
    plan: KeepPlan
    plan_us: float


@dataclass
class LayerPolicy:
    """One evicting layer's state: its scorer and the per-layer trigger clock (SPEC §2-§3)."""

    layer: int
    params: PlanParams
    ema_alpha: float
    update_interval: int
    trigger_min_tokens: int
    policy: str = "h2o"
    seed: int = 0
    score_prefill: bool = False
    query_window: int = 32  # `expected`: how many recent queries the layer keeps (the runtime records them)
    query_horizon: int = 0  # `expected`: the next positions the queries are moved to (0: where they were asked)
    scorer: Scorer = field(init=False)
    steps_since_eviction: int = 0

    def __post_init__(self):
        if self.policy not in SCORERS:
            raise ValueError(f"unknown policy {self.policy!r}; allowed: {', '.join(SCORERS)}")
        self.reset()

    def reset(self) -> None:
        self.scorer = SCORERS[self.policy](alpha=self.ema_alpha, seed=self.seed, layer=self.layer)
        self.steps_since_eviction = 0

    @property
    def uses_attention(self) -> bool:
        return self.scorer.uses_attention

    @property
    def uses_queries(self) -> bool:
        return self.scorer.uses_queries

    @property
    def evictions(self) -> int:
        return self.scorer.evictions

    @property
    def scores(self) -> np.ndarray:
        """Current block scores, [rows, blocks]."""
        return self.scorer.state

    def _rows(self, head_block_mass: np.ndarray) -> np.ndarray:
        """[kv_heads, blocks] mass -> the scorer's rows: per head, or summed (SPEC §2's signal)."""
        mass = np.atleast_2d(np.asarray(head_block_mass, dtype=np.float64))
        return mass if self.params.per_head else mass.sum(axis=0, keepdims=True)

    def observe_blocks(self, head_block_mass: np.ndarray, decode_step: bool = True) -> None:
        """One step's attention mass per KV head and block (each head's share of the query-head
        average: rows sum to SPEC §2's signal). A prefill observation (decode_step=False, opt-in)
        sets the initial scores; it does not tick the clock."""
        rows = self._rows(head_block_mass)
        if rows.shape[1] < self.scorer.state.shape[1]:
            raise ValueError(f"layer {self.layer}: {rows.shape[1]} blocks observed but "
                             f"{self.scorer.state.shape[1]} scored")
        if not decode_step:
            self.scorer.seed_prompt(rows)
            return
        self.scorer.observe(rows)
        self.steps_since_eviction += 1

    def in_place_update(self, kv_heads: int, length: int) -> tuple[np.ndarray, float, float] | None:
        """For a decode step that folds its attention mass into the scores itself (the fast path's fused
        step), over a layer of `length` tokens: the scores' storage, ready for its blocks, and the rule
        (decay, gain); None when the scorer's step is not of that form (then `observe_blocks` it)."""
        rule = self.scorer.rule()
        if rule is None:
            return None
        rows = kv_heads if self.params.per_head else 1
        return self.scorer.storage(rows, num_blocks(length, self.params.block_tokens)), *rule

    def still_in_place(self, scores: np.ndarray, length: int) -> bool:
        """Does `scores` (from an earlier `in_place_update`) serve a step over `length` tokens as it is?"""
        return self.scorer.serves(scores, num_blocks(length, self.params.block_tokens))

    def observed_in_place(self, length: int) -> None:
        """The step `in_place_update` prepared for ran: the scores cover the layer's `length` tokens."""
        self.scorer.updated_in_place(num_blocks(length, self.params.block_tokens))
        self.steps_since_eviction += 1

    def tick(self) -> None:
        """A decode step of a scorer that needs no attention (streaming, random)."""
        self.steps_since_eviction += 1

    def observe(self, token_mass: np.ndarray) -> None:
        """Per-token mass [tokens] or [kv_heads, tokens], summed per block here (tests, tools)."""
        self.observe_blocks(block_sums(np.atleast_2d(np.asarray(token_mass, dtype=np.float64)),
                                       self.params.block_tokens))

    def due(self, length: int) -> bool:
        return length >= self.trigger_min_tokens and self.steps_since_eviction >= self.update_interval

    def maybe_plan(self, length: int, seen: int | None = None, value_norms: np.ndarray | None = None,
                   force: bool = False, keys: np.ndarray | None = None, queries: np.ndarray | None = None,
                   scale: float = 1.0) -> EvictionEvent | None:
        """After a decode step: the plan to apply now, or None. Call `applied` once it is applied.
        `value_norms` ([kv_heads, blocks], with `params.value_norm`) weigh the scores. `force` (chunked
        prefill) plans whenever the layer holds trigger_min_tokens, whatever the step clock says.
        A scorer that `uses_queries` needs `keys` [kv_heads, length, D], the recent `queries` [n, q_heads, D]
        and the attention's `scale`."""
        if not (self.due(length) or (force and length >= self.trigger_min_tokens)):
            return None
        started = time.perf_counter()
        if self.scorer.uses_queries:
            if keys is None or queries is None:
                raise ValueError(f"layer {self.layer}: policy {self.policy!r} plans from keys and queries")
            self.scorer.prepare(keys, queries, scale, self.params.block_tokens)
        scores = self.scorer.scores(num_blocks(length, self.params.block_tokens))
        if self.params.value_norm and value_norms is not None:
            norms = np.atleast_2d(np.asarray(value_norms, dtype=np.float64))
            # per-head scores are weighed by their own head's norms; one shared row by the summed ones
            scores = scores * (norms if scores.shape[0] == norms.shape[0] else self._rows(norms))
        if not self.params.per_head and scores.shape[0] > 1:
            scores = scores.sum(axis=0, keepdims=True)
        scores = max_pool(scores, self.params.score_pool)
        plan = build_plan(length, scores, self.params, seen)
        plan_us = (time.perf_counter() - started) * 1e6
        return None if plan is None else EvictionEvent(self.layer, plan, plan_us)

    def applied(self, plan: KeepPlan) -> None:
        """The layer was compacted: scores move with their blocks, the clock restarts."""
        self.scorer.keep(plan.kept_blocks)
        self.steps_since_eviction = 0
