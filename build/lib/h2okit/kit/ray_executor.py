"""Run a sweep's runs as Ray tasks (`--executor ray [--ray-address ADDR]`).

Each run is one task that reserves as many CPUs as the run's threads, so two runs never
share cores and timings stay honest. The task runs llm_bench on the worker (`execute_run`)
and returns the log text, console text and return code; the driver writes the out-dir
exactly as the local executor does. A task that raises or whose worker dies is retried
`max_retries` times, then recorded as failed with its reason. Ctrl-C cancels what is
outstanding. Every worker needs h2okit, the model and the corpus installed.
"""

from __future__ import annotations

from typing import Callable, Iterable

from .grid import GridError
from .sweep import RunOutcome, RunSpec, execute_run

INSTALL_HINT = "--executor ray needs Ray: pip install 'h2okit[ray]' (or pip install ray)"


def _import_ray():
    try:
        import ray
    except ImportError:
        raise GridError(INSTALL_HINT) from None
    return ray


class RayExecutor:
    name = "ray"

    def __init__(self, address: str | None = None, num_cpus: int | None = None, max_retries: int = 2):
        self.ray = _import_ray()
        self.address = address
        self.num_cpus = num_cpus
        self.max_retries = max_retries

    def _connect(self) -> None:
        if self.ray.is_initialized():
            return
        kwargs = {"address": self.address} if self.address else {"num_cpus": self.num_cpus}
        self.ray.init(log_to_driver=False, **{k: v for k, v in kwargs.items() if v is not None})

    def run(self, specs: Iterable[RunSpec], on_start: Callable[[RunSpec], None],
            on_done: Callable[[RunOutcome], None]) -> None:
        ray = self.ray
        self._connect()
        task = ray.remote(execute_run)
        pending = {}
        for spec in specs:
            ref = task.options(num_cpus=spec.threads, max_retries=self.max_retries,
                               retry_exceptions=True).remote(spec)
            pending[ref] = spec
            on_start(spec)
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                spec = pending.pop(ready[0])
                try:
                    outcome = ray.get(ready[0])
                except Exception as exc:  # retries exhausted: record the reason, go on
                    reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
                    outcome = RunOutcome(spec.run_id, -1, "", "", 0.0, f"ray task failed after "
                                         f"{self.max_retries} retries: {reason}", spec.round)
                on_done(outcome)
        except KeyboardInterrupt:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
