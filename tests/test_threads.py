"""The decode thread chooser: pure logic, driven by simulated step times."""

import pytest

from h2okit.threads import ThreadChooser


def run(chooser: ThreadChooser, step_seconds, steps: int) -> list[int]:
    """Drive `steps` steps; step_seconds(step, threads) is what a step takes. Returns the counts used."""
    used = []
    for step in range(steps):
        threads = chooser.next()
        chooser.record(threads, step_seconds(step, threads))
        used.append(threads)
    return used


def quiet(step, threads):
    return 0.010 if threads == 2 else 0.015  # two threads 1.5x faster


def busy(step, threads):
    return 0.037 if threads == 2 else 0.016  # a spinning partner waits for a core the other process holds


def test_quiet_machine_runs_all_threads_probing_less_and_less():
    used = run(ThreadChooser(2, probe_every=32, longest_wait=128), quiet, 1000)
    assert used[:3] == [2, 2, 1]  # each count tried once after a first (cold, unrecorded) step
    ones = [i for i, n in enumerate(used) if n == 1]
    gaps = [b - a for a, b in zip(ones, ones[1:])]
    assert gaps[:2] == [65, 129] and set(gaps[2:]) == {129}  # each lost probe (the first try too) doubles the
    # wait, up to the cap


def test_under_load_it_moves_to_one_thread_and_back_when_the_load_goes():
    def load_in_the_middle(step, threads):
        return busy(step, threads) if 100 <= step < 600 else quiet(step, threads)

    chooser = ThreadChooser(2, probe_every=32, longest_wait=128)
    used = run(chooser, load_in_the_middle, 1000)
    assert used[90:100].count(2) == 10
    assert used[103:600].count(2) <= 1 + 500 // 64  # one thread within 3 steps, probes ever rarer
    assert used[600 + 3 * 129:].count(1) <= 3  # back on two threads within 3 probes of the load going
    assert chooser.current == 2


def test_a_cold_first_step_does_not_make_one_thread_win():
    def cold_start(step, threads):
        return 0.05 if step == 0 else quiet(step, threads)

    assert run(ThreadChooser(2, probe_every=32), cold_start, 30)[3:] == [2] * 27


def test_a_single_slow_step_does_not_switch():
    def one_hiccup(step, threads):
        return 0.2 if step == 50 else quiet(step, threads)

    used = run(ThreadChooser(2, probe_every=32), one_hiccup, 60)
    assert used[51:60] == [2] * 9


def test_one_thread_must_be_clearly_faster_to_be_chosen():
    def noisy_quiet(step, threads):
        return 0.018 if threads == 2 else 0.015  # one thread 17 % faster: within the margin

    assert run(ThreadChooser(2, probe_every=32), noisy_quiet, 200).count(1) <= 3  # probes only
    assert run(ThreadChooser(2, probe_every=32), busy, 200)[10:].count(2) <= 3  # 2.3x faster: chosen


def test_one_configured_thread_never_probes():
    assert run(ThreadChooser(1), quiet, 100) == [1] * 100


def test_bad_counts_are_refused():
    with pytest.raises(ValueError):
        ThreadChooser(0)
    with pytest.raises(ValueError):
        ThreadChooser(2).record(3, 0.01)


def test_the_environment_switch_takes_0_or_1_only(monkeypatch):
    from h2okit.config import ConfigError
    from h2okit.fastpath import adapt_threads_setting

    monkeypatch.delenv("H2OKIT_ADAPT_THREADS", raising=False)
    assert adapt_threads_setting() is True
    monkeypatch.setenv("H2OKIT_ADAPT_THREADS", "0")
    assert adapt_threads_setting() is False
    monkeypatch.setenv("H2OKIT_ADAPT_THREADS", "yes")
    with pytest.raises(ConfigError, match="allowed: 0 .* or 1"):
        adapt_threads_setting()


def test_set_openmp_wait_sets_the_spin_count_only_before_torch_and_only_when_unset(monkeypatch):
    import os
    import sys

    from h2okit import threads

    env: dict[str, str] = {}
    monkeypatch.setattr(os, "environ", env)  # this process's real environment stays as it is
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    threads.set_openmp_wait()
    assert env == threads.OPENMP_WAIT

    env.clear()
    env["GOMP_SPINCOUNT"] = "300000"  # the user's choice stays
    threads.set_openmp_wait()
    assert env == {"GOMP_SPINCOUNT": "300000"}

    env.clear()
    env["OMP_WAIT_POLICY"] = "PASSIVE"  # so does a waiting policy
    threads.set_openmp_wait()
    assert env == {"OMP_WAIT_POLICY": "PASSIVE"}

    env.clear()
    monkeypatch.setitem(sys.modules, "torch", object())  # libgomp has read its environment: too late
    threads.set_openmp_wait()
    assert env == {}
