"""End to end on the real default model (SmolLM2-135M) and real text."""

import pytest
import torch

from conftest import SEED_CONFIG, parse_markdown_rows, run_cli, write_config
from h2okit.config import parse_config
from h2okit.corpus import token_stream
from h2okit.runtime import Engine

pytestmark = pytest.mark.model


def test_llm_bench_reproduces_the_worked_example(tmp_path):
    log = tmp_path / "bench.log"
    proc = run_cli("h2okit.bench", "-m", str(SEED_CONFIG), "-a", "cpu", "-t", "2", "-qatten", "0", "-kv", "true",
                   "-p", "512", "-n", "24", "-rep", "1", "-fp", str(log))
    assert proc.returncode == 0, proc.stderr
    (row,) = parse_markdown_rows(proc.stdout)
    assert row["llm_demo"] == "prompt=512<br>decode=24"
    assert row["h2o_keep"] == "0.3333 ± 0.0000"
    assert row["h2o_floor_keep"] == "0.2121 ± 0.0000"
    assert row["h2o_quantized_keep"] == "0.3333 ± 0.0000"
    assert row["h2o_target_keep_effective"] == "0.3333 ± 0.0000"
    assert abs(float(row["h2o_lossy"].split(" ± ")[0]) - 3.0) < 0.01
    assert float(row["kv_true_ratio"].split(" ± ")[0]) > 1.0
    prefill, decode = (float(part.split(" ± ")[0]) for part in row["speed(tok/s)"].split("<br>"))
    assert prefill > 0 and decode > 0
    assert log.read_text() == proc.stdout  # -fp appends the same table
    run_cli("h2okit.bench", "-m", str(SEED_CONFIG), "-p", "64", "-n", "2", "-rep", "1", "-fp", str(log))
    assert log.read_text().count("| model |") == 2


@pytest.mark.parametrize("override, expected", [
    ({"llm_model": "missing.gguf"}, "model not found"),
    ({"kv_h2o_sink": 4}, "unknown config key 'kv_h2o_sink'"),
    ({"kv_h2o_target_mode": "both"}, "allowed: static, adaptive"),
])
def test_bad_config_exits_with_one_line(tmp_path, override, expected):
    proc = run_cli("h2okit.bench", "-m", str(write_config(tmp_path, **override)), "-p", "8", "-n", "1")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and expected in proc.stderr and "Traceback" not in proc.stderr


def test_disabled_runtime_matches_plain_transformers_greedy(loaded_model, texts):
    prompt = token_stream(loaded_model.tokenizer, texts, 200)
    ours = Engine(loaded_model, parse_config({}).kv).generate(prompt, 16).tokens
    model = loaded_model.model
    model.set_attn_implementation("sdpa")
    try:
        with torch.inference_mode():
            ref = model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, min_new_tokens=16)
    finally:
        model.set_attn_implementation("h2o")
    assert ours == ref[0, len(prompt):].tolist()


def test_eviction_compacts_only_h2o_layers_and_keeps_true_positions(loaded_model, texts):
    kv = parse_config({"kv_h2o_enable": True, "kv_h2o_layer_start": 2, "kv_h2o_layer_end": 27,
                       "kv_h2o_block_tokens": 16, "kv_h2o_sink_tokens": 16, "kv_h2o_recent_tokens": 64,
                       "kv_h2o_update_interval": 8, "kv_h2o_trigger_min_tokens": 256}).kv
    prompt = token_stream(loaded_model.tokenizer, texts, 300)
    result = Engine(loaded_model, kv).generate(prompt, 24)
    lengths = result.kv_lengths
    assert lengths[0] == lengths[1] == lengths[28] == lengths[29] == 324  # outside the range: untouched
    assert all(length < 324 for length in lengths[2:28])
    assert result.stats.h2o_evictions >= 26 and result.stats.kv_true_ratio > 1.2
    text = loaded_model.tokenizer.decode(result.tokens)
    assert sum(ch.isalpha() for ch in text) > len(text) / 2  # words, not garbage
