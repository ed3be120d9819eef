"""The seed's Quick Start chain (sweep -> parse -> analyze) on the real model, with a tiny grid."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.model
ROOT = Path(__file__).resolve().parents[1]
EXP = ROOT / "exp" / "h2o_v2"


def script(name, *args):
    return subprocess.run([sys.executable, str(EXP / name), *args], capture_output=True, text=True, timeout=900)


def test_quick_start_chain_on_the_default_model(tmp_path):
    out = tmp_path / "out"
    proc = script("run_h2o_v2_bench.py", "--llm-bench", "llm_bench", "--base-config",
                  str(ROOT / "configs" / "smollm2-135m.json"), "--out-dir", str(out), "--prompts", "96",
                  "--gens", "12", "--repeat", "1", "--h2o-keep-ratios", "0.5,0.8", "--h2o-block-tokens", "16",
                  "--h2o-sink-tokens", "16", "--h2o-recent-tokens", "16", "--h2o-trigger-min-tokens", "64",
                  "--h2o-update-intervals", "4", "--h2o-target-mode", "static", "--kv-lossless-enable",
                  "--kv-lossless-scope", "front_n", "--kv-lossless-front-n", "2", "--kv-lossless-codec", "gear_delta")
    assert proc.returncode == 0, proc.stderr
    csv_path = out / "h2o_metrics.csv"
    proc = script("parse_h2o_v2_log.py", "--log-dir", str(out / "logs"), "--out-csv", str(csv_path))
    assert proc.returncode == 0, proc.stderr
    with csv_path.open() as f:
        rows = {r["kv_h2o_target_keep_ratio"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"0.5", "0.8"}
    for keep, row in rows.items():
        assert row["run_status"] == "ok" and float(row["decode_tps_mean"]) > 0
        # static target: ceil(keep*kv) rounded up to whole 16-token blocks above the floor
        assert float(keep) <= float(row["h2o_keep_mean"]) < float(keep) + 16 / 100 + 0.01
        assert float(row["h2o_lossless_mean"]) > 1.0 and float(row["kv_true_ratio_mean"]) > 1.0
    assert float(rows["0.5"]["kv_true_ratio_mean"]) > float(rows["0.8"]["kv_true_ratio_mean"])
    proc = script("analyze_h2o_v2.py", "--csv", str(csv_path), "--out", str(out / "summary.md"),
                  "--lossy-target", "1.5", "--lossless-target", "1.05")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["runs"] == 2 and summary["pareto"]
    assert summary["best_true_ratio"]["run"].endswith("k0.5_b16_lr3")
    lossy = {g["run"]: g for g in summary["gate"]["criteria"] if g["name"] == "lossy ratio"}
    assert [g["verdict"] for g in lossy.values()].count("PASS") == 1  # keep 0.5 reaches 1.5x, keep 0.8 cannot
    assert (out / "pareto.png").stat().st_size > 10_000
