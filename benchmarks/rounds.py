"""Interleaved rounds, the one timing schedule of the side-by-side benchmarks: every configuration runs
once per round, one after the other (never two at once), so all of them see the same phases of the
machine; round 0 is a warm-up and is not kept."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def interleaved(runs: dict[str, Callable[[], T]], reps: int, label: str = "") -> dict[str, list[T]]:
    """Per configuration, its `reps` measured results (round 0, the warm-up, is dropped)."""
    samples: dict[str, list[T]] = {name: [] for name in runs}
    for rnd in range(reps + 1):
        for name, run in runs.items():
            result = run()
            if rnd:
                samples[name].append(result)
        print(f"  {label}round {rnd}/{reps} done", file=sys.stderr, flush=True)
    return samples
