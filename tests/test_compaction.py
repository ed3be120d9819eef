"""Torch-side correctness without the model: the scoring attention and compaction (SPEC §4)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from h2okit.attention import attention_with_mass, _causal_mask
from h2okit.cache import H2OLayer, gather_tokens
from h2okit.policy import PlanParams, build_plan, num_blocks

torch.manual_seed(0)


def _qkv(t=300, hq=9, hkv=3, d=64):
    return torch.randn(1, hq, 1, d), torch.randn(1, hkv, t, d), torch.randn(1, hkv, t, d)


def test_attention_with_mass_matches_eager_attention_with_repeat_kv():
    q, k, v = _qkv()
    out, mass = attention_with_mass(q, k, v, 0.125)
    kr, vr = k.repeat_interleave(3, dim=1), v.repeat_interleave(3, dim=1)
    probs = torch.softmax(q @ kr.transpose(-1, -2) * 0.125, dim=-1)
    torch.testing.assert_close(out, probs @ vr, rtol=1e-5, atol=1e-6)
    assert mass.shape == (3, 300)  # per KV head: the group's query heads
    torch.testing.assert_close(mass, probs[0, :, 0].view(3, 3, -1).sum(1) / 9)
    torch.testing.assert_close(mass.sum(0), probs.sum(dim=(0, 1, 2)) / 9)
    assert abs(float(mass.sum()) - 1.0) < 1e-5  # a probability distribution over cached tokens


def test_attention_over_the_compacted_cache_equals_attention_over_the_kept_tokens():
    q, k, v = _qkv(t=528)
    scores = np.random.default_rng(3).random(num_blocks(528, 32))
    plan = build_plan(528, scores, PlanParams(32, 16, 64, 1 / 3))
    layer = H2OLayer(5, policy=None, store_dtype=torch.float32)
    layer.update(k, v)
    keep = torch.zeros(528, dtype=torch.bool)
    keep[torch.from_numpy(plan.kept_token_indices())] = True
    # before compaction: attend to the full cache with the evicted tokens masked out
    masked = F.scaled_dot_product_attention(q, k, v, attn_mask=keep.view(1, 1, 1, -1), scale=0.125,
                                            enable_gqa=True)
    layer.compact(plan)
    assert layer.get_seq_length() == plan.kept_tokens == 176
    assert layer.keys.shape == (1, 3, 176, 64) and layer.values.shape == (1, 3, 176, 64)
    compacted, _ = attention_with_mass(q, layer.keys, layer.values, 0.125)
    torch.testing.assert_close(compacted, masked, rtol=1e-5, atol=1e-6)
    # V is moved with K, token for token (the original scrambled V's layout)
    torch.testing.assert_close(layer.values[0, :, 40], v[0, :, plan.kept_token_indices()[0, 40]])


def test_chunk_mask_is_causal_with_an_offset():
    mask = _causal_mask(3, 5, "cpu")
    assert mask.tolist() == [[True, True, True, False, False], [True, True, True, True, False],
                             [True] * 5]


def test_chunked_causal_attention_with_mass_matches_sdpa_and_eager():
    from h2okit.attention import causal_attention_with_mass

    q, k, v = torch.randn(1, 9, 70, 16), torch.randn(1, 3, 70, 16), torch.randn(1, 3, 70, 16)
    out, mass = causal_attention_with_mass(q, k, v, 0.25, rows_per_chunk=32)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.25, enable_gqa=True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    kr = k.repeat_interleave(3, dim=1)
    logits = (q @ kr.transpose(-1, -2) * 0.25).masked_fill(~torch.ones(70, 70, dtype=torch.bool).tril(), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    torch.testing.assert_close(mass.sum(0), probs.sum(dim=(0, 1, 2)) / (9 * 70))


def test_kv_buffer_appends_in_place_grows_and_compacts():
    from h2okit.cache import KVBuffer

    k0, v0 = torch.randn(1, 3, 5, 4), torch.randn(1, 3, 5, 4)
    buf = KVBuffer(k0, v0, torch.float16)
    buf.append(k0, v0)
    first_storage = buf.k.data_ptr()
    for _ in range(10):  # decode steps write in place: no reallocation while there is room
        buf.append(torch.randn(1, 3, 1, 4), torch.randn(1, 3, 1, 4))
    assert buf.k.data_ptr() == first_storage and buf.length == 15 and buf.k.dtype == torch.float16
    keys, values = buf.views()
    torch.testing.assert_close(keys[:, :, :5], k0.half())
    before_k, before_v = keys.clone(), values.clone()
    index = torch.tensor([0, 2, 3, 9, 14])
    buf.keep(index[None])
    keys, values = buf.views()
    assert buf.length == 5 and buf.k.data_ptr() == first_storage
    torch.testing.assert_close(keys, before_k[:, :, index])
    torch.testing.assert_close(values, before_v[:, :, index])
    big = torch.randn(1, 3, 600, 4)
    buf.append(big, big)  # beyond capacity: grows, keeps what it held
    assert buf.length == 605 and buf.capacity >= 605
    torch.testing.assert_close(buf.views()[0][:, :, :5], before_k[:, :, index])


def test_per_head_compaction_keeps_each_heads_own_tokens():
    """Per-head plans: head g keeps its own tokens, in order, K and V alike; lengths stay equal."""
    q, k, v = _qkv(t=200)
    rng = np.random.default_rng(5)
    scores = rng.random((3, num_blocks(200, 8)))
    plan = build_plan(200, scores, PlanParams(8, 8, 16, 0.4, budget_basis="seen", per_head=True), seen=200)
    index = plan.kept_token_indices()
    assert index.shape == (3, plan.kept_tokens) == (3, 80)
    assert not (index[0] == index[1]).all()  # the heads chose differently
    layer = H2OLayer(5, policy=None, store_dtype=torch.float32)
    layer.update(k, v)
    layer.compact(plan)
    for g in range(3):
        torch.testing.assert_close(layer.keys[0, g], k[0, g, index[g]])
        torch.testing.assert_close(layer.values[0, g], v[0, g, index[g]])
    # attention over the compacted cache equals attention over each head's kept tokens
    masked = torch.zeros(1, 3, 1, 200, dtype=torch.bool)
    for g in range(3):
        masked[0, g, 0, index[g]] = True
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=masked.repeat_interleave(3, dim=1), scale=0.125,
                                              enable_gqa=True)
    got, _ = attention_with_mass(q, layer.keys, layer.values, 0.125)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_window_mask_sees_the_window_ending_at_each_row():
    """Row r (absolute position past + r) sees slots (pos - window, pos], as transformers' sliding mask."""
    mask = _causal_mask(3, 6, "cpu", window=2)
    assert mask.tolist() == [[False, False, True, True, False, False], [False, False, False, True, True, False],
                             [False, False, False, False, True, True]]
    brute = [[c <= r + 14 and c > r + 14 - 5 for c in range(20)] for r in range(6)]
    assert _causal_mask(6, 20, "cpu", window=5).tolist() == brute


