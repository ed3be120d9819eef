"""Sweep progress on stderr: a bar with invocations done, the current round and run and the ETA, plus one
line per invocation."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class SweepProgress:
    def __init__(self, total: int):
        self.console = Console(file=sys.stderr)
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                 console=self.console, transient=False)
        self.total = total
        self.task = None

    def __enter__(self):
        self.progress.__enter__()
        self.task = self.progress.add_task("sweep", total=self.total)
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def start(self, run_id: str, round_index: int = 1, rounds: int = 1) -> None:
        where = f"round {round_index}/{rounds}: " if round_index else ""
        self.progress.update(self.task, description=f"{where}{run_id}")

    def done(self, run_id: str, status: str, seconds: float) -> None:
        self.progress.console.print(f"{run_id}: {status} ({seconds:.1f} s)")
        self.progress.advance(self.task)
        if self.progress.tasks[0].finished:
            self.progress.update(self.task, description="sweep finished")
