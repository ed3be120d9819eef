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

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from .grid import Grid, GridError, Run, expand
from .parse import parse_log_text

MANIFEST = "manifest.json"
STDERR_TAIL_LINES = 20


@dataclass
class RunSpec:
    """Everything needed to execute one run on any machine with llm_bench installed."""

    run_id: str
    llm_bench: list[str]  # ["llm_bench"] means h2okit's own, found where the run executes
    args: list[str]  # flags after the binary, with {config} and {log} placeholders
    config_text: str
    threads: int = 1  # CPUs the run needs (a Ray task reserves them)


@dataclass
class RunOutcome:
    run_id: str
    returncode: int
    log_text: str
    console_text: str
    seconds: float
    error: str = ""


def execute_run(spec: RunSpec, timeout: float | None = None) -> RunOutcome:
    """Run llm_bench for one spec in a scratch folder; return its log and console texts."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="h2okit-run-") as tmp:
        config, log = Path(tmp) / "config.json", Path(tmp) / "run.log"
        config.write_text(spec.config_text)
        argv = local_argv(spec.llm_bench) + [a.format(config=config, log=log) for a in spec.args]
        try:
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    start_new_session=True)  # Ctrl-C reaches the driver, which stops us
        except OSError as exc:
            return RunOutcome(spec.run_id, 127, "", "", time.perf_counter() - started, f"cannot start: {exc}")
        try:
            console, _ = proc.communicate(timeout=timeout)
        except BaseException:  # KeyboardInterrupt or timeout: do not leave llm_bench running
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait()
            raise
        log_text = log.read_text(errors="replace") if log.exists() else ""
    error = "" if proc.returncode == 0 else f"llm_bench exited with {proc.returncode}"
    return RunOutcome(spec.run_id, proc.returncode, log_text, console, time.perf_counter() - started, error)


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
    if not path.exists():
        raise GridError(f"llm_bench not found at {value}; pass `llm_bench` for h2okit's own, or the path to "
                        f"an MNN llm_bench binary")
    if not os.access(path, os.X_OK):
        raise GridError(f"{value} is not executable")
    with path.open("rb") as f:
        ours = b"h2okit" in f.read(4096)  # our console script is a small Python file naming h2okit
    return [str(path.resolve())], ours


def build_specs(runs: list[Run], base_config: dict, llm_bench: list[str], ours: bool, backend: str,
                attention_option: int, repeat: int, quality: bool) -> dict[str, RunSpec]:
    specs = {}
    for run in runs:
        config = {**base_config, **run.kv, "thread_num": run.threads}
        args = ["-m", "{config}", "-a", backend, "-t", str(run.threads), "-qatten", str(attention_option),
                "-kv", "true", "-p", str(run.prompt), "-n", str(run.gen), "-rep", str(repeat), "-fp", "{log}"]
        if quality and ours:
            args.append("--quality")
        specs[run.run_id] = RunSpec(run.run_id, llm_bench, args, json.dumps(config, indent=1), run.threads)
    return specs


def log_is_complete(path: Path) -> bool:
    if not path.is_file():
        return False
    rows, warnings = parse_log_text(path.read_text(errors="replace"), str(path))
    return bool(rows) and not warnings


def write_json_atomic(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


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


def sweep(grid: Grid, base_config: dict, base_config_path: str, llm_bench: str, out_dir: Path,
          backend: str = "cpu", attention_option: int = 0, resume: bool = False, dry_run: bool = False,
          executor=None, log=print) -> SweepResult:
    argv, ours = resolve_llm_bench(llm_bench)
    if grid.quality and not ours:
        raise GridError("quality columns need h2okit's own llm_bench; drop quality for an external binary")
    runs = expand(grid, {k: v for k, v in base_config.items() if k.startswith("kv_")})
    for note in grid.notes:
        log(f"note: {note}")
    specs = build_specs(runs, base_config, argv, ours, backend, attention_option, grid.repeat, grid.quality)
    out_dir = Path(out_dir)
    manifest_path = out_dir / MANIFEST
    records = {run.run_id: {"run_id": run.run_id, "idx": run.idx, "params": run.params(),
                            "config": f"configs/{run.run_id}.json", "log": f"logs/{run.run_id}.log",
                            "console": f"logs/{run.run_id}.console.txt", "status": "pending",
                            "returncode": None, "seconds": None, "error": "", "stderr_tail": ""} for run in runs}
    if out_dir.exists() and any(out_dir.iterdir()):
        if not resume:
            raise GridError(f"out-dir {out_dir} is not empty (an earlier sweep?); pass --resume to continue it "
                            f"or choose a new --out-dir")
        if not manifest_path.is_file():
            raise GridError(f"--resume: {out_dir} has no {MANIFEST}; it is not a sweep folder")
        old = json.loads(manifest_path.read_text())
        old_runs = {r["run_id"]: r for r in old.get("runs", [])}
        if {k: r["params"] for k, r in old_runs.items()} != {k: r["params"] for k, r in records.items()}:
            raise GridError(f"--resume: the grid differs from the one in {manifest_path}; use a new --out-dir")
        for rid, rec in records.items():
            prior = old_runs[rid]
            if prior.get("status") == "ok" and log_is_complete(out_dir / rec["log"]):
                records[rid] = prior
    (out_dir / "configs").mkdir(parents=True, exist_ok=True)
    (out_dir / "logs").mkdir(parents=True, exist_ok=True)
    manifest = {"tool": "h2okit", "format": 1, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "llm_bench": argv, "llm_bench_is_h2okit": ours, "base_config": str(base_config_path),
                "backend": backend, "attention_option": attention_option, "grid": grid.to_json(),
                "notes": grid.notes, "executor": getattr(executor, "name", "local"), "runs": list(records.values())}

    def save():
        manifest["runs"] = list(records.values())
        write_json_atomic(manifest_path, manifest)

    for rid, spec in specs.items():
        (out_dir / records[rid]["config"]).write_text(spec.config_text)
    todo = [specs[rid] for rid, rec in records.items() if rec["status"] != "ok"]
    skipped = len(records) - len(todo)
    if skipped:
        log(f"resume: {skipped} run(s) already complete, {len(todo)} to run")
    if dry_run:
        for spec in todo:
            cmd = local_argv(spec.llm_bench) + [a.format(config=out_dir / records[spec.run_id]["config"],
                                             log=out_dir / records[spec.run_id]["log"]) for a in spec.args]
            log(" ".join(str(c) for c in cmd))
        save()
        return SweepResult(out_dir, len(records), skipped, [])
    save()
    result = SweepResult(out_dir, len(records), skipped, [])
    executor = executor or LocalExecutor()
    from .progress import SweepProgress

    with SweepProgress(len(todo)) as progress:
        def on_start(spec: RunSpec):
            records[spec.run_id]["status"] = "running"
            progress.start(spec.run_id)

        def on_done(outcome: RunOutcome):
            rec = records[outcome.run_id]
            log_path = out_dir / rec["log"]
            log_path.write_text(outcome.log_text)
            (out_dir / rec["console"]).write_text(outcome.console_text)
            complete = outcome.returncode == 0 and log_is_complete(log_path)
            rec.update(returncode=outcome.returncode, seconds=round(outcome.seconds, 2),
                       status="ok" if complete else "failed",
                       error=outcome.error or ("" if complete else "llm_bench wrote no complete table"),
                       stderr_tail="" if complete else "\n".join(outcome.console_text.splitlines()[-STDERR_TAIL_LINES:]))
            if not complete:
                result.failed.append(outcome.run_id)
            save()
            progress.done(outcome.run_id, rec["status"], outcome.seconds)

        try:
            executor.run(todo, on_start, on_done)
        except KeyboardInterrupt:
            for rec in records.values():
                if rec["status"] == "running":
                    rec["status"] = "interrupted"
            save()
            result.interrupted = True
    return result