def test_sliding_window_layer_drops_only_what_left_the_window():
    from h2okit.cache import SlidingWindowLayer

    layer = SlidingWindowLayer(0, window=8, store_dtype=torch.float32)
    k, v = torch.randn(1, 2, 20, 4), torch.randn(1, 2, 20, 4)
    layer.update(k, v)  # a prefill of 20: attention needs all of them, so nothing is dropped yet
    assert layer.get_seq_length() == 20 and layer.policy is None and layer.is_sliding
    layer.drop_outside_window()  # after the prefill attended: the last window - 1 stay
    torch.testing.assert_close(layer.keys, k[:, :, -7:])
    torch.testing.assert_close(layer.values, v[:, :, -7:])
    seen = [k[:, :, -7:]]
    for _ in range(40):  # decode: at most window - 1 + TRIM_SLACK between steps, the window always visible
        new_k = torch.randn(1, 2, 1, 4)
        seen.append(new_k)
        keys, values = layer.update(new_k, new_k)
        window_k, _ = layer.visible(keys, values)
        torch.testing.assert_close(window_k, torch.cat(seen, dim=2)[:, :, -8:])
        assert layer.get_seq_length() <= 7 + layer.TRIM_SLACK + 1 and layer.attended_tokens() == 8
    assert layer.tokens_seen == 60
    assert layer.logical_bytes == 8 * layer.bytes_per_token  # a full cache of this layer holds its window


