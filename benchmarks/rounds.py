"""Interleaved rounds, the one timing schedule of the side-by-side benchmarks: every configuration runs
once per round, one after the other (never two at once), so all of them see the same phases of the
machine; round 0 is a warm-up and is not kept."""

from __future__ import annotations

import sys
import time
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


def prefilled(engine, prompts: list[list[int]]) -> Callable[[Callable], float]:
    """The prompts prefilled by `engine` (one cache each), and `step(stepper) -> seconds`: one decode step
    of all of them by `stepper(caches, tokens, positions) -> logits` (FastDecoder.step_batch, or a
    variant of it), timed without the greedy argmax that feeds the next step its tokens."""
    caches = [engine.new_cache() for _ in prompts]
    feed = [int(engine.forward(cache, prompt, 0)[-1].argmax()) for cache, prompt in zip(caches, prompts)]
    position = [len(prompts[0])]

    def step(stepper: Callable) -> float:
        started = time.perf_counter()
        logits = stepper(caches, feed, [position[0]] * len(caches))
        seconds = time.perf_counter() - started
        feed[:] = logits.argmax(-1).tolist()
        position[0] += 1
        return seconds
    return step


def alternating_steps(engine, prompts: list[list[int]], steppers: dict[str, Callable], steps: int,
                      label: str = "") -> dict[str, list[float]]:
    """Per stepper, the seconds of its fused decode steps: the prompts prefilled once (`prefilled`), then
    the steppers taking turns (`interleaved`) on the same caches, so all see the same cache lengths and
    the same phases of the machine."""
    step = prefilled(engine, prompts)
    return interleaved({name: (lambda s=stepper: step(s)) for name, stepper in steppers.items()}, steps, label)
