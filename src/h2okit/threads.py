"""How many threads a fused decode step runs on: chosen by measurement, step after step.

A decode step has ~150 parallel loops, and OpenMP's threads spin between them. On a quiet machine
spinning is the fastest way to wait (sleeping instead cost 61 % here: waking a vCPU is slow), but
when another process wants one of the two cores, the spinning thread keeps the core it needs, and
decode fell to 0.27 of its quiet speed (docs/measurements.md, "Decode next to a busy process"). One thread never
waits for another. So the fast path times each step and keeps the faster of the configured thread
count and one thread (one thread only when clearly faster: `fewer_margin`); after `probe_every`
steps it runs one step with the other count, to notice when the machine changed. A probe that
loses doubles the wait before the next one (up to `longest_wait`), a switch resets it: a probe
next to a busy process costs ~10 one-thread steps, so a fixed interval of 32 lost ~15 % of the
busy speed. Quiet, the cost is one slower step per wait.

How long an idle OpenMP thread spins before it sleeps is libgomp's GOMP_SPINCOUNT, read once when
torch loads libgomp. Its default, 300,000 spins (3-10 ms here; waking a sleeping thread costs
30-110 us), kept the second thread spinning on a busy machine long after every two-thread moment (a
probe, the prefill, torch's own ops), and one-thread steps ran beside it. h2okit's commands set
`OPENMP_WAIT` (10,000 spins: 0.1-0.3 ms, longer than the serial stretches inside a step, even a
batch's) unless the environment already sets GOMP_SPINCOUNT or OMP_WAIT_POLICY; 1,000 spins (under
20 us) cost a wake-up at nearly every loop of a batched step (B=8 fp32 20 % slower). The fast path
keeps torch's ops out of the decode loop (the lm_head writes into a numpy array, and numpy takes the
argmax), so an idle thread stays asleep between steps. docs/measurements.md's "Decode next to a busy
process" measures it.

The chooser is pure logic (no torch, no clock): the caller times the steps.
"""

from __future__ import annotations

import contextlib
import functools
import os
import statistics
import sys
from collections import deque
from dataclasses import dataclass, field


@dataclass
class ThreadChooser:
    """`next()` is the thread count for the next step, `record(threads, seconds)` what it took."""

    most: int  # the configured thread count
    probe_every: int = 32  # steps before the first probe of the other count, and after every switch
    longest_wait: int = 512  # the most steps between two probes (the wait doubles after each lost probe)
    samples: int = 3  # recent step times kept per count; their median decides
    # fewer threads must be clearly faster to be chosen (quiet, one thread is ~2x slower; next to a busy
    # process, two threads are ~5x slower): a few slow steps of the configured count (the first steps
    # after a prefill, a page fault) then do not send a quiet machine to one thread for a whole wait
    fewer_margin: float = 0.75
    _times: dict[int, deque] = field(init=False, repr=False)
    _current: int = field(init=False)
    _since_probe: int = field(init=False, default=0)
    _wait: int = field(init=False)
    _warm: bool = field(init=False, default=False)

    def __post_init__(self):
        if self.most < 1:
            raise ValueError(f"thread count must be >= 1, got {self.most}")
        self._times = {n: deque(maxlen=self.samples) for n in self.candidates}
        self._current = self.most
        self._wait = self.probe_every

    @property
    def candidates(self) -> tuple[int, ...]:
        return (self.most, 1) if self.most > 1 else (1,)

    @property
    def current(self) -> int:
        """The count steps run on between probes."""
        return self._current

    def next(self) -> int:
        untried = [n for n in self.candidates if not self._times[n]]
        if untried:
            return untried[0]
        if len(self.candidates) > 1 and self._since_probe >= self._wait:
            return next(n for n in self.candidates if n != self._current)
        return self._current

    def record(self, threads: int, seconds: float) -> None:
        if threads not in self._times:
            raise ValueError(f"{threads} threads is not one of {self.candidates}")
        if not self._warm:  # the first step is cold (caches, first-touch pages): it was up to 3x slower here and
            self._warm = True  # could make one thread win for a whole probe interval
            return
        self._times[threads].append(seconds)
        probed = threads != self._current
        self._since_probe = 0 if probed else self._since_probe + 1
        if all(self._times.values()):
            median = {n: statistics.median(self._times[n]) for n in self.candidates}
            best = min(self.candidates, key=median.get)
            if best < self._current and median[best] >= self.fewer_margin * median[self._current]:
                best = self._current
            if best != self._current:
                self._current, self._wait = best, self.probe_every
            elif probed:
                self._wait = min(2 * self._wait, self.longest_wait)


OPENMP_WAIT = {"GOMP_SPINCOUNT": "10000"}  # libgomp's spins before an idle thread sleeps (see above)


def set_openmp_wait() -> None:
    """h2okit's OpenMP waiting policy for this process (OPENMP_WAIT), for the commands to call before
    anything loads torch; a no-op once torch is loaded (libgomp has read its environment) or when the
    environment already chooses a policy."""
    if "torch" in sys.modules or any(key in os.environ for key in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")):
        return
    os.environ.update(OPENMP_WAIT)


@functools.cache
def _blas_pools():
    import threadpoolctl  # (only policies that multiply matrices at plan time need it)

    return threadpoolctl.ThreadpoolController()


def one_blas_thread() -> contextlib.AbstractContextManager:
    """A context in which numpy's BLAS runs on one thread (~55 us to enter and leave). OpenBLAS's threads
    spin after each call, as the kernels' OpenMP threads do between loops; on 2 cores the two sets of
    spinning threads took an expected-attention plan (P=2048, 3 KV heads) from 2.8 ms to 41 ms."""
    return _blas_pools().limit(limits=1, user_api="blas")
