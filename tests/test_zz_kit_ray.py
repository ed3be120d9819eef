# Runs last (file name): starting Ray leaves SIGINT ignored in the pytest process, which a Ctrl-C test elsewhere needs.
"""The Ray executor: same out-dir, manifest and CSV as the local executor; failures recorded."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ray")
ROOT = Path(__file__).resolve().parents[1]
FAKE = ROOT / "tests" / "data" / "fake_llm_bench.py"
BASE = ROOT / "configs" / "smollm2-135m.json"
TIMING = ("seconds", "speed(tok/s)", "prefill_tps", "decode_tps", "_us", "quality_s", "log_file", "console")


def h2okit(*args):
    return subprocess.run([sys.executable, "-m", "h2okit.cli", *args], capture_output=True, text=True, timeout=900)


def sweep(out, executor, llm_bench, *grid):
    return h2okit("grid", "--executor", executor, "--llm-bench", str(llm_bench), "--base-config", str(BASE),
                  "--out-dir", str(out), *grid)


def runs(out):
    return [{k: r[k] for k in ("run_id", "params", "status", "returncode", "config", "log")}
            for r in json.loads((out / "manifest.json").read_text())["runs"]]


def csv_rows(out):
    proc = h2okit("parse", "--log-dir", str(out / "logs"), "--out-csv", str(out / "m.csv"))
    assert proc.returncode == 0, proc.stderr
    with (out / "m.csv").open() as f:
        return sorted(({k: v for k, v in r.items() if not any(t in k for t in TIMING)} for r in csv.DictReader(f)),
                      key=lambda r: r["run_id"])


def test_ray_matches_local_and_records_a_broken_run(tmp_path):
    grid = ["--prompts", "256,512", "--gens", "8", "--repeat", "1", "--h2o-target-mode", "static",
            "--h2o-keep-ratios", "0.3,0.5", "--h2o-block-tokens", "32,13"]
    local, ray = tmp_path / "local", tmp_path / "ray"
    assert sweep(local, "local", FAKE, *grid).returncode == 2
    proc = sweep(ray, "ray", FAKE, *grid)
    assert proc.returncode == 2, proc.stderr
    assert runs(ray) == runs(local)
    failed = [r for r in runs(ray) if r["status"] == "failed"]
    assert len(failed) == 4 and all(r["params"]["kv_h2o_block_tokens"] == 13 for r in failed)
    assert sorted(p.name for p in (ray / "logs").iterdir()) == sorted(p.name for p in (local / "logs").iterdir())
    assert csv_rows(ray) == csv_rows(local)
    assert json.loads((ray / "manifest.json").read_text())["executor"] == "ray"


def test_without_ray_the_error_says_how_to_install_it(tmp_path):
    code = ("import sys; sys.modules['ray'] = None; from h2okit.cli import main; "
            f"sys.exit(main(['grid', '--executor', 'ray', '--llm-bench', '{FAKE}', '--base-config', '{BASE}', "
            f"'--out-dir', '{tmp_path / 'o'}']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 2 and "pip install 'h2okit[ray]'" in proc.stderr
    assert proc.stderr.strip().count("\n") == 0


@pytest.mark.model
def test_ray_on_the_real_model_matches_local(tmp_path):
    grid = ["--prompts", "96", "--gens", "8", "--repeat", "1", "--h2o-target-mode", "static",
            "--h2o-keep-ratios", "0.5,0.8", "--h2o-block-tokens", "16", "--h2o-sink-tokens", "16",
            "--h2o-recent-tokens", "16", "--h2o-trigger-min-tokens", "64", "--h2o-update-intervals", "4"]
    local, ray = tmp_path / "local", tmp_path / "ray"
    assert sweep(local, "local", "llm_bench", *grid).returncode == 0
    proc = sweep(ray, "ray", "llm_bench", *grid)
    assert proc.returncode == 0, proc.stderr
    assert runs(ray) == runs(local) and all(r["status"] == "ok" for r in runs(ray))
    assert csv_rows(ray) == csv_rows(local)  # every non-timing number identical
    for out in (local, ray):
        assert h2okit("analyze", "--csv", str(out / "m.csv"), "--out", str(out / "summary.md")).returncode == 0
    s_local, s_ray = (json.loads((o / "summary.json").read_text()) for o in (local, ray))
    assert s_ray["runs"] == s_local["runs"] == 2
    assert s_ray["best_true_ratio"] == s_local["best_true_ratio"]
    assert s_ray["best_lossy"] == s_local["best_lossy"]


def test_a_task_that_raises_is_retried_then_recorded():
    import ray

    from h2okit.kit.ray_executor import RayExecutor
    from h2okit.kit.sweep import RunSpec

    good = RunSpec("good", [str(FAKE)], ["-m", "{config}", "-a", "cpu", "-t", "1", "-qatten", "0", "-kv", "true",
                                         "-p", "8", "-n", "2", "-rep", "1", "-fp", "{log}"],
                   json.dumps({"kv_h2o_target_mode": "static"}), threads=1)
    broken = RunSpec("broken", [str(FAKE)], [], None, threads=1)  # config_text=None: writing it raises
    started, outcomes = [], {}
    try:
        RayExecutor(num_cpus=2, max_retries=1).run([good, broken], lambda s: started.append(s.run_id),
                                                   lambda o: outcomes.update({o.run_id: o}))
    finally:
        ray.shutdown()
    assert started == ["good", "broken"]
    assert outcomes["good"].returncode == 0 and "| fake |" in outcomes["good"].log_text
    assert outcomes["broken"].returncode == -1
    assert "after 1 retries" in outcomes["broken"].error and "TypeError" in outcomes["broken"].error
