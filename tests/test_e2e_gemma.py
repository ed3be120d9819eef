"""Gemma 3 270M, the second model: sliding-window layers kept exactly, the fast path against the
reference, and the rule that sliding layers are never evicted."""

import dataclasses
import functools

import pytest
import torch

from h2okit.config import load_config, parse_config
from h2okit.runtime import Engine

from conftest import ROOT, eviction_plans

pytestmark = pytest.mark.model
GEMMA = ROOT / "configs" / "gemma3-270m.json"
GEMMA_SEED = ROOT / "configs" / "gemma3-270m-seed.json"
WINDOW = 512


@functools.lru_cache(maxsize=4)
def _gemma(weight_dtype="auto"):
    from h2okit.model import load_model, resolve_model_path

    return load_model(resolve_model_path(load_config(GEMMA)), weight_dtype=weight_dtype)


@pytest.fixture(scope="module")
def gemma():
    torch.set_num_threads(2)
    return _gemma()


@pytest.fixture(scope="module")
def tokens(gemma, texts):
    from h2okit.corpus import token_stream

    return token_stream(gemma.tokenizer, texts, 700)


def teacher_forced(engine, tokens, prompt_len):
    cache = engine.new_cache()
    rows = [engine.forward(cache, tokens[:prompt_len], 0)[-1]]
    rows += [engine.forward(cache, [t], prompt_len + i)[-1] for i, t in enumerate(tokens[prompt_len:-1])]
    return torch.stack(rows).float(), cache


def evicting_kv(**changes):
    """H2O on every layer range the seed names, early and often (only the global layers take it)."""
    kv = load_config(GEMMA_SEED).kv
    settings = dict(lossless_enable=False, h2o_layer_start=0, h2o_trigger_min_tokens=128, h2o_update_interval=8,
                    h2o_target_mode="static", h2o_target_keep_ratio=0.5)
    return dataclasses.replace(kv, **{**settings, **changes})


def test_the_model_has_sliding_and_global_layers(gemma):
    assert gemma.sliding_windows == [None if (i + 1) % 6 == 0 else WINDOW for i in range(18)]


def test_reference_path_equals_transformers_past_the_window(gemma, tokens):
    """h2okit's cache and attention (whole prefill of 640, then 59 decode steps) give the logits of
    transformers' own full-sequence forward, whose sliding layers mask to the window: the window
    semantics are kept exactly, though the sliding layers drop what left the window."""
    from transformers import AutoModelForCausalLM

    ours, cache = teacher_forced(Engine(gemma, parse_config({}).kv, decode_path="reference"), tokens, 640)
    plain = AutoModelForCausalLM.from_pretrained(gemma.model.name_or_path, dtype=torch.float32,
                                                 attn_implementation="sdpa")
    with torch.inference_mode():
        full = plain(torch.tensor([tokens[:-1]]), use_cache=False).logits[0, 639:].float()
    torch.testing.assert_close(ours, full, rtol=0, atol=1e-3)
    lengths = cache.seq_lengths()
    for i, window in enumerate(gemma.sliding_windows):
        if window is None:
            assert lengths[i] == len(tokens) - 1
        else:  # the window - 1 kept after prefill, plus the decode steps since the last trim
            assert window - 1 <= lengths[i] <= window - 1 + cache.layers[i].TRIM_SLACK


def test_sliding_layers_are_never_evicted(gemma, tokens):
    kv = evicting_kv()
    engine = Engine(gemma, kv, decode_path="reference")
    _, cache = teacher_forced(engine, tokens, 300)
    assert cache.h2o_layer_ids == [5, 11, 17]
    assert {e.layer for e in cache.events.evictions} == {5, 11, 17}
    assert all(cache.layers[i].policy is None for i in range(18) if (i + 1) % 6)


def test_fast_logits_and_eviction_plans_match_the_reference(gemma, tokens):
    """Weights `auto`: the model's float32 layers and the GGUF's Q8_0 lm_head (exact), so only the
    summation order differs; evictions on the global layers identical."""
    kv = evicting_kv()
    fast_engine = Engine(gemma, kv, decode_path="fast")
    assert "lm_head Q8_0 blocks as stored" in fast_engine.decode_path_note
    fast, fast_cache = teacher_forced(fast_engine, tokens, 560)
    ref, ref_cache = teacher_forced(Engine(gemma, kv, decode_path="reference"), tokens, 560)
    torch.testing.assert_close(fast, ref, rtol=0, atol=1e-3)
    assert (fast.argmax(-1) == ref.argmax(-1)).all()
    events = eviction_plans(fast_cache)
    assert len(events) >= 9
    assert events == eviction_plans(ref_cache)
    assert fast_cache.seq_lengths().tolist() == ref_cache.seq_lengths().tolist()


def test_chunked_prefill_keeps_the_window_exact(gemma, tokens):
    """Chunks of 128 through 600 tokens: the sliding layers see the same window as in a whole
    prefill (the global layers evict between chunks, so only their logits may differ: compared
    here with H2O off on all but the last layer, which is global)."""
    kv = evicting_kv(h2o_layer_start=17, h2o_target_keep_ratio=0.9, h2o_prefill_chunk_tokens=128,
                     h2o_budget_basis="seen")
    engine = Engine(gemma, kv, decode_path="reference")
    cache = engine.new_cache()
    engine.forward(cache, tokens[:600], 0)
    assert cache.events.evictions and {e.layer for e in cache.events.evictions} == {17}
    assert all(cache.layers[i].get_seq_length() == WINDOW - 1 for i in range(18) if (i + 1) % 6)
    whole_engine = Engine(gemma, dataclasses.replace(kv, h2o_prefill_chunk_tokens=0), decode_path="reference")
    whole = whole_engine.new_cache()
    whole_engine.forward(whole, tokens[:600], 0)
    for i in range(17):  # before the evicting layer, the same K/V either way, up to float noise (which grows
        a, b = cache.layers[i].keys, whole.layers[i].keys  # with depth; a wrong window would change them by O(1))
        assert a.shape == b.shape and ((a - b).norm() / b.norm()).item() < 1e-5


def test_q8_0_weights_stay_close_to_the_model(gemma, tokens):
    """The configs' `q8_0`: the Q5_0/Q4_K/Q6_K layers re-quantized to Q8_0 (not exact: said so), the
    Q8_0 lm_head as stored."""
    q8 = _gemma("q8_0")
    engine = Engine(q8, parse_config({}).kv, decode_path="fast")
    assert "not bit-exact" in engine.decode_path_note and "lm_head Q8_0 blocks as stored" in engine.decode_path_note
    fast, _ = teacher_forced(engine, tokens, 600)
    ref, _ = teacher_forced(Engine(gemma, parse_config({}).kv, decode_path="reference"), tokens, 600)
    assert (fast.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9
    assert (fast - ref).abs().mean() < 0.1
