"""Quality measurement on the real model, small sizes."""

import numpy as np
import pytest
import torch

from conftest import SEED_CONFIG, parse_markdown_rows, run_cli
from h2okit.config import parse_config
from h2okit.corpus import token_stream
from h2okit.metrics import token_nll
from h2okit.quality import QualityEvaluator, QualitySettings, stream_nll, stream_nll_many
from h2okit.runtime import Engine

pytestmark = pytest.mark.model
EVICTING = {"kv_h2o_enable": True, "kv_h2o_block_tokens": 16, "kv_h2o_sink_tokens": 16, "kv_h2o_recent_tokens": 16,
            "kv_h2o_trigger_min_tokens": 64, "kv_h2o_update_interval": 4, "kv_h2o_target_mode": "static",
            "kv_h2o_target_keep_ratio": 0.5}


def test_streamed_nll_with_the_full_cache_equals_one_teacher_forced_pass(loaded_model, texts):
    ids = token_stream(loaded_model.tokenizer, texts, 80)
    engine = Engine(loaded_model, parse_config({}).kv)
    streamed = stream_nll(engine, ids[:64], ids[64:])
    with torch.inference_mode():
        logits = engine.forward(engine.new_cache(), ids, 0, all_logits=True)
    one_pass = token_nll(logits[63:79].float().numpy(), np.array(ids[64:]))
    np.testing.assert_allclose(streamed.nll, one_pass, rtol=1e-4, atol=1e-4)
    assert streamed.steady_from == 16 and (streamed.attended == 1.0).all()  # nothing evicted: all targets count


def test_windows_teacher_forced_together_score_as_one_at_a_time(loaded_model, texts):
    """The evaluator steps its windows as one batch on the fast path: every window's NLLs, attended
    fractions and steady start are those it gets alone, exactly."""
    stream = token_stream(loaded_model.tokenizer, texts, 600)
    pairs = [(stream[i:i + 150], stream[i + 150:i + 190]) for i in (0, 200, 400)]
    engine = Engine(loaded_model, parse_config(EVICTING).kv)
    assert engine.fast is not None
    together = stream_nll_many(engine, pairs)
    for run, (prompt, continuation) in zip(together, pairs):
        alone = stream_nll(engine, prompt, continuation)
        assert np.array_equal(run.nll, alone.nll) and np.array_equal(run.attended, alone.attended)
        assert run.steady_from == alone.steady_from < len(continuation)


def test_quality_columns_for_full_and_evicting_configs(loaded_model, texts):
    settings = QualitySettings(windows=2, tokens=24, passkey_depths=(0.5,), passkey_filler=16)
    prompt = token_stream(loaded_model.tokenizer, texts, 96)
    results = {}
    for name, raw in (("full", {**EVICTING, "kv_h2o_policy": "full"}), ("h2o", EVICTING)):
        engine = Engine(loaded_model, parse_config(raw).kv)
        tokens = engine.generate(prompt, 12).tokens
        results[name] = QualityEvaluator(engine, texts, settings).evaluate(96, prompt, [tokens])
    full, h2o = results["full"], results["h2o"]
    assert full["ppl"] == pytest.approx(full["ppl_full"]) and full["ppl_delta_pct"] == pytest.approx([0, 0], abs=1e-6)
    assert full["token_agreement"] == [1.0] and full["first_divergence"] == [12.0]
    assert full["passkey_acc"] == full["passkey_full_acc"]
    assert len(h2o["ppl"]) == 2 and all(np.isfinite(h2o["ppl"]))
    assert all(np.isfinite(h2o["ppl_full"]))  # the cached reference, over the h2o run's steady targets
    assert full["attended_fraction"] == [1.0, 1.0] and all(a < 0.9 for a in h2o["attended_fraction"])
    assert h2o["ppl"] != pytest.approx(full["ppl"])  # eviction changed the scores
    assert 0 <= h2o["token_agreement"][0] <= 1 and set(h2o) >= {"passkey_d50", "quality_s"}


def test_llm_bench_quality_flag_adds_the_columns(tmp_path):
    proc = run_cli("h2okit.bench", "-m", str(SEED_CONFIG), "-p", "128", "-n", "8", "-rep", "1", "--quality",
                   "--quality-windows", "1", "--quality-tokens", "8", "--passkey-depths", "")
    assert proc.returncode == 0, proc.stderr
    (row,) = parse_markdown_rows(proc.stdout)
    assert row["token_agreement"] == "1.0000 ± 0.0000"  # no eviction at 136 tokens (trigger 384)
    assert row["ppl_delta_pct"] == "0.00 ± 0.00" and "passkey_acc" not in row