def test_sliding_windows_of_a_config():
    from types import SimpleNamespace

    from h2okit.model import sliding_windows_of

    gemma = SimpleNamespace(num_hidden_layers=3, sliding_window=512,
                            layer_types=["sliding_attention", "sliding_attention", "full_attention"])
    assert sliding_windows_of(gemma) == [512, 512, None]
    assert sliding_windows_of(SimpleNamespace(num_hidden_layers=2)) == [None, None]  # Llama
    assert sliding_windows_of(SimpleNamespace(num_hidden_layers=2, sliding_window=4096)) == [4096, 4096]  # Mistral
    qwen = SimpleNamespace(num_hidden_layers=2, sliding_window=4096, layer_types=["full_attention"] * 2)
    assert sliding_windows_of(qwen) == [None, None]


def test_sliding_layers_are_outside_the_h2o_and_codec_scopes():
    from h2okit.cache import H2OCache, SlidingWindowLayer
    from h2okit.config import parse_config

    kv = parse_config({"kv_h2o_enable": True, "kv_h2o_layer_start": 0, "kv_lossless_enable": True,
                       "kv_lossless_codec": "gear_delta", "kv_lossless_scope": "front_n",
                       "kv_lossless_front_n": 2}).kv
    cache = H2OCache(4, kv, [8, None, 8, None])
    assert cache.h2o_layer_ids == [1, 3] and cache.lossless_layer_ids == {1}
    assert [type(layer) is SlidingWindowLayer for layer in cache.layers] == [True, False, True, False]
    assert cache.layers[1].policy is not None and cache.layers[1].codec is not None


def _tables(positions, dim=8, base=10000.0):
    angles = np.outer(positions, base ** (-np.arange(0, dim, 2) / dim))
    angles = np.concatenate([angles, angles], axis=-1)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def test_query_ring_knows_each_query_position_and_moves_them_ahead_for_the_plan():
    """The ring's rows keep the last `query_window` queries, whichever way they were recorded (prompt
    rows, then the fused step's slots); each row's position is its recording's index, and the plan's
    queries are those rows moved to the next `query_horizon` positions with the model's tables."""
    from h2okit.cache import H2OCache
    from h2okit.config import parse_config
    from h2okit.policy import queries_ahead

    kv = parse_config({"kv_h2o_enable": True, "kv_h2o_layer_start": 0, "kv_h2o_policy": "expected",
                       "kv_h2o_query_window": 4, "kv_h2o_query_horizon": 6}).kv
    asked = []
    cache = H2OCache(2, kv, rope=lambda layer, positions: (asked.append((layer, list(positions))),
                                                           _tables(positions))[1])
    layer = cache.layers[1]
    rows = torch.arange(7, dtype=torch.float32)[None, :, None].expand(2, 7, 8)  # row value = its position
    layer.record_queries(rows, scale=0.25)
    for position in (7, 8):
        layer.query_slot(2, 8, 0.25)[:] = position
    got = layer.recent_queries()
    positions = layer.recent_query_positions()
    assert sorted(positions.tolist()) == [5, 6, 7, 8]
    assert (got[:, 0, 0] == positions).all()  # every row sits where its position says
    own, ahead = _tables(positions), _tables(np.arange(9, 15))
    np.testing.assert_allclose(layer.queries_for_plan(),
                               queries_ahead(got, *own, ahead[0].mean(0), ahead[1].mean(0)), rtol=1e-6)
    assert asked == [(1, positions.tolist()), (1, list(range(9, 15)))]
    with pytest.raises(ValueError, match="RoPE tables"):
        H2OCache(2, kv)
    off = parse_config({"kv_h2o_enable": True, "kv_h2o_layer_start": 0, "kv_h2o_policy": "expected",
                        "kv_h2o_query_horizon": 0}).kv
    plain = H2OCache(2, off).layers[0]
    plain.record_queries(rows, scale=0.25)
    assert np.array_equal(plain.queries_for_plan(), plain.recent_queries())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads, kept", [(1, 5), (3, 17), (4, 1)])
def test_gather_tokens_takes_each_heads_own_rows(dtype, heads, kept):
    """Per-head compaction's gather (one row copy per head) against torch.gather's element-wise reference;
    a shared [1, n] index takes the same rows for every head."""
    rng = np.random.default_rng(heads * 100 + kept)
    x = torch.randn(1, heads, 40, 8).to(dtype)
    index = torch.from_numpy(np.stack([np.sort(rng.choice(40, kept, replace=False)) for _ in range(heads)]))
    expected = torch.gather(x, 2, index[None, :, :, None].expand(1, -1, -1, 8))
    assert torch.equal(gather_tokens(x, index), expected)
    shared = index[:1]
    assert torch.equal(gather_tokens(x, shared), x[:, :, shared[0]])


