"""Strict config validation (SPEC §1) and the layer-range rules."""

import json

import pytest

from h2okit.config import ConfigError, KV_KEYS, KVConfig, load_config, parse_config


def test_defaults_match_spec():
    kv = parse_config({}).kv
    assert (kv.h2o_block_tokens, kv.h2o_sink_tokens, kv.h2o_recent_tokens) == (64, 32, 256)
    assert kv.h2o_target_mode == "adaptive" and kv.keep_ratio == pytest.approx(1 / 3)
    assert KVConfig().to_keys() == {k: spec.default for k, spec in KV_KEYS.items()}


@pytest.mark.parametrize("raw, message", [
    ({"kv_h2o_enabel": True}, "unknown config key 'kv_h2o_enabel'; did you mean 'kv_h2o_enable'?"),
    ({"kv_h2o_block_tokens": "32"}, "config key 'kv_h2o_block_tokens' must be an integer, got \"32\""),
    ({"kv_h2o_enable": 1}, "config key 'kv_h2o_enable' must be a boolean, got 1"),
    ({"kv_h2o_target_mode": "fast"}, "config key 'kv_h2o_target_mode' has value \"fast\"; allowed: static, adaptive"),
    ({"kv_lossless_codec": "zip"}, "allowed: none, gear_delta"),
])
def test_bad_values_raise_one_clear_line(raw, message):
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_clamps_warn_once_each():
    cfg = parse_config({"kv_h2o_block_tokens": 0, "kv_h2o_target_keep_ratio": 1.5, "kv_h2o_ema_alpha": 0.5,
                        "kv_h2o_target_lossy_ratio": 0.5})
    assert cfg.kv.h2o_block_tokens == 1 and cfg.kv.h2o_target_keep_ratio == 1.0
    assert cfg.kv.h2o_target_lossy_ratio == 1.0
    assert len(cfg.warnings) == 3


def test_ints_are_accepted_for_floats_and_other_mnn_keys_pass_with_a_note():
    cfg = parse_config({"kv_h2o_target_lossy_ratio": 3, "sampler_type": "greedy"})
    assert cfg.kv.h2o_target_lossy_ratio == 3.0 and isinstance(cfg.kv.h2o_target_lossy_ratio, float)
    assert any("sampler_type" in w for w in cfg.warnings)


@pytest.mark.parametrize("start, end, expected", [
    (2, -1, range(2, 30)), (0, 0, range(0, 1)), (-5, 3, range(0, 4)), (40, -1, range(29, 30)),
    (10, 5, range(0)), (2, 100, range(2, 30)),
])
def test_layer_range_edges(start, end, expected):
    kv = parse_config({"kv_h2o_enable": True, "kv_h2o_layer_start": start, "kv_h2o_layer_end": end}).kv
    assert kv.h2o_layers(30) == expected


def test_h2o_disabled_has_no_layers_and_lossless_scopes():
    assert parse_config({"kv_h2o_layer_start": 0}).kv.h2o_layers(30) == range(0)
    kv = parse_config({"kv_h2o_enable": True, "kv_h2o_layer_start": 28, "kv_lossless_enable": True,
                       "kv_lossless_codec": "gear_delta", "kv_lossless_scope": "front_n_and_h2o_kept",
                       "kv_lossless_front_n": 2}).kv
    assert kv.lossless_layers(30) == {0, 1, 28, 29}


def test_load_config_errors_are_one_line(tmp_path):
    bad = tmp_path / "c.json"
    bad.write_text("{nope")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.json")
    bad.write_text(json.dumps([1]))
    with pytest.raises(ConfigError, match="JSON object"):
        load_config(bad)
