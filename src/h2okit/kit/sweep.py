"""Run a grid through `llm_bench` (ours or MNN's), one process per run, into an out-dir:

    OUT/manifest.json            one record per run: parameters, config, log, status, return code
    OUT/configs/<run_id>.json    the exact config the run used
    OUT/logs/<run_id>.log        what llm_bench wrote with -fp (the table)
    OUT/logs/<run_id>.console.txt  its stdout and stderr

The kit talks to llm_bench only through its command line and log format. An executor runs
a `RunSpec` anywhere (here, or on a Ray worker) and hands back texts; only the driver writes
the out-dir, so its layout is the same whichever executor ran the runs.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable

from filelock import FileLock, Timeout

from ..io import write_json_atomic
from .grid import Grid, GridError, Run, expand
from .parse import parse_log_text

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
LOCK = ".sweep.lock"
STDERR_TAIL_LINES = 20


@dataclass
class RunSpec:
    """Everything needed to execute one run on any machine with llm_bench installed."""

    run_id: str
    llm_bench: list[str]  # ["llm_bench"] means h2okit's own, found where the run executes
    args: list[str]  # flags after the binary, with {config} and {log} placeholders
    config_text: str
    threads: int = 1  # CPUs the run needs (a Ray task reserves them)
    round: int = 1  # which repetition of the run this invocation measures (0: the shared warm-up)


@dataclass
class RunOutcome:
    run_id: str
    returncode: int
    log_text: str
    console_text: str
    seconds: float
    error: str = ""
    round: int = 1
    results_jsonl: str = ""  # h2okit's llm_bench: its `-o jsonl` stdout (every sample, per window)


SCRATCH_PREFIX = "h2okit-run-"


# Ctrl-C during a sweep, remembered (see _on_sigint)
_interrupt_requested = threading.Event()


def _on_sigint(signum, frame) -> None:
    """Ctrl-C: remember it, then raise KeyboardInterrupt as Python's own handler does. Remembering is
    what makes it stick: a KeyboardInterrupt raised while an at-fork callback runs (filelock registers
    one; every llm_bench start forks) is printed as "Exception ignored" and swallowed by Python, and
    the sweep went on to the end with exit 0."""
    _interrupt_requested.set()
    raise KeyboardInterrupt


def _raise_if_interrupted() -> None:
    if _interrupt_requested.is_set():
        raise KeyboardInterrupt


def _die_with_parent() -> None:
    """In the child before exec: its own process group (Ctrl-C reaches the driver, which stops it),
    and SIGKILL when the sweep process dies, even by kill -9 (Linux's parent-death signal)."""
    os.setsid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the process-group kill on exit still applies


def clean_stale_scratch() -> int:
    """Remove scratch folders left by sweeps that were killed (their pid, in the name, is gone)."""
    removed = 0
    for folder in Path(tempfile.gettempdir()).glob(f"{SCRATCH_PREFIX}*-*"):
        try:
            pid = int(folder.name[len(SCRATCH_PREFIX):].split("-", 1)[0])
        except ValueError:
            continue
        if not _alive(pid):
            shutil.rmtree(folder, ignore_errors=True)
            removed += 1
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def execute_run(spec: RunSpec, timeout: float | None = None) -> RunOutcome:
    """Run llm_bench for one spec in a scratch folder; return its log, stdout and console texts."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-") as tmp:
        config, log = Path(tmp) / "config.json", Path(tmp) / "run.log"
        config.write_text(spec.config_text)
        argv = local_argv(spec.llm_bench) + [a.format(config=config, log=log) for a in spec.args]
        try:
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    preexec_fn=_die_with_parent)
        except OSError as exc:
            return RunOutcome(spec.run_id, 127, "", "", time.perf_counter() - started, f"cannot start: {exc}",
                              spec.round)
        try:
            _raise_if_interrupted()  # a Ctrl-C that arrived while the child was being forked
            stdout, stderr = proc.communicate(timeout=timeout)
        except BaseException:  # KeyboardInterrupt or timeout: do not leave llm_bench running
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        log_text = log.read_text(errors="replace") if log.exists() else ""
    error = "" if proc.returncode == 0 else f"llm_bench exited with {proc.returncode}"
    json_out = "-o" in spec.args and spec.args[spec.args.index("-o") + 1] == "jsonl"
    console = stderr if json_out else stdout + stderr
    return RunOutcome(spec.run_id, proc.returncode, log_text, console, time.perf_counter() - started, error,
                      spec.round, stdout if json_out else "")


OWN_LLM_BENCH = ["llm_bench"]


def local_argv(llm_bench: list[str]) -> list[str]:
    """h2okit's own llm_bench as installed here (console script, else `python -m h2okit.bench`)."""
    if llm_bench != OWN_LLM_BENCH:
        return llm_bench
    found = shutil.which("llm_bench")
    return [found] if found else [sys.executable, "-m", "h2okit.bench"]


def resolve_llm_bench(value: str) -> tuple[list[str], bool]:
    """(argv prefix, is h2okit's own). `llm_bench` means ours; a path may be ours or MNN's."""
    if value in ("llm_bench", "h2okit"):
        return list(OWN_LLM_BENCH), True
    path = Path(value)
    if path.is_dir():
        raise GridError(f"--llm-bench {value} is a folder; give the llm_bench binary (or `llm_bench` for h2okit's)")
    if not path.exists():
        raise GridError(f"llm_bench not found at {value}; pass `llm_bench` for h2okit's own, or the path to "
                        f"an MNN llm_bench binary")
    if not os.access(path, os.X_OK):
        raise GridError(f"{value} is not executable")
    with path.open("rb") as f:
        ours = b"h2okit" in f.read(4096)  # our console script is a small Python file naming h2okit
    return [str(path.resolve())], ours


def build_specs(runs: list[Run], base_config: dict, llm_bench: list[str], ours: bool, backend: str,
                attention_option: int, quality: bool, round_index: int) -> dict[str, RunSpec]:
    """One llm_bench invocation per run for round `round_index` (1-based): one measured repetition
    (`-rep 1`; llm_bench's own warm-up request comes first). Quality is deterministic, so it is
    evaluated once, in round 1."""
    specs = {}
    for run in runs:
        config = {**base_config, **run.kv, "thread_num": run.threads}
        args = ["-m", "{config}", "-a", backend, "-t", str(run.threads), "-qatten", str(attention_option),
                "-kv", "true", "-p", str(run.prompt), "-n", str(run.gen), "-rep", "1", "-fp", "{log}"]
        if ours:  # h2okit's own binary also prints every sample as JSON lines (kept beside the MNN log)
            args += ["-o", "jsonl"]
        if quality and ours and round_index == 1:
            args.append("--quality")
        specs[run.run_id] = RunSpec(run.run_id, llm_bench, args, json.dumps(config, indent=1), run.threads,
                                    round_index)
    return specs


def check_configs(llm_bench: list[str], configs: dict[str, dict]) -> None:
    """Every run's config through `llm_bench --check-config` (one process for all) before anything runs."""
    with tempfile.TemporaryDirectory(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-") as tmp:
        paths = []
        for run_id, config in configs.items():
            paths.append(Path(tmp) / f"{run_id}.json")
            paths[-1].write_text(json.dumps(config))
        proc = subprocess.run(local_argv(llm_bench) + ["--check-config", *map(str, paths)], capture_output=True,
                              text=True)
    clamps = [line.split("warning: ", 1)[1] for line in proc.stderr.splitlines()
              if line.startswith("llm_bench: warning: ") and "out of range" in line]
    if proc.returncode == 0 and clamps:  # a swept value must run as given, or the run id would lie
        first = clamps[0].replace(tmp + "/", "").replace(".json: ", ": ", 1)
        raise GridError(f"run {first}; give values in range (llm_bench would clamp them)")
    if proc.returncode != 0:
        prefix = "llm_bench: error: "
        errors = [line[len(prefix):] for line in proc.stderr.splitlines() if line.startswith(prefix)]
        first = errors[0].split("the first: ", 1)[-1] if errors else \
            f"llm_bench --check-config exited with {proc.returncode}"
        raise GridError(f"run {first.replace(tmp + '/', '').replace('.json: ', ': ', 1)}")


def log_tables(path: Path) -> int:
    """Complete table rows in a run's log (one per finished round); 0 if any row is torn."""
    if not path.is_file():
        return 0
    rows, warnings = parse_log_text(path.read_text(errors="replace"), str(path))
    return 0 if warnings else len(rows)


def log_is_complete(path: Path) -> bool:
    return log_tables(path) > 0


class LocalExecutor:
    """Runs one after another on this machine, so that timings do not disturb each other."""

    name = "local"

    def run(self, specs: Iterable[RunSpec], on_start: Callable[[RunSpec], None],
            on_done: Callable[[RunOutcome], None]) -> None:
        for spec in specs:
            on_start(spec)
            on_done(execute_run(spec))


@dataclass
class SweepResult:
    out_dir: Path
    total: int
    skipped: int
    failed: list[str]
    interrupted: bool = False

    @property
    def exit_code(self) -> int:
        return 130 if self.interrupted else (2 if self.failed else 0)


def _new_record(run: Run, rounds: int) -> dict:
    return {"run_id": run.run_id, "idx": run.idx, "params": run.params(), "config": f"configs/{run.run_id}.json",
            "log": f"logs/{run.run_id}.log", "console": f"logs/{run.run_id}.console.txt",
            "results": f"logs/{run.run_id}.jsonl", "status": "pending",
            "returncode": None, "seconds": None, "error": "", "stderr_tail": "",
            "rounds": [{"round": r, "status": "pending", "returncode": None, "seconds": None}
                       for r in range(1, rounds + 1)]}


def _resume_records(out_dir: Path, records: dict[str, dict]) -> None:
    """Take over the finished rounds of an earlier sweep of the same grid (a run whose log does not
    hold one table per finished round starts again from round 1)."""
    manifest_path = out_dir / MANIFEST
    if not manifest_path.is_file():
        raise GridError(f"--resume: {out_dir} has no {MANIFEST}; it is not a sweep folder")
    try:
        old = json.loads(manifest_path.read_text())
        old_runs = {r["run_id"]: r for r in old["runs"]}
        same = {k: r["params"] for k, r in old_runs.items()} == {k: r["params"] for k, r in records.items()}
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
        raise GridError(f"--resume: {manifest_path} is not a manifest h2okit can continue (corrupt or from "
                        f"another tool); use a new --out-dir") from None
    if not same:
        raise GridError(f"--resume: the grid differs from the one in {manifest_path}; use a new --out-dir")
    for rid, rec in records.items():
        prior = old_runs[rid]
        done = [r for r in prior.get("rounds", []) if r.get("status") == "ok"]
        if len(prior.get("rounds", [])) != len(rec["rounds"]) or log_tables(out_dir / rec["log"]) != len(done):
            for key in ("log", "console", "results"):
                (out_dir / rec[key]).unlink(missing_ok=True)
            continue
        rec.update({k: prior[k] for k in ("returncode", "seconds", "error", "stderr_tail") if k in prior})
        rec["rounds"] = prior["rounds"]
        rec["status"] = "ok" if len(done) == len(rec["rounds"]) else "pending"


def _lock_out_dir(out_dir: Path) -> FileLock:
    """One sweep per out-dir at a time: a second one (say, two `--resume`s) is refused with one line."""
    if out_dir.exists() and not out_dir.is_dir():
        raise GridError(f"--out-dir {out_dir} is a file; give a folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise GridError(f"--out-dir {out_dir}: cannot create it ({exc.strerror})") from None
    lock = FileLock(out_dir / LOCK)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise GridError(f"out-dir {out_dir} is in use by another sweep (lock {out_dir / LOCK}); wait for it to "
                        f"finish or choose another --out-dir") from None
    except OSError as exc:
        raise GridError(f"--out-dir {out_dir}: cannot lock it ({exc.strerror})") from None
    return lock


def _prepare_out_dir(out_dir: Path, records: dict[str, dict], resume: bool) -> None:
    if any(p.name != LOCK for p in out_dir.iterdir()):
        if not resume:
            raise GridError(f"out-dir {out_dir} is not empty (an earlier sweep?); pass --resume to continue it "
                            f"or choose a new --out-dir")
        _resume_records(out_dir, records)
    (out_dir / "configs").mkdir(parents=True, exist_ok=True)
    (out_dir / "logs").mkdir(parents=True, exist_ok=True)


def sweep(grid: Grid, base_config: dict, base_config_path: str, llm_bench: str, out_dir: Path,
          backend: str = "cpu", attention_option: int = 0, resume: bool = False, dry_run: bool = False,
          executor=None) -> SweepResult:
    """Run every run of the grid `grid.repeat` times, interleaved: round r runs each run's r-th
    repetition before round r+1 starts, so all runs see the same phases of the machine (its read
    bandwidth drifts within minutes); a paired comparison per round then cancels the drift."""
    argv, ours = resolve_llm_bench(llm_bench)
    if grid.quality and not ours:
        raise GridError("quality columns need h2okit's own llm_bench; drop quality for an external binary")
    threads = base_config.get("thread_num", 2)
    runs = expand(grid, {k: v for k, v in base_config.items() if k.startswith("kv_")},
                  threads if isinstance(threads, int) and threads >= 1 else 2)
    for note in grid.notes:
        log.info("note: %s", note)
    if ours:
        check_configs(argv, {rid: json.loads(spec.config_text) for rid, spec in build_specs(
            runs, base_config, argv, ours, backend, attention_option, False, 1).items()})
    else:
        log.info("note: %s is not h2okit's llm_bench: kv_* keys go to it unchecked", llm_bench)
    rounds = {r: build_specs(runs, base_config, argv, ours, backend, attention_option, grid.quality, r)
              for r in range(1, grid.repeat + 1)}
    out_dir = Path(out_dir)
    records = {run.run_id: _new_record(run, grid.repeat) for run in runs}
    lock = _lock_out_dir(out_dir)
    try:
        return _sweep_locked(grid, runs, rounds, records, argv, ours, base_config_path, out_dir, backend,
                             attention_option, resume, dry_run, executor)
    finally:
        lock.release()


def _sweep_locked(grid, runs, rounds, records, argv, ours, base_config_path, out_dir, backend, attention_option,
                  resume, dry_run, executor) -> SweepResult:
    clean_stale_scratch()
    _prepare_out_dir(out_dir, records, resume)
    manifest = {"tool": "h2okit", "format": 2, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "llm_bench": argv, "llm_bench_is_h2okit": ours, "base_config": str(base_config_path),
                "backend": backend, "attention_option": attention_option, "grid": grid.to_json(),
                "schedule": "interleaved rounds: every run's repetition r before any run's r+1",
                "notes": grid.notes, "executor": getattr(executor, "name", "local"), "runs": list(records.values())}

    def save():
        manifest["runs"] = list(records.values())
        write_json_atomic(out_dir / MANIFEST, manifest)

    for rid, spec in rounds[1].items():
        (out_dir / records[rid]["config"]).write_text(spec.config_text)
    todo = {r: [spec for rid, spec in specs.items() if records[rid]["rounds"][r - 1]["status"] != "ok"]
            for r, specs in rounds.items()}
    todo = {r: specs for r, specs in todo.items() if specs}
    invocations = sum(len(specs) for specs in todo.values())
    skipped = sum(1 for rec in records.values() if rec["status"] == "ok")
    if skipped or (resume and invocations):
        log.info("resume: %d run(s) already complete, %d invocation(s) of %d to run", skipped, invocations,
                 len(records) * grid.repeat)
    result = SweepResult(out_dir, len(records), skipped, [])
    if dry_run:
        for specs in todo.values():
            for spec in specs:
                rec = records[spec.run_id]
                cmd = local_argv(spec.llm_bench) + [a.format(config=out_dir / rec["config"], log=out_dir / rec["log"])
                                                    for a in spec.args]
                log.info(" ".join(str(c) for c in cmd))
        save()
        return result
    save()
    _run_rounds(todo, records, out_dir, executor or LocalExecutor(), save, result, manifest)
    return result


def _run_rounds(todo: dict[int, list[RunSpec]], records: dict[str, dict], out_dir: Path, executor, save,
                result: SweepResult, manifest: dict) -> None:
    from .progress import SweepProgress

    total = sum(len(specs) for specs in todo.values())
    with SweepProgress(total + (1 if total else 0)) as progress:
        def on_start(spec: RunSpec):
            _raise_if_interrupted()
            if spec.round:
                records[spec.run_id]["status"] = "running"
            progress.start(spec.run_id if spec.round else f"warm-up ({spec.run_id})",
                           spec.round, max(todo) if todo else 0)

        def on_done(outcome: RunOutcome):
            if outcome.round == 0:  # the shared warm-up: only its time is kept
                manifest["warmup"] = {"run_id": outcome.run_id, "returncode": outcome.returncode,
                                      "seconds": round(outcome.seconds, 2)}
                progress.done("warm-up", "ok" if outcome.returncode == 0 else "failed", outcome.seconds)
                return
            _record_round(records[outcome.run_id], outcome, out_dir, result)
            save()
            progress.done(f"{outcome.run_id} round {outcome.round}", records[outcome.run_id]["rounds"][
                outcome.round - 1]["status"], outcome.seconds)

        _interrupt_requested.clear()
        in_main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, _on_sigint) if in_main else None
        try:
            if total:  # one shared warm-up (page cache, kernels, CPU clocks), so round 1 is like the others
                first = next(iter(todo.values()))[0]
                executor.run([replace(first, round=0, args=[a for a in first.args if a != "--quality"])],
                             on_start, on_done)
            for specs in todo.values():
                executor.run(specs, on_start, on_done)
            _raise_if_interrupted()  # one swallowed during the last run's fork
        except KeyboardInterrupt:
            for rec in records.values():
                if rec["status"] == "running":
                    rec["status"] = "interrupted"
            save()
            result.interrupted = True
        finally:
            if in_main:  # (None: the previous handler was not Python's; give back Python's default)
                signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)


def _continuing_table(log_path: Path, table: str) -> str:
    """A later round's table without its header when it matches the log's: the rounds of a run stay one
    table (one row per round), which readers that take a repeated header for a data row (the original
    kit's parser) read correctly too."""
    lines = table.splitlines(keepends=True)
    if log_path.stat().st_size == 0 or len(lines) < 3:
        return table
    with log_path.open() as f:
        first = f.readline()
    return "".join(lines[2:]) if lines[0] == first else table


def _record_round(rec: dict, outcome: RunOutcome, out_dir: Path, result: SweepResult) -> None:
    """Append one round's table to the run's log (only a complete one) and update its record."""
    rows, warnings = parse_log_text(outcome.log_text, rec["log"])
    complete = outcome.returncode == 0 and bool(rows) and not warnings
    with (out_dir / rec["console"]).open("a") as f:
        f.write(f"=== round {outcome.round} ===\n{outcome.console_text}")
    if complete:
        log_path = out_dir / rec["log"]
        with log_path.open("a") as f:
            f.write(_continuing_table(log_path, outcome.log_text))
        if outcome.results_jsonl:
            with (out_dir / rec["results"]).open("a") as f:
                f.write(outcome.results_jsonl)
    round_rec = rec["rounds"][outcome.round - 1]
    round_rec.update(status="ok" if complete else "failed", returncode=outcome.returncode,
                     seconds=round(outcome.seconds, 2))
    error = outcome.error or ("" if complete else "llm_bench wrote no complete table")
    rec.update(returncode=outcome.returncode, seconds=round(sum(r["seconds"] or 0 for r in rec["rounds"]), 2))
    if not complete:
        rec.update(error=error, stderr_tail="\n".join(outcome.console_text.splitlines()[-STDERR_TAIL_LINES:]))
        if rec["run_id"] not in result.failed:
            result.failed.append(rec["run_id"])
    statuses = [r["status"] for r in rec["rounds"]]
    rec["status"] = "failed" if "failed" in statuses else ("ok" if set(statuses) == {"ok"} else "pending")
