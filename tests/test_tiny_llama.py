"""The fast decode path against the reference path on tiny random Llamas built in-process (no hub,
no download, seconds): MHA, GQA and MQA head layouts, head dims 32/64/128, float32 and bfloat16
weights, and every policy family, with evictions. Logits must agree to float tolerance and the
eviction plans must be the same ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from h2okit.attention import ATTN_IMPLEMENTATION, register
from h2okit.config import parse_config
from h2okit.model import LoadedModel
from h2okit.policy import SCORERS
from h2okit.runtime import Engine

from conftest import eviction_plans

LAYOUTS = {  # name: (query heads, KV heads, head dim)
    "mha-d32": (4, 4, 32),
    "gqa3-d64": (9, 3, 64),  # SmolLM2's layout (the AVX-512 attention path)
    "gqa2-d128": (4, 2, 128),
    "mqa-d64": (8, 1, 64),
}


def tiny_llama(q_heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype, seed: int = 0) -> LoadedModel:
    from transformers import LlamaConfig, LlamaForCausalLM

    register()
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=320, hidden_size=q_heads * head_dim, intermediate_size=96, num_hidden_layers=3,
                      num_attention_heads=q_heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                      max_position_embeddings=1024, rms_norm_eps=1e-5, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # larger than the default init, so attention is peaked and choices matter
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(4.0)
    model = model.to(dtype).eval()
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    return LoadedModel(model=model, tokenizer=None, name="tiny", source=None, size_bytes=0, num_layers=3,
                       kv_heads=kv_heads, head_dim=head_dim, q_heads=q_heads, context_length=1024)


def kv_config(policy: str, per_head: bool = False, cache_dtype: str = "float32", **extra):
    return parse_config({"kv_h2o_enable": True, "kv_h2o_layer_start": 0, "kv_h2o_policy": policy,
                         "kv_h2o_block_tokens": 4, "kv_h2o_sink_tokens": 4, "kv_h2o_recent_tokens": 8,
                         "kv_h2o_target_mode": "static", "kv_h2o_target_keep_ratio": 0.5,
                         "kv_h2o_budget_basis": "seen", "kv_h2o_update_interval": 4,
                         "kv_h2o_trigger_min_tokens": 32, "kv_h2o_per_head": per_head,
                         "kv_cache_dtype": cache_dtype, **extra}).kv


def teacher_forced(engine: Engine, ids: list[int], prompt: int, scores: list | None = None,
                   caches: list | None = None):
    """(logits, plans, lengths) of teacher-forcing `ids` after a `prompt`-token prefill; `scores` gets
    every evicting layer's final block scores, `caches` the cache."""
    cache = engine.new_cache()
    logits = [engine.forward(cache, ids[:prompt], 0)[-1]]
    for i, token in enumerate(ids[prompt:-1]):
        logits.append(engine.forward(cache, [token], prompt + i)[-1])
    plans = eviction_plans(cache)
    if scores is not None:
        scores.extend(layer.policy.scorer.state.copy() for layer in cache.layers if layer.policy is not None)
    if caches is not None:
        caches.append(cache)
    return torch.stack(logits).float(), plans, cache.seq_lengths().tolist()


