"""The kit's evidence: interleaved rounds, per-round samples in the CSV, and an A/A sweep that
never FAILs a speed or quality criterion however noisy the machine (a fake llm_bench, no model)."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from h2okit.kit.analyze import GateSettings, analyze, judge
from h2okit.kit.grid import load_preset

ROOT = Path(__file__).resolve().parents[1]
FAKE = ROOT / "tests" / "data" / "fake_llm_bench.py"
BASE = ROOT / "configs" / "smollm2-135m.json"


def h2okit(*args, env=None):
    return subprocess.run([sys.executable, "-m", "h2okit.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


def aa_sweep(out, env, repeat=4):
    return h2okit("grid", "--llm-bench", str(FAKE), "--base-config", str(BASE), "--out-dir", str(out),
                  "--prompts", "256", "--gens", "64", "--repeat", str(repeat), "--h2o-policies", "full,h2o",
                  "--h2o-target-mode", "static", "--h2o-keep-ratios", "0.5", "--h2o-trigger-min-tokens", "100000",
                  env=env)


def test_rounds_are_interleaved_after_one_shared_warm_up(tmp_path):
    order = tmp_path / "order.txt"
    proc = aa_sweep(tmp_path / "s", {"FAKE_ORDER": str(order)}, repeat=3)
    assert proc.returncode == 0, proc.stderr
    calls = order.read_text().split()
    assert calls == ["full:0.5"] + ["full:0.5", "h2o:0.5"] * 3  # warm-up, then round by round
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["warmup"]["returncode"] == 0
    assert all([r["status"] for r in run["rounds"]] == ["ok"] * 3 for run in manifest["runs"])


def test_the_csv_keeps_every_rounds_sample(tmp_path):
    out = tmp_path / "s"
    (tmp_path / "k").write_text("-1")  # the shared warm-up is invocation -1: each round's two runs share a phase
    assert aa_sweep(out, {"FAKE_PHASES": str(tmp_path / "k"), "FAKE_RUNS_PER_PHASE": "2"}).returncode == 0
    for log in (out / "logs").glob("*.log"):  # one table per run, a row per round (old parsers read it too)
        text = log.read_text()
        assert text.count("| model |") == 1 and text.count("prompt=256<br>decode=64") == 4
    assert h2okit("parse", "--log-dir", str(out / "logs"), "--out-csv", str(out / "m.csv")).returncode == 0
    with (out / "m.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2
    for row in rows:
        samples = json.loads(row["decode_tps_samples"])
        assert len(samples) == 4 and float(row["rounds"]) == 4
        assert float(row["decode_tps_mean"]) == np.mean(samples).round(4) or \
            abs(float(row["decode_tps_mean"]) - np.mean(samples)) < 1e-3
    # the phases moved the raw speeds by far more than 5 %, and the same for both runs in a round
    full, h2o = (json.loads(r["decode_tps_samples"]) for r in sorted(rows, key=lambda r: r["kv_h2o_policy"]))
    assert max(full) / min(full) > 1.1
    assert all(abs(a / b - 1) < 0.05 for a, b in zip(h2o, full))
    proc = h2okit("analyze", "--csv", str(out / "m.csv"), "--out", str(out / "summary.md"),
                  "--decode-baseline", "auto")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    speed = [c for c in summary["gate"]["criteria"] if "decode" in c["name"] or "prefill" in c["name"]]
    assert speed and all(c["verdict"] != "FAIL" for c in speed)


def test_aa_analysis_never_fails_speed_or_quality_over_many_noisy_sweeps(tmp_path):
    """500 simulated A/A sweeps on a machine whose bandwidth phase moves every round by up to ±60 %
    (shared by the runs of a round) with 3 % noise of each run's own; quality is the same on every
    window (no eviction happens). Unpaired, such noise would FAIL a 5 % criterion all the time."""
    rng = np.random.default_rng(2026)
    verdicts = []
    for trial in range(500):
        rounds = int(rng.integers(2, 6))
        phase = rng.uniform(0.4, 1.6, rounds)
        runs = []
        for name, policy in (("full", "full"), ("aa", "h2o")):
            decode = 25.0 * phase * rng.normal(1.0, 0.03, rounds)
            prefill = 400.0 * phase * rng.normal(1.0, 0.03, rounds)
            runs.append({"model": "m", "run_id": name, "kv_h2o_policy": policy, "kv_true_ratio_mean": 1.0,
                         "decode_tps_mean": decode.mean(), "decode_tps_samples": json.dumps(decode.tolist()),
                         "prefill_tps_mean": prefill.mean(), "prefill_tps_samples": json.dumps(prefill.tolist()),
                         "ppl_delta_pct_mean": 0.0, "ppl_delta_pct_std": 0.0, "quality_windows_mean": 24,
                         "log_file": f"{name}.log"})
        if trial < 2:  # the whole analysis, through the CSV; the rest re-runs only the gate's statistics
            csv_path = tmp_path / "aa.csv"
            pd.DataFrame(runs).to_csv(csv_path, index=False)
            gate = analyze(csv_path, tmp_path / "summary.md", GateSettings(decode_baseline="auto"))["gate"]
            assert {c["name"] for c in gate["criteria"]} == {"decode speed ratio", "prefill speed ratio",
                                                             "ppl increase %"}
        else:
            df = pd.DataFrame(runs).assign(label=lambda d: d["run_id"])
            gate = judge(df, GateSettings(decode_baseline="auto"))
        verdicts += [c["verdict"] for c in gate["criteria"]]
    assert "FAIL" not in verdicts
    assert verdicts.count("PASS") > len(verdicts) * 0.5  # it usually decides, too


def test_the_aa_preset_is_the_check_the_readme_describes():
    grid = load_preset(ROOT / "exp" / "h2o_v2" / "configs" / "aa.json")
    assert grid.axes["h2o_policies"] == ["full", "h2o"] and grid.quality
    assert grid.axes["h2o_trigger_min_tokens"] == [100000] and grid.axes["prompts"] == [256]
