"""The pure H2O policy (SPEC §2-§3): plans, floors, quantisation, ties, re-mapping."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from h2okit.policy import LayerPolicy, PlanParams, build_plan, floor_mask, lossy_ratio, num_blocks

SEED = PlanParams(block_tokens=32, sink_tokens=16, recent_tokens=64, keep_ratio=1 / 3.0)


def test_worked_example_of_spec_section_3():
    kv = 528
    scores = np.zeros(num_blocks(kv, 32))
    scores[[5, 9]] = [0.5, 0.7]  # the two middle blocks the plan must choose
    plan = build_plan(kv, scores, SEED)
    assert num_blocks(kv, 32) == 17
    assert plan.floor_tokens == 112 and round(plan.floor_tokens / kv, 4) == 0.2121
    assert plan.target_tokens == 176 and round(plan.target_tokens / kv, 4) == 0.3333
    assert plan.quantized_tokens == 176
    assert plan.kept_tokens == 176 and round(plan.kept_tokens / kv, 4) == 0.3333
    assert plan.kept_blocks.tolist() == [0, 5, 9, 14, 15, 16]
    assert plan.runs == ((0, 32), (160, 32), (288, 32), (448, 80))
    assert lossy_ratio(kv, plan.kept_tokens, len(plan.runs), 3 * 64 * 4 * 2) == pytest.approx(3.0, abs=0.01)


def test_floor_dominates_means_no_eviction():
    params = PlanParams(block_tokens=32, sink_tokens=64, recent_tokens=256, keep_ratio=0.3)
    assert build_plan(400, np.zeros(num_blocks(400, 32)), params) is None


def test_partial_last_block_is_kept_even_without_recent_floor():
    params = PlanParams(block_tokens=32, sink_tokens=0, recent_tokens=0, keep_ratio=0.25)
    kv = 100  # blocks 0-2 full, block 3 holds 4 tokens
    assert floor_mask(kv, params).tolist() == [False, False, False, True]
    plan = build_plan(kv, np.array([0.1, 0.9, 0.2, 0.0]), params)
    assert plan.kept_blocks.tolist() == [1, 3]
    assert plan.kept_tokens == 36 and plan.runs == ((32, 32), (96, 4))


def test_ties_prefer_the_lower_block_index():
    params = PlanParams(block_tokens=10, sink_tokens=0, recent_tokens=10, keep_ratio=0.3)
    plan = build_plan(100, np.ones(10), params)
    assert plan.kept_blocks.tolist() == [0, 1, 9]


def test_quantisation_rounds_the_target_up_to_whole_blocks():
    params = PlanParams(block_tokens=32, sink_tokens=32, recent_tokens=32, keep_ratio=0.5)
    plan = build_plan(320, np.arange(10, dtype=float), params)
    # floor 64, target 160 -> 64 + ceil(96/32)*32 = 160
    assert (plan.floor_tokens, plan.target_tokens, plan.quantized_tokens) == (64, 160, 160)
    assert plan.kept_blocks.tolist() == [0, 6, 7, 8, 9]


def test_streaming_and_random_policies_use_the_same_budget():
    kv, scores = 528, np.random.default_rng(1).random(17)
    plans = {pol: build_plan(kv, scores, PlanParams(32, 16, 64, 1 / 3, policy=pol),
                             rng=np.random.default_rng(0)) for pol in ("h2o", "streaming", "random")}
    assert {p.kept_tokens for p in plans.values()} == {176}
    assert plans["streaming"].kept_blocks.tolist() == [0, 12, 13, 14, 15, 16]
    assert build_plan(kv, scores, PlanParams(32, 16, 64, 1 / 3, policy="full")) is None


def test_scores_ema_and_remap_after_compaction():
    pol = LayerPolicy(layer=3, params=PlanParams(4, 0, 4, 0.5), ema_alpha=0.5, update_interval=2,
                      trigger_min_tokens=8)
    pol.observe(np.array([1.0, 0, 0, 0, 0, 0, 0, 1.0]))  # blocks: [1, 1]
    assert pol.scores.tolist() == [0.5, 0.5]
    pol.observe(np.array([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4.0]))  # third block starts at 0
    assert pol.scores.tolist() == [0.25, 0.25, 2.0]
    assert pol.maybe_plan(7) is None  # interval reached, but below trigger_min_tokens
    pol.scores = np.array([0.1, 0.9, 0.3, 0.5])
    event = pol.maybe_plan(16)
    assert event.plan.kept_blocks.tolist() == [1, 3]
    pol.applied(event.plan)
    assert pol.scores.tolist() == [0.9, 0.5] and pol.steps_since_eviction == 0


def test_trigger_needs_both_length_and_interval():
    pol = LayerPolicy(layer=0, params=SEED, ema_alpha=0.9, update_interval=16, trigger_min_tokens=384)
    for step in range(1, 17):
        pol.observe(np.full(512 + step, 1 / (512 + step)))
        if step < 16:
            assert pol.maybe_plan(512 + step) is None
    assert pol.maybe_plan(528).plan.kept_tokens == 176
    short = LayerPolicy(layer=0, params=SEED, ema_alpha=0.9, update_interval=1, trigger_min_tokens=384)
    short.observe(np.full(300, 1 / 300))
    assert short.maybe_plan(300) is None


@settings(max_examples=300, deadline=None)
@given(kv=st.integers(1, 3000), block=st.integers(1, 128), sink=st.integers(0, 300),
       recent=st.integers(0, 600), ratio=st.floats(0, 1), seed=st.integers(0, 2**16))
def test_plan_invariants(kv, block, sink, recent, ratio, seed):
    params = PlanParams(block, sink, recent, ratio)
    scores = np.random.default_rng(seed).random(num_blocks(kv, block))
    plan = build_plan(kv, scores, params)
    protected = floor_mask(kv, params)
    if plan is None:
        return
    kept = np.zeros(len(protected), dtype=bool)
    kept[plan.kept_blocks] = True
    assert kept[protected].all()  # floors always survive
    assert plan.floor_tokens < plan.target_tokens <= plan.quantized_tokens <= plan.kept_tokens < kv
    assert plan.kept_tokens - plan.quantized_tokens < block  # at most one block over
    idx = plan.kept_token_indices()
    assert len(idx) == plan.kept_tokens and np.all(np.diff(idx) > 0)
    if recent > 0 or kv % block:
        assert idx[-1] == kv - 1  # the newest token is protected by the recent floor
    begins = [b for b, _ in plan.runs]
    assert begins == sorted(begins)
    assert all(b1 + n1 < b2 for (b1, n1), (b2, _) in zip(plan.runs, plan.runs[1:]))  # merged, disjoint
    # the chosen unprotected blocks are the best-scoring ones
    chosen, rest = scores[kept & ~protected], scores[~kept & ~protected]
    if len(chosen) and len(rest):
        assert chosen.min() >= rest.max()


def test_prefill_observation_seeds_scores_without_ticking_the_clock():
    pol = LayerPolicy(layer=0, params=PlanParams(4, 0, 4, 0.5), ema_alpha=0.9, update_interval=1,
                      trigger_min_tokens=1)
    pol.observe(np.array([0.4, 0.0, 0.0, 0.0, 0.1, 0.1, 0.2, 0.2]), decode_step=False)
    assert pol.scores.tolist() == pytest.approx([0.4, 0.6]) and pol.steps_since_eviction == 0
    assert pol.maybe_plan(8) is None  # the clock has not ticked: no decode step yet
    pol.observe(np.zeros(9))
    assert pol.scores.tolist() == pytest.approx([0.36, 0.54, 0.0]) and pol.steps_since_eviction == 1
