"""Confidence intervals and verdicts (stats.py) against hand computations and at their borders."""

import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from h2okit.stats import ci_from_summary, exact, mean_ci, paired_ci, samples_to_decide, verdict


def test_t_interval_by_hand():
    ci = mean_ci([1.0, 2.0, 3.0, 4.0])
    # mean 2.5, sd 1.2910, t(0.975, 3) = 3.182446305
    half = 3.182446305284263 * 1.2909944487358056 / 2
    assert (ci.mean, ci.lo, ci.hi, ci.n, ci.method) == (2.5, pytest.approx(2.5 - half), pytest.approx(2.5 + half), 4,
                                                         "t")
    assert ci_from_summary(2.5, 1.2909944487358056, 4).lo == pytest.approx(ci.lo)


def test_paired_ratio_and_difference_by_hand():
    ratio = paired_ci([11.0, 22.0, 33.0], [10.0, 20.0, 30.0], kind="ratio")
    assert ratio.mean == pytest.approx(1.1) and ratio.hi - ratio.lo == pytest.approx(0.0, abs=1e-12)
    diff = paired_ci([3.0, 5.0], [1.0, 2.0])  # differences 2, 3
    half = 12.706204736174705 * math.sqrt(0.5) / math.sqrt(2)
    assert (diff.mean, diff.lo, diff.hi) == (2.5, pytest.approx(2.5 - half), pytest.approx(2.5 + half))
    with pytest.raises(ValueError, match="differ in length"):
        paired_ci([1.0], [1.0, 2.0])


def test_bootstrap_is_seeded_and_close_to_t_for_normal_samples():
    x = np.random.default_rng(0).normal(10, 2, 200)
    a, b = mean_ci(x, "bootstrap"), mean_ci(x, "bootstrap")
    t = mean_ci(x)
    assert (a.lo, a.hi) == (b.lo, b.hi) and a.method == "bootstrap"
    assert a.lo == pytest.approx(t.lo, abs=0.08) and a.hi == pytest.approx(t.hi, abs=0.08)


def test_verdicts_at_their_borders():
    ci = mean_ci([0.95, 1.05])  # lo < 0.95 < hi
    assert verdict(ci, low=0.95).verdict == "INCONCLUSIVE"
    assert verdict(exact(0.95), low=0.95).verdict == "PASS"  # the border counts as inside
    assert verdict(exact(0.9499), low=0.95).verdict == "FAIL"
    tight = mean_ci([1.0, 1.0, 1.0])
    assert verdict(tight, low=1.0).verdict == "PASS" and verdict(tight, high=1.0).verdict == "PASS"
    assert verdict(tight, high=0.999).verdict == "FAIL"
    assert verdict(mean_ci([5.0]), high=10).verdict == "INCONCLUSIVE"  # one sample: no interval


def test_samples_to_decide_estimates_the_count_that_clears_the_limit():
    ci = mean_ci([0.97, 1.03, 1.00, 0.99, 1.01])  # mean 1.0, sd ~0.022
    assert verdict(ci, low=0.95).verdict == "PASS" and samples_to_decide(ci, 0.95, math.inf) == 0
    wide = mean_ci([0.8, 1.2, 1.0])  # sd 0.2, gap 0.05 -> n ~ (2 * 0.2 / 0.05)^2 ~ 64
    more = samples_to_decide(wide, 0.95, math.inf)
    assert 40 < more + 3 < 90
    assert samples_to_decide(mean_ci([0.9, 1.0]), 0.95, math.inf) is None  # the mean sits on the limit


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(-100, 100), min_size=2, max_size=30))
def test_interval_contains_the_mean_and_widens_with_confidence(values):
    ci95, ci99 = mean_ci(values), mean_ci(values, level=0.99)
    assert ci95.lo <= ci95.mean <= ci95.hi
    assert ci99.lo <= ci95.lo + 1e-9 and ci99.hi >= ci95.hi - 1e-9
