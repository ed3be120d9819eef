"""The codec inside the runtime, and the offline tools, on the real model."""

import json

import pytest

from conftest import DEFAULT_CONFIG, run_cli
from h2okit.config import parse_config
from h2okit.corpus import token_stream
from h2okit.runtime import Engine

pytestmark = pytest.mark.model

LOSSLESS = {"kv_lossless_enable": True, "kv_lossless_codec": "gear_delta", "kv_lossless_scope": "front_n",
            "kv_lossless_front_n": 2, "kv_h2o_trigger_min_tokens": 256, "kv_h2o_update_interval": 8,
            "kv_h2o_recent_tokens": 64, "kv_h2o_block_tokens": 32}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_store_mode_saves_real_memory_and_changes_no_token(loaded_model, texts, dtype):
    prompt = token_stream(loaded_model.tokenizer, texts, 300)
    runs = {}
    for mode in ("estimate", "full", "store"):
        kv = parse_config({**LOSSLESS, "kv_lossless_runtime_mode": mode, "kv_cache_dtype": dtype}).kv
        runs[mode] = Engine(loaded_model, kv).generate(prompt, 20)
    full, store = runs["full"], runs["store"]
    assert store.tokens == full.tokens == runs["estimate"].tokens
    assert full.stats.h2o_lossless > 1.05 and store.stats.h2o_lossless > 1.05
    assert runs["estimate"].stats.h2o_lossless > 1.0
    # store holds the cold part of layers 0-1 compressed: the saving is exactly raw - compressed
    codec = store.stats
    saved_mb = full.stats.kv_phys_mb - store.stats.kv_phys_mb
    cold_raw_mb = codec.kv_lossless_mb * codec.h2o_lossless
    assert saved_mb == pytest.approx(cold_raw_mb - codec.kv_lossless_mb, rel=1e-6)
    assert saved_mb > 0 and store.stats.kv_true_ratio > full.stats.kv_true_ratio
    assert full.stats.kv_true_ratio == pytest.approx(1.0)  # no eviction, nothing stored compressed


def test_dump_and_offline_lossless(tmp_path):
    dump = tmp_path / "dump"
    proc = run_cli("h2okit.cli", "dump-kv", "--config", str(DEFAULT_CONFIG), "--out-dir", str(dump),
                   "-p", "160", "-n", "4")
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((dump / "manifest.json").read_text())
    assert manifest["num_layers"] == 30 and set(manifest["files"]) == {"prefill", "final"}
    out_json, out_md = tmp_path / "off.json", tmp_path / "off.md"
    proc = run_cli("h2okit.cli", "offline-lossless", "--dump-dir", str(dump), "--scope", "front_n",
                   "--front-n", "2", "--dtype", "bfloat16", "--out-json", str(out_json), "--out-md", str(out_md))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out_json.read_text())
    assert report["layers"] == [0, 1] and report["round_trip_verified"]
    raw = report["k_raw_bytes"] + report["v_raw_bytes"]
    assert report["weighted_lossless_ratio"] == pytest.approx(
        raw / (report["k_compressed_bytes"] + report["v_compressed_bytes"]))
    assert raw == 2 * 2 * 164 * 3 * 64 * 2  # 2 layers, K+V, 164 tokens, 3 heads x 64, bf16
    assert report["weighted_lossless_ratio"] > 1.2
    assert "weighted lossless ratio" in out_md.read_text()
    bad = run_cli("h2okit.cli", "offline-lossless", "--dump-dir", str(tmp_path))
    assert bad.returncode == 2 and "no manifest.json" in bad.stderr and "Traceback" not in bad.stderr