def test_fused_steps_count_every_layers_token_at_once_and_the_peak_follows():
    """A fused decode step writes one token into every layer before any Python runs: the cache adds
    them in one update (H2OCache.after_fused_step), the layers' own reports (a sliding layer trimming
    its window, a reset) are changes against what the cache counted. The peak is the largest total
    the layers held at any moment."""
    from h2okit.cache import H2OCache
    from h2okit.config import parse_config

    cache = H2OCache(3, parse_config({}).kv, [4, None, None])
    for _ in range(2):  # and again after a reset
        peak = 0
        for layer in cache.layers:  # a 10-token prompt, layer by layer as the forward does it
            layer.update(torch.randn(1, 3, 10, 8), torch.randn(1, 3, 10, 8))
            peak = max(peak, cache.physical_bytes)
        for step in range(24):  # the window layer trims at step 10 (from 20 tokens to 3, then its new one)
            for layer in cache.layers:
                assert layer.decode_layout() is not None  # room for the token; the window trims first
            cache.after_fused_step([False] * 3)
            peak = max(peak, cache.physical_bytes)
            assert cache.peak_bytes == peak
            window, full, other = (layer.get_seq_length() for layer in cache.layers)
            assert full == other == 11 + step
            assert window <= cache.layers[0].window + cache.layers[0].TRIM_SLACK
        assert cache.peak_bytes == (17 + 34 + 34) * 2 * 3 * 8 * 4  # the last step: past step 9's 3 x 20 tokens
        cache.reset()
        assert cache.peak_bytes == 0 and cache.physical_bytes == 0


def _random_runs(rng, length: int, rows: int, kept: int) -> tuple[tuple[tuple[int, int], ...], ...]:
    """Per row: `kept` of `length` tokens as ascending, disjoint (begin, length) runs (neighbours merged)."""
    out = []
    for _ in range(rows):
        tokens = np.sort(rng.choice(length, kept, replace=False))
        if not kept:
            out.append(())
            continue
        starts = np.flatnonzero(np.r_[True, np.diff(tokens) != 1])
        ends = np.r_[starts[1:], len(tokens)]
        out.append(tuple((int(tokens[a]), int(b - a)) for a, b in zip(starts, ends)))
    return tuple(out)


@pytest.mark.parametrize("mover", ["kernels", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows, kept", [(1, 0), (1, 1), (1, 37), (3, 20), (3, 60)])
def test_keep_runs_moves_each_heads_runs_as_the_gather_would(monkeypatch, mover, dtype, rows, kept):
    """KVBuffer.keep_runs (in place, only the runs not already at their place move; or, without the kernels,
    torch's gathers) leaves exactly what `keep` of the runs' token indices leaves: K and V, every head,
    the slots after the kept ones untouched by neither; a shared row serves every head."""
    from h2okit import cache
    from h2okit.policy import runs_token_indices

    if mover == "torch":
        monkeypatch.setattr(cache, "_run_mover", lambda: None)
    rng = np.random.default_rng(rows * 1000 + kept)
    k, v = torch.randn(1, 3, 64, 8).to(dtype), torch.randn(1, 3, 64, 8).to(dtype)
    runs = _random_runs(rng, 60, rows, kept)
    if kept == 37:  # a run at its place already (the sink), then runs that overlap their destinations
        runs = (((0, 10), (12, 20), (40, 7)),)
    expected, moved = cache.KVBuffer(k, v, dtype), cache.KVBuffer(k, v, dtype)
    for buffer in (expected, moved):
        buffer.append(k[:, :, :60], v[:, :, :60])
    index = torch.from_numpy(runs_token_indices(runs)) if kept else torch.zeros((rows, 0), dtype=torch.int64)
    expected.keep(index)
    moved.keep_runs(runs)
    assert moved.length == expected.length == kept
    assert torch.equal(moved.views()[0], expected.views()[0]) and torch.equal(moved.views()[1], expected.views()[1])
    for g in range(3):  # each head its own row's tokens (or the shared row's)
        assert torch.equal(moved.views()[0][0, g], k[0, g, index[g if rows > 1 else 0]])
