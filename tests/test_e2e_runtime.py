"""End to end on the real default model (SmolLM2-135M) and real text."""

import json

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


def test_llm_bench_json_output_has_samples_stats_and_metadata(tmp_path):
    log = tmp_path / "bench.log"
    proc = run_cli("h2okit.bench", "-m", str(SEED_CONFIG), "-p", "64", "-n", "8", "-rep", "2", "-o", "json",
                   "-fp", str(log))
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["schema"] == "h2okit.llm_bench/1"
    meta = doc["metadata"]
    assert meta["h2okit"] and meta["torch"] and meta["transformers"] and meta["cpu"] and "kernel_build" in meta
    assert meta["kv"]["kv_h2o_enable"] is True
    (result,) = doc["results"]
    assert result["prompt"] == 64 and result["gen"] == 8 and result["repetitions"] == 2
    assert result["decode_path"] in ("fast", "reference")
    assert len(result["decode_tps"]["samples"]) == 2 and result["decode_tps"]["mean"] > 0
    assert len(result["stats"]["h2o_keep"]["samples"]) == 2
    assert "| model |" in log.read_text()  # -fp stays MNN's table whatever stdout gets
    lines = run_cli("h2okit.bench", "-m", str(SEED_CONFIG), "-p", "32", "-n", "4", "-rep", "1", "-o", "jsonl")
    assert lines.returncode == 0 and json.loads(lines.stdout.splitlines()[0])["prompt"] == 32


def test_context_overflow_is_refused_before_anything_runs(tmp_path):
    proc = run_cli("h2okit.bench", "-m", str(SEED_CONFIG), "-p", "9000", "-n", "8", "-rep", "1")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "exceeds the model's context of 8192" in proc.stderr and "--beyond-context" in proc.stderr


@pytest.mark.parametrize("basis_keep", [0.2, 1 / 3, 0.5])
def test_seen_basis_attends_to_the_fraction_a_user_reads(basis_keep, tmp_path):
    """Static keep r on all layers, trigger 64, basis seen: the quality protocol's attended fraction
    is r within 0.02 (floors inside the budget, no compounding)."""
    raw = json.loads(SEED_CONFIG.read_text())
    raw.update({"kv_h2o_layer_start": 0, "kv_h2o_target_mode": "static", "kv_h2o_target_keep_ratio": basis_keep,
                "kv_h2o_budget_basis": "seen", "kv_h2o_trigger_min_tokens": 64, "kv_lossless_enable": False})
    path = tmp_path / "seen.json"
    path.write_text(json.dumps(raw))
    proc = run_cli("h2okit.bench", "-m", str(path), "-p", "512", "-n", "32", "-rep", "1", "--quality",
                   "--quality-windows", "2", "--passkey-depths", "", "-o", "json")
    assert proc.returncode == 0, proc.stderr
    quality = json.loads(proc.stdout)["results"][0]["quality"]
    assert abs(quality["attended_fraction"]["mean"] - basis_keep) <= 0.02
    assert len(quality["ppl_delta_pct"]["samples"]) == 2
