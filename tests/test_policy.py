"""The pure H2O policy (SPEC §2-§3): plans, floors, quantisation, ties, re-mapping."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from h2okit.policy import (SCORERS, LayerPolicy, PlanParams, build_plan, expected_attention, floor_mask,
                           lossy_ratio, num_blocks, queries_ahead)

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
    assert plan.kept_blocks.tolist() == [[0, 5, 9, 14, 15, 16]]
    assert plan.runs == (((0, 32), (160, 32), (288, 32), (448, 80)),)
    assert lossy_ratio(kv, plan.kept_tokens, plan.run_count, 3 * 64 * 4 * 2) == pytest.approx(3.0, abs=0.01)


def test_floor_dominates_means_no_eviction():
    params = PlanParams(block_tokens=32, sink_tokens=64, recent_tokens=256, keep_ratio=0.3)
    assert build_plan(400, np.zeros(num_blocks(400, 32)), params) is None


def test_partial_last_block_is_kept_even_without_recent_floor():
    params = PlanParams(block_tokens=32, sink_tokens=0, recent_tokens=0, keep_ratio=0.25)
    kv = 100  # blocks 0-2 full, block 3 holds 4 tokens
    assert floor_mask(kv, params).tolist() == [False, False, False, True]
    plan = build_plan(kv, np.array([0.1, 0.9, 0.2, 0.0]), params)
    assert plan.kept_blocks.tolist() == [[1, 3]]
    assert plan.kept_tokens == 36 and plan.runs == (((32, 32), (96, 4)),)


def test_ties_prefer_the_lower_block_index():
    params = PlanParams(block_tokens=10, sink_tokens=0, recent_tokens=10, keep_ratio=0.3)
    plan = build_plan(100, np.ones(10), params)
    assert plan.kept_blocks.tolist() == [[0, 1, 9]]


def test_quantisation_rounds_the_target_up_to_whole_blocks():
    params = PlanParams(block_tokens=32, sink_tokens=32, recent_tokens=32, keep_ratio=0.5)
    plan = build_plan(320, np.arange(10, dtype=float), params)
    # floor 64, target 160 -> 64 + ceil(96/32)*32 = 160
    assert (plan.floor_tokens, plan.target_tokens, plan.quantized_tokens) == (64, 160, 160)
    assert plan.kept_blocks.tolist() == [[0, 6, 7, 8, 9]]


@pytest.mark.parametrize("name", sorted(SCORERS))
def test_every_policy_keeps_the_same_budget_and_the_floors(name):
    """Policies differ only in which blocks they choose: same floors, same count (seed example)."""
    pol = LayerPolicy(layer=4, params=SEED, ema_alpha=0.9, update_interval=16, trigger_min_tokens=384,
                      policy=name, seed=3)
    rng = np.random.default_rng(1)
    for step in range(16):
        pol.observe(rng.dirichlet(np.ones(513 + step)))
    inputs = {}
    if pol.uses_queries:  # keys [kv_heads, T, D], queries [n, q_heads, D]
        inputs = {"keys": rng.normal(size=(3, 528, 64)), "queries": rng.normal(size=(8, 9, 64)), "scale": 0.125}
    event = pol.maybe_plan(528, **inputs)
    assert event is not None and event.plan.kept_tokens == 176
    kept = event.plan.kept_blocks[0].tolist()
    assert kept[0] == 0 and kept[-3:] == [14, 15, 16]
    pol.applied(event.plan)
    if not pol.uses_queries:
        assert pol.scorer.scores(6).shape == (1, 6)


def test_streaming_extends_the_recent_window_and_random_is_seeded():
    def plan_of(name, seed=0):
        pol = LayerPolicy(layer=4, params=SEED, ema_alpha=0.9, update_interval=1, trigger_min_tokens=1,
                          policy=name, seed=seed)
        pol.tick()
        return pol.maybe_plan(528).plan.kept_blocks.tolist()

    assert plan_of("streaming") == [[0, 12, 13, 14, 15, 16]]
    assert plan_of("random", 1) == plan_of("random", 1) != plan_of("random", 2)
    assert not SCORERS["streaming"].uses_attention and not SCORERS["random"].uses_attention


def test_tova_scores_only_the_latest_step_and_mean_removes_the_age_bias():
    tova = SCORERS["tova"]()
    tova.observe(np.array([[5.0, 0.0]]))
    tova.observe(np.array([[0.0, 1.0, 2.0]]))
    assert tova.scores(3).tolist() == [[0.0, 1.0, 2.0]]
    mean = SCORERS["mean"]()
    mean.observe(np.array([[0.6, 0.4]]))
    mean.observe(np.array([[0.2, 0.2, 0.6]]))  # block 2 appears at the second step
    assert mean.scores(3)[0].tolist() == pytest.approx([0.4, 0.3, 0.6])  # per step visible, not summed
    mean.keep(np.array([[0, 2]]))
    assert mean.scores(2)[0].tolist() == pytest.approx([0.4, 0.6])
    window = SCORERS["window"]()
    window.observe(np.array([[0.5, 0.5]]))
    window.observe(np.array([[0.1, 0.9]]))
    assert window.scores(2)[0].tolist() == pytest.approx([0.6, 1.4])
    window.keep(np.array([[1]]))
    assert window.scores(1).tolist() == [[0.0]]  # a new window after each eviction


def test_budget_bases():
    current = PlanParams(1, 0, 0, 0.25)
    seen = PlanParams(1, 0, 0, 0.25, budget_basis="seen")
    fixed = PlanParams(1, 0, 0, 0.25, budget_basis="tokens", budget_tokens=30)
    assert current.budget_tokens_for(length=100, seen=400) == 25  # the seed: ratio x current length
    assert seen.budget_tokens_for(length=200, seen=400) == 100  # ratio x tokens seen
    assert fixed.budget_tokens_for(length=200, seen=400) == 30
    assert seen.budget_tokens_for(length=50, seen=400) == 50  # never more than the layer holds


def test_seen_basis_does_not_compound():
    """Under `current` each eviction keeps 1/3 of what is left, so the kept fraction of all tokens
    seen falls; under `seen` it stays at the ratio."""
    kept = {}
    for basis in ("current", "seen"):
        params = PlanParams(1, 4, 16, 1 / 3, budget_basis=basis)
        kv, seen = 528, 528
        for _ in range(10):
            plan = build_plan(kv, np.random.default_rng(kv).random(kv), params, seen=seen)
            held = kv if plan is None else plan.kept_tokens
            kv, seen = held + 16, seen + 16
        kept[basis] = held / (seen - 16)
    assert kept["seen"] == pytest.approx(1 / 3, abs=0.002)
    assert kept["current"] < 0.1


def test_floors_come_out_of_the_budget_under_seen_and_tokens():
    params = PlanParams(block_tokens=8, sink_tokens=16, recent_tokens=64, keep_ratio=0.1, budget_basis="tokens",
                        budget_tokens=40)
    plan = build_plan(400, np.zeros(50), params)
    assert plan.kept_tokens <= 40  # the floors (80 tokens) were cut to the budget
    kept = plan.kept_blocks[0].tolist()
    assert kept[-1] == 49 and kept[:2] == [0, 1]  # the write head, then the sink, then the newest recent
    assert kept == [0, 1, 47, 48, 49] and plan.kept_tokens == 40


def test_per_head_selection_keeps_the_same_count_per_head():
    params = PlanParams(block_tokens=4, sink_tokens=4, recent_tokens=4, keep_ratio=0.5, per_head=True)
    scores = np.array([[0.0, 9, 1, 2, 3, 0], [0.0, 1, 2, 3, 9, 0], [0.0, 3, 9, 1, 2, 0]])
    plan = build_plan(24, scores, params)
    assert plan.kept_blocks.tolist() == [[0, 1, 5], [0, 4, 5], [0, 2, 5]]  # each head's best block
    assert plan.per_head and plan.kept_tokens == 12 and plan.kept_token_indices().shape == (3, 12)
    assert plan.run_count == 2 + 2 + 3


def test_scores_ema_and_remap_after_compaction():
    pol = LayerPolicy(layer=3, params=PlanParams(4, 0, 4, 0.5), ema_alpha=0.5, update_interval=2,
                      trigger_min_tokens=8)
    pol.observe(np.array([1.0, 0, 0, 0, 0, 0, 0, 1.0]))  # blocks: [1, 1]
    assert pol.scores.tolist() == [[0.5, 0.5]]
    pol.observe(np.array([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4.0]))  # third block starts at 0
    assert pol.scores.tolist() == [[0.25, 0.25, 2.0]]
    assert pol.maybe_plan(7) is None  # interval reached, but below trigger_min_tokens
    pol.scorer.state = np.array([[0.1, 0.9, 0.3, 0.5]])
    event = pol.maybe_plan(16)
    assert event.plan.kept_blocks.tolist() == [[1, 3]]
    pol.applied(event.plan)
    assert pol.scores.tolist() == [[0.9, 0.5]] and pol.steps_since_eviction == 0


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
       recent=st.integers(0, 600), ratio=st.floats(0, 1), seed=st.integers(0, 2**16),
       basis=st.sampled_from(["current", "seen", "tokens"]), extra_seen=st.integers(0, 3000),
       heads=st.sampled_from([1, 3]))
def test_plan_invariants(kv, block, sink, recent, ratio, seed, basis, extra_seen, heads):
    params = PlanParams(block, sink, recent, ratio, budget_basis=basis, budget_tokens=max(1, int(ratio * 1000)),
                        per_head=heads > 1)
    scores = np.random.default_rng(seed).random((heads, num_blocks(kv, block)))
    seen = kv + extra_seen
    plan = build_plan(kv, scores, params, seen=seen)
    protected = floor_mask(kv, params)
    if basis != "current":
        protected[-1] = True  # the write head is a floor under the new bases
    if plan is None:
        return
    budget = params.budget_tokens_for(kv, seen)
    if basis == "current":
        assert plan.floor_tokens < plan.target_tokens <= plan.quantized_tokens <= plan.kept_tokens < kv
        assert plan.kept_tokens - plan.quantized_tokens < block  # at most one block over
    else:  # the budget is what it says: within half a block, floors included (but the write head stays)
        assert plan.kept_tokens <= max(budget + block // 2, kv % block or block) and plan.kept_tokens < kv
        assert plan.kept_tokens > budget - block or plan.kept_tokens == plan.floor_tokens + \
            block * int((~protected).sum())
    assert plan.kept_blocks.shape[0] == heads
    for row, runs, row_scores in zip(plan.kept_blocks, plan.runs, scores):
        kept = np.zeros(len(protected), dtype=bool)
        kept[row] = True
        if basis == "current" or plan.floor_tokens == int(block_sizes_of(kv, block)[protected].sum()):
            assert kept[protected].all()  # floors survive unless they had to be cut to the budget
        if recent > 0 or kv % block:
            assert kept[-1]  # the write head (newest token) survives
        begins = [b for b, _ in runs]
        assert begins == sorted(begins)
        assert all(b1 + n1 < b2 for (b1, n1), (b2, _) in zip(runs, runs[1:]))  # merged, disjoint
        assert sum(n for _, n in runs) == plan.kept_tokens
        if plan.floor_tokens < int(block_sizes_of(kv, block)[protected].sum()):
            continue  # floors cut to the budget: the rest of the layer is evicted regardless of scores
        # the chosen candidate blocks are the best-scoring ones of this row
        candidates = ~protected
        candidates[-1] = candidates[-1] and basis == "current"
        chosen, rest = row_scores[kept & candidates], row_scores[~kept & candidates]
        if len(chosen) and len(rest):
            assert chosen.min() >= rest.max()
    idx = plan.kept_token_indices()
    assert idx.shape == (heads, plan.kept_tokens) and np.all(np.diff(idx, axis=1) > 0)
    sizes = block_sizes_of(kv, block)
    for row, tokens in zip(plan.kept_blocks, idx):  # exactly the kept blocks' tokens
        assert np.array_equal(tokens, np.concatenate([np.arange(k * block, k * block + sizes[k]) for k in row]))


def block_sizes_of(kv, block):
    from h2okit.policy import block_sizes

    return block_sizes(kv, block)


def test_prefill_observation_seeds_scores_without_ticking_the_clock():
    pol = LayerPolicy(layer=0, params=PlanParams(4, 0, 4, 0.5), ema_alpha=0.9, update_interval=1,
                      trigger_min_tokens=1)
    pol.observe_blocks(np.array([[0.4, 0.6]]), decode_step=False)
    assert pol.scores[0].tolist() == pytest.approx([0.4, 0.6]) and pol.steps_since_eviction == 0
    assert pol.maybe_plan(8) is None  # the clock has not ticked: no decode step yet
    pol.observe(np.zeros(9))
    assert pol.scores[0].tolist() == pytest.approx([0.36, 0.54, 0.0]) and pol.steps_since_eviction == 1


def test_score_pooling_takes_each_blocks_neighbourhood_max():
    from h2okit.policy import max_pool

    scores = np.array([[0.0, 5.0, 0.0, 0.0, 1.0, 0.0, 0.0]])
    assert max_pool(scores, 1) is scores
    np.testing.assert_array_equal(max_pool(scores, 3), [[5, 5, 5, 1, 1, 1, 0]])
    np.testing.assert_array_equal(max_pool(scores, 5), [[5, 5, 5, 5, 1, 1, 1]])
    with pytest.raises(ValueError, match="odd"):
        PlanParams(block_tokens=1, sink_tokens=0, recent_tokens=0, keep_ratio=0.5, score_pool=2)


def test_pooled_scores_keep_a_heavy_hitters_neighbours():
    params = PlanParams(block_tokens=1, sink_tokens=0, recent_tokens=1, keep_ratio=0.4, budget_basis="tokens",
                        budget_tokens=4, score_pool=3)
    pol = LayerPolicy(layer=0, params=params, ema_alpha=0.0, update_interval=1, trigger_min_tokens=1)
    pol.observe(np.array([0.0, 0.1, 0.0, 0.9, 0.0, 0.2, 0.15, 0.0, 0.0, 0.0]))
    kept = pol.maybe_plan(10).plan.kept_blocks[0].tolist()
    assert kept == [2, 3, 4, 9]  # 3 and both neighbours, and the write head (unpooled: 3, 5, 6, 9)


def _reference_expected_attention(keys, queries, scale):
    """The formula written out: explicit covariance per query head, float64, then summed per KV head."""
    kv_heads, tokens, _ = keys.shape
    group = queries.shape[1] // kv_heads
    q = queries.astype(np.float64)
    mean, centred = q.mean(0), q - q.mean(0)
    cov = np.einsum("nhd,nhe->hde", centred, centred) / (len(q) - 1)
    k = np.repeat(keys.astype(np.float64), group, axis=0)
    logits = scale * np.einsum("htd,hd->ht", k, mean) + 0.5 * scale**2 * np.einsum("htd,hde,hte->ht", k, cov, k)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    return p.reshape(kv_heads, group, tokens).sum(1) / queries.shape[1]


def test_expected_attention_is_the_gaussian_expectation_of_the_attention_logits():
    """The closed form (low-rank, float32 products) equals the formula with the covariance written out,
    and it is what sampling queries from the fitted Gaussian gives (Monte Carlo, 20k draws)."""
    rng = np.random.default_rng(0)
    kv_heads, q_heads, dim, tokens = 3, 9, 32, 40
    keys = rng.normal(size=(kv_heads, tokens, dim)).astype(np.float32)
    mixing = rng.normal(size=(q_heads, dim, dim)) * 0.15
    queries = (rng.normal(size=(q_heads, dim)) * 0.5
               + np.einsum("hde,nhe->nhd", mixing, rng.normal(size=(24, q_heads, dim)))).astype(np.float32)
    scale = dim ** -0.5
    got = expected_attention(keys, queries, scale)
    want = _reference_expected_attention(keys, queries, scale)
    assert got.shape == (kv_heads, tokens)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(got.sum(), 1.0, rtol=1e-9)  # a distribution over keys, shared out by heads
    q = queries.astype(np.float64)
    cov = np.cov(q.reshape(len(q), -1).T).reshape(q_heads, dim, q_heads, dim)
    chol = np.stack([np.linalg.cholesky(cov[h, :, h] + 1e-9 * np.eye(dim)) for h in range(q_heads)])
    draws = q.mean(0) + np.einsum("hde,nhe->nhd", chol, rng.normal(size=(20000, q_heads, dim)))
    k = np.repeat(keys.astype(np.float64), q_heads // kv_heads, axis=0)
    sampled = np.exp(scale * np.einsum("nhd,htd->nht", draws, k)).mean(0)
    sampled = (sampled / sampled.sum(1, keepdims=True)).reshape(kv_heads, -1, tokens).sum(1) / q_heads
    assert np.abs(sampled - want).max() < 0.05 * want.max()


def test_expected_attention_of_one_query_is_its_attention():
    rng = np.random.default_rng(1)
    keys = rng.normal(size=(2, 30, 16))
    query = rng.normal(size=(1, 4, 16))
    got = expected_attention(keys, query, 0.25)
    logits = 0.25 * np.einsum("htd,hd->ht", np.repeat(keys, 2, axis=0), query[0])
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    np.testing.assert_allclose(got, p.reshape(2, 2, 30).sum(1) / 4, rtol=1e-6)


def _rope(positions, dim, base=10000.0, factor=1.0):
    """RoPE tables as transformers builds them (rotate-half pairing), times an attention factor."""
    inv_freq = base ** (-np.arange(0, dim, 2) / dim)
    angles = np.outer(positions, inv_freq)
    angles = np.concatenate([angles, angles], axis=-1)
    return factor * np.cos(angles), factor * np.sin(angles)


def _rotate(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + np.concatenate([-x[..., half:], x[..., :half]], axis=-1) * sin


@pytest.mark.parametrize("factor", [1.0, 1.3])
def test_queries_ahead_turns_each_query_to_the_next_position(factor):
    """A query asked at position p, moved ahead with the tables of one position p', is the same pre-RoPE
    query asked at p' (RoPE's attention factor carried once, as in the model)."""
    rng = np.random.default_rng(2)
    n, heads, dim = 5, 3, 16
    raw = rng.normal(size=(n, heads, dim))
    own = np.array([3, 17, 40, 41, 900])
    cos, sin = _rope(own, dim, factor=factor)
    asked = _rotate(raw, cos[:, None], sin[:, None])
    ahead_cos, ahead_sin = _rope([1234], dim, factor=factor)
    got = queries_ahead(asked, cos, sin, ahead_cos[0], ahead_sin[0])
    want = _rotate(raw, ahead_cos[0], ahead_sin[0])
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_queries_ahead_averages_the_rotation_over_the_horizon():
    """Over F positions the moved query is the mean of the query asked at each of them: the fast-turning
    dimensions shrink towards 0, the slow ones hardly change."""
    rng = np.random.default_rng(3)
    dim = 32
    raw = rng.normal(size=(1, 2, dim))
    cos, sin = _rope([100], dim)
    asked = _rotate(raw, cos[:, None], sin[:, None])
    future = np.arange(101, 101 + 64)
    fcos, fsin = _rope(future, dim)
    got = queries_ahead(asked, cos, sin, fcos.mean(0), fsin.mean(0))
    want = np.mean([_rotate(raw, fcos[i], fsin[i]) for i in range(len(future))], axis=0)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    fast, slow = [0, dim // 2], [dim // 2 - 1, dim - 1]  # the first and last frequency's pairs
    assert np.linalg.norm(got[..., fast]) < 0.1 * np.linalg.norm(raw[..., fast])
    assert np.linalg.norm(got[..., slow]) > 0.99 * np.linalg.norm(raw[..., slow])


def test_expected_scorer_keeps_the_keys_the_queries_point_at_and_weighs_heads_by_their_own_norms():
    """Two KV heads; the queries point at key 3 in head 0 and key 5 in head 1, so a 2-block budget beyond
    the floors keeps those; with value norms each head's scores are weighed by its own head's norms."""
    params = PlanParams(block_tokens=1, sink_tokens=1, recent_tokens=1, keep_ratio=0.5, budget_basis="tokens",
                        budget_tokens=4, value_norm=True)
    pol = LayerPolicy(layer=0, params=params, ema_alpha=0.9, update_interval=1, trigger_min_tokens=1,
                      policy="expected")
    keys = np.zeros((2, 10, 4))
    keys[0, 3, 0] = keys[1, 5, 1] = 4.0
    keys[0, 7, 2] = 4.0  # a key no query points at
    queries = np.zeros((6, 2, 4))
    queries[:, 0, 0] = queries[:, 1, 1] = 3.0
    queries[::2, :, 3] = 0.1  # a little spread (a covariance)
    pol.tick()
    norms = np.ones((2, 10))
    event = pol.maybe_plan(10, keys=keys, queries=queries, scale=1.0, value_norms=norms)
    assert event.plan.kept_blocks.tolist() == [[0, 3, 5, 9]]
    pol.applied(event.plan)
    norms[0, 3] = 0.0  # head 0's heavy key has no value: only head 1's choice is left for it
    pol.tick()
    event = pol.maybe_plan(10, keys=keys, queries=queries, scale=1.0, value_norms=norms)
    assert 5 in event.plan.kept_blocks[0] and 3 not in event.plan.kept_blocks[0]
    with pytest.raises(ValueError, match="keys and queries"):
        pol.tick()
        pol.maybe_plan(10)


@pytest.mark.parametrize("kept", [[[0, 2, 5]], [[0, 2, 5], [1, 3, 9], [4, 6, 8]]])
@pytest.mark.parametrize("name", sorted(name for name, scorer in SCORERS.items() if scorer().rule()))
def test_an_eviction_compacts_the_scores_in_their_own_storage(name, kept):
    """After `keep` the kept blocks' scores lead the same backing array, zeros after them: a fused step that
    holds a pointer to it (Scorer.serves) may go on updating it in place, with no new slot."""
    scorer = SCORERS[name]()
    rng = np.random.default_rng(7)
    store = scorer.storage(3, 10)
    store[:, :10] = rng.random((3, 10))
    scorer.updated_in_place(10)
    before = scorer.state.copy()
    blocks = np.array(kept)
    scorer.keep(blocks)
    rows = np.broadcast_to(blocks, (3, 3))
    expected = np.zeros((3, 3)) if name == "window" else np.take_along_axis(before, rows, axis=1)
    assert scorer.serves(store, 4) and scorer.state.shape == (3, 3)
    assert np.array_equal(scorer.state, expected) and not store[:, 3:].any()