@pytest.mark.parametrize("layout, policy, per_head", [
    ("mha-d32", "h2o", False), ("gqa3-d64", "tova", True), ("gqa2-d128", "mean", False), ("mqa-d64", "window", True),
    ("gqa3-d64", "streaming", False), ("gqa2-d128", "h2o", True), ("mqa-d64", "random", False),
    ("gqa3-d64", "expected", False), ("gqa2-d128", "expected", True),
])  # every layout and every policy family at least once
def test_fast_path_matches_reference_float32(layout, policy, per_head):
    loaded = tiny_llama(*LAYOUTS[layout], torch.float32)
    ids = np.random.default_rng(1).integers(0, 320, 90).tolist()
    kv = kv_config(policy, per_head, kv_h2o_value_norm=policy in ("h2o", "expected"), kv_h2o_query_window=8)
    fast = Engine(loaded, kv, decode_path="fast")
    ref = Engine(loaded, kv, decode_path="reference")
    assert fast.decode_path_used == "fast"
    fast_logits, fast_plans, fast_lengths = teacher_forced(fast, ids, 40)
    ref_logits, ref_plans, ref_lengths = teacher_forced(ref, ids, 40)
    assert len(ref_plans) >= 3 * 3  # every layer evicted several times
    assert fast_plans == ref_plans and fast_lengths == ref_lengths
    torch.testing.assert_close(fast_logits, ref_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layout", ["gqa3-d64", "gqa2-d128"])
@pytest.mark.parametrize("cache_dtype", ["float32", "bfloat16", "float16"])
def test_fast_path_bfloat16_weights_stay_close_to_the_reference(layout, cache_dtype):
    """bf16 weights: the kernels widen them and accumulate in float32, transformers multiplies in bf16,
    so logits agree loosely; greedy picks and the eviction plans should still agree."""
    loaded = tiny_llama(*LAYOUTS[layout], torch.bfloat16)
    ids = np.random.default_rng(2).integers(0, 320, 70).tolist()
    kv = kv_config("h2o", cache_dtype=cache_dtype)
    fast_logits, fast_plans, _ = teacher_forced(Engine(loaded, kv, decode_path="fast"), ids, 40)
    ref_logits, ref_plans, _ = teacher_forced(Engine(loaded, kv, decode_path="reference"), ids, 40)
    assert len(fast_plans) == len(ref_plans) >= 3
    assert (fast_logits - ref_logits).abs().mean() < 0.05 * ref_logits.abs().mean()
    agree = (fast_logits.argmax(-1) == ref_logits.argmax(-1)).float().mean()
    assert agree >= 0.9


def test_no_eviction_fast_equals_reference_exactly_in_greedy_tokens():
    loaded = tiny_llama(*LAYOUTS["gqa3-d64"], torch.float32)
    prompt = np.random.default_rng(3).integers(0, 320, 30).tolist()
    kv = parse_config({}).kv
    fast = Engine(loaded, kv, decode_path="fast").generate(prompt, 20).tokens
    ref = Engine(loaded, kv, decode_path="reference").generate(prompt, 20).tokens
    assert fast == ref


@pytest.mark.parametrize("policy", ["h2o", "streaming", "expected"])
def test_chunked_prefill_bounds_the_peak_kv(policy):
    """kv_h2o_prefill_chunk_tokens: the prompt goes in chunks and every evicting layer shrinks to its
    budget between them, so the peak K/V is about budget + one chunk, not the whole prompt."""
    loaded = tiny_llama(*LAYOUTS["gqa3-d64"], torch.float32)
    prompt = np.random.default_rng(4).integers(0, 320, 300).tolist()
    chunked = kv_config(policy, kv_h2o_prefill_chunk_tokens=32, kv_h2o_target_keep_ratio=0.25)
    whole = kv_config(policy, kv_h2o_target_keep_ratio=0.25)
    for kv in (chunked, whole):
        assert kv.h2o_prefill_chunk_tokens in (0, 32)
    bpt = 2 * 3 * 64 * 4  # K and V, 3 KV heads x 64 dims x float32
    runs = {}
    for name, kv in (("chunked", chunked), ("whole", whole)):
        engine = Engine(loaded, kv, decode_path="reference")
        result = engine.generate(prompt, 8)
        runs[name] = result
    logical = 3 * 308 * bpt
    assert runs["whole"].stats.kv_peak_mb * 2**20 >= 3 * 300 * bpt  # the whole prompt sat in the cache
    budget = 0.25 * 300
    assert runs["chunked"].stats.kv_peak_mb * 2**20 <= 3 * (budget + 32 + 4) * bpt  # budget + a chunk (+ a block)
    assert runs["chunked"].stats.kv_peak_mb < 0.45 * runs["chunked"].stats.kv_logical_mb
    assert runs["chunked"].stats.kv_logical_mb * 2**20 == logical
    assert runs["chunked"].stats.h2o_evictions > runs["whole"].stats.h2o_evictions  # it evicted inside the prompt


def test_chunked_prefill_without_eviction_is_the_same_computation():
    """Chunks alone (nothing over the trigger) change nothing but the summation order."""
    loaded = tiny_llama(*LAYOUTS["mha-d32"], torch.float32)
    ids = np.random.default_rng(5).integers(0, 320, 100).tolist()
    big_trigger = {"kv_h2o_trigger_min_tokens": 100000}
    chunked = Engine(loaded, kv_config("h2o", kv_h2o_prefill_chunk_tokens=16, **big_trigger), "reference")
    whole = Engine(loaded, kv_config("h2o", **big_trigger), "reference")
    a = chunked.forward(chunked.new_cache(), ids, 0, all_logits=True)
    b = whole.forward(whole.new_cache(), ids, 0, all_logits=True)
    assert a.shape == b.shape == (100, 320)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("policy, per_head, extra", [
    ("h2o", False, {"kv_h2o_value_norm": True}), ("h2o", True, {}), ("tova", True, {}), ("window", False, {}),
    ("streaming", False, {}), ("mean", False, {}),  # mean: its step is not decay * s + gain * m, never fused
    ("expected", True, {"kv_h2o_value_norm": True}),  # queries copied by the fused step into the ring
    ("h2o", False, {"kv_lossless_enable": True, "kv_lossless_codec": "gear_delta", "kv_lossless_runtime_mode": "full"}),
    ("h2o", False, {"kv_lossless_enable": True, "kv_lossless_codec": "gear_delta",
                     "kv_lossless_runtime_mode": "store"}),  # store mode: not fused
])
def test_one_call_per_step_is_the_per_layer_path_bit_for_bit(monkeypatch, policy, per_head, extra):
    """The fused step (h2k_decode_step, scores updated in C) runs the per-layer kernels' arithmetic in
    their order and numpy's score arithmetic: logits, scores, plans and lengths are identical."""
    from h2okit.fastpath import FastDecoder

    loaded = tiny_llama(*LAYOUTS["gqa3-d64"], torch.float32)
    ids = np.random.default_rng(2).integers(0, 320, 90).tolist()
    engine = Engine(loaded, kv_config(policy, per_head, **extra), decode_path="fast")
    calls = []
    lib = engine.fast.lib

    class Counting:  # counts fused calls, passes everything through
        def __getattr__(self, name):
            if name == "h2k_decode_step":
                calls.append(name)
            return getattr(lib, name)

    monkeypatch.setattr(engine.fast, "lib", Counting())
    fused_scores, per_layer_scores = [], []
    caches = []
    fused = teacher_forced(engine, ids, 40, fused_scores, caches)
    fused_calls = len(calls)
    monkeypatch.setattr(FastDecoder, "fuse_steps", False)
    per_layer = teacher_forced(engine, ids, 40, per_layer_scores, caches)
    assert len(calls) == fused_calls  # the switch works: no fused call without it
    expect_fused = policy != "mean" and extra.get("kv_lossless_runtime_mode") != "store"
    assert fused_calls == (len(ids) - 41 if expect_fused else 0)
    assert torch.equal(fused[0], per_layer[0])
    assert fused[1] == per_layer[1] and fused[2] == per_layer[2]
    assert len(fused[1]) >= 3 * 3
    assert len(fused_scores) == 3
    for a, b in zip(fused_scores, per_layer_scores):
        np.testing.assert_array_equal(a, b)
        assert a.any() or not SCORERS[policy].uses_attention
    if policy == "expected":  # the query rings too (each layer's last 32 queries, this window's)
        rings = [[layer.recent_queries().copy() for layer in c.layers] for c in caches]
        for a, b in zip(*rings):
            assert a.shape == (32, 9, 64)
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("fuse", [True, False])
def test_a_batch_step_gives_each_sequence_its_own_step(monkeypatch, fuse):
    """step_batch (fused or per layer) equals each sequence stepped alone: logits, plans and lengths."""
    from h2okit.fastpath import FastDecoder

    monkeypatch.setattr(FastDecoder, "fuse_steps", fuse)
    loaded = tiny_llama(*LAYOUTS["gqa3-d64"], torch.float32)
    engine = Engine(loaded, kv_config("h2o", False, kv_h2o_value_norm=True), decode_path="fast")
    rng = np.random.default_rng(4)
    prompts = [rng.integers(0, 320, n).tolist() for n in (35, 50, 41)]
    together, alone = [engine.new_cache() for _ in prompts], [engine.new_cache() for _ in prompts]
    for a, b, prompt in zip(together, alone, prompts):
        engine.forward(a, prompt, 0)
        engine.forward(b, prompt, 0)
    for step in range(40):
        feed = rng.integers(0, 320, len(prompts)).tolist()
        logits = engine.fast.step_batch(together, feed, [len(p) + step for p in prompts])
        for i, (cache, prompt) in enumerate(zip(alone, prompts)):
            assert torch.equal(logits[i], engine.fast.step(cache, feed[i], len(prompt) + step))
    for a, b in zip(together, alone):
        assert eviction_plans(a) == eviction_plans(b)
        assert a.seq_lengths().tolist() == b.seq_lengths().tolist()
    assert all(len(cache.events.evictions) >= 3 for cache in together)


def test_layers_that_only_append_stay_exact_across_buffer_moves(monkeypatch):
    """Between two fills of a layer's slot, a fused step sets only the length and RoPE rows of a layer that
    only appends (no policy, no codec): when its buffer moves (little headroom here), a new cache takes
    the slot, or a sequence joins the batch, the slot must be filled again. The fused batch step equals
    each sequence stepped alone on the per-layer path, bit for bit."""
    from h2okit.cache import KVBuffer
    from h2okit.fastpath import FastDecoder

    monkeypatch.setattr(KVBuffer, "HEADROOM", 8)
    loaded = tiny_llama(*LAYOUTS["gqa3-d64"], torch.float32)
    engine = Engine(loaded, kv_config("h2o", kv_h2o_layer_start=1), decode_path="fast")  # layer 0 plain
    rng = np.random.default_rng(6)
    prompts = [rng.integers(0, 320, n).tolist() for n in (37, 44, 29)]

    def run(fuse: bool, batches: list[int]) -> list[torch.Tensor]:
        monkeypatch.setattr(FastDecoder, "fuse_steps", fuse)
        caches = [engine.new_cache() for _ in prompts]
        for cache, prompt in zip(caches, prompts):
            engine.forward(cache, prompt, 0)
        out, steps = [], [0] * len(prompts)
        for batch in batches:  # a batch of the first `batch` sequences, one step
            feed = [(7 * steps[i] + i) % 320 for i in range(batch)]
            if fuse:
                positions = [len(prompts[i]) + steps[i] for i in range(batch)]
                logits = engine.fast.step_batch(caches[:batch], feed, positions)
            else:
                logits = torch.stack([engine.fast.step(caches[i], feed[i], len(prompts[i]) + steps[i])
                                      for i in range(batch)])
            for i in range(batch):
                steps[i] += 1
            out.append(logits)
        assert caches[0].layers[0].policy is None
        assert caches[0].layers[0].buffer.moves >= 2  # the prefill's allocation, then at least one while decoding
        return out

    schedule = [1] * 12 + [3] * 20 + [2] * 6 + [3] * 10
    for fused, per_layer in zip(run(True, schedule), run(False, schedule)):
        assert torch.equal(fused, per_layer)


def test_the_fused_step_keeps_no_finished_cache_alive():
    """The decoder remembers which layer each of its slots last served (to skip re-casting pointers), by
    weak reference: a cache dropped after its request is freed."""
    import gc
    import weakref

    loaded = tiny_llama(*LAYOUTS["gqa3-d64"], torch.float32)
    engine = Engine(loaded, kv_config("h2o", False), decode_path="fast")
    cache = engine.new_cache()
    engine.forward(cache, list(range(40)), 0)
    for step in range(3):
        engine.forward(cache, [step], 40 + step)
    assert any(source is not None for source in engine.fast._slot_sources)  # the fused step ran
    layer = weakref.ref(cache.layers[0])
    del cache
    gc.collect()
    assert layer() is None


@pytest.mark.parametrize("decode_path, chunk", [("fast", 0), ("reference", 0), ("fast", 16)])
def test_each_recorded_query_is_at_its_tokens_position(decode_path, chunk):
    """`expected` moves its queries ahead from the positions they were asked at, which the ring derives
    from its count of recordings: every token a layer sees must be recorded once, in order (prompt rows,
    chunks, the fused step's slots), so that count is the layer's tokens seen."""
    loaded = tiny_llama(*LAYOUTS["gqa3-d64"], torch.float32)
    engine = Engine(loaded, kv_config("expected", kv_h2o_query_window=8, kv_h2o_prefill_chunk_tokens=chunk),
                    decode_path=decode_path)
    ids = torch.randint(0, 320, (70,), generator=torch.Generator().manual_seed(3)).tolist()
    caches = []
    teacher_forced(engine, ids, 40, caches=caches)
    layers = [layer for layer in caches[0].layers if layer.policy is not None]
    assert layers and caches[0].events.evictions  # the plans ran (and moved their queries ahead)
    for layer in layers:
        assert layer._queries_recorded == layer.tokens_seen == 69
        assert sorted(layer.recent_query_positions().tolist()) == list(range(61, 69))


def test_queries_ahead_need_the_models_rope_tables(monkeypatch):
    """A model whose RoPE tables the runtime does not know gets one ConfigError naming the key and the
    allowed value; with the key at 0 the policy runs on the queries as asked."""
    import h2okit.runtime as runtime
    from h2okit.arch import ArchitectureUnsupported
    from h2okit.config import ConfigError

    def unknown(model):
        raise ArchitectureUnsupported("model_type 'mystery'")

    monkeypatch.setattr(runtime, "architecture_of", unknown)
    loaded = tiny_llama(*LAYOUTS["gqa3-d64"], torch.float32)
    with pytest.raises(ConfigError, match="kv_h2o_query_horizon 32: .*mystery.*allowed for it: 0"):
        Engine(loaded, kv_config("expected"), decode_path="reference")
    engine = Engine(loaded, kv_config("expected", kv_h2o_query_horizon=0), decode_path="reference")
    assert engine.rope_tables is None and engine.new_cache().layers[0].rope_tables is None


def test_a_recorded_query_moved_ahead_is_the_query_asked_there():
    """The ring holds queries after RoPE; turned back and moved to one later position they must be the
    layer's own pre-RoPE query (q_proj of the normed hidden state) rotated by the model at that position:
    this pins the ring's positions and RoPE's pairing (rotate-half) to the model's."""
    from h2okit.policy import queries_ahead

    q_heads, kv_heads, dim = LAYOUTS["gqa3-d64"]
    loaded = tiny_llama(q_heads, kv_heads, dim, torch.float32)
    engine = Engine(loaded, kv_config("expected", kv_h2o_query_window=8), decode_path="reference")
    ids = torch.randint(0, 320, (40,), generator=torch.Generator().manual_seed(4)).tolist()
    cache = engine.new_cache()
    engine.forward(cache, ids, 0)  # 40 prompt rows: the ring keeps positions 32..39
    with torch.no_grad():
        hidden = loaded.model(torch.tensor([ids]), output_hidden_states=True).hidden_states
    model = loaded.model.model
    target = 45
    for index in range(3):
        layer, block = cache.layers[index], model.layers[index]
        positions = layer.recent_query_positions()
        order = np.argsort(positions)
        with torch.no_grad():
            raw = block.self_attn.q_proj(block.input_layernorm(hidden[index][0, positions[order]]))
            cos, sin = model.rotary_emb(raw, torch.full((1, len(order)), target))
            raw = raw.view(len(order), q_heads, dim)
            want = raw * cos[0, :, None] + torch.cat([-raw[..., dim // 2:], raw[..., :dim // 2]], -1) * sin[0, :, None]
        own = layer.rope_tables(positions[order])
        ahead = layer.rope_tables(np.array([target]))
        got = queries_ahead(layer.recent_queries()[order], *own, ahead[0][0], ahead[1][0])
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-4)
