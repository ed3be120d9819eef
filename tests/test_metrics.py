"""Quality metrics on hand-made numbers."""

import math

import numpy as np
import pytest

from h2okit.metrics import Agreement, delta_pct, passkey_found, perplexity, token_nll


def test_nll_of_uniform_and_peaked_logits():
    uniform = np.zeros((2, 4))
    assert token_nll(uniform, np.array([0, 3])) == pytest.approx([math.log(4)] * 2)
    peaked = np.array([[0.0, 10.0, 0.0]])
    expected = -(10 - math.log(math.exp(10) + 2))
    assert token_nll(peaked, np.array([1]))[0] == pytest.approx(expected)
    assert token_nll(np.array([[1000.0, 0.0]]), np.array([1]))[0] == pytest.approx(1000.0)  # no overflow


def test_perplexity_and_delta():
    assert perplexity(np.full(10, math.log(7))) == pytest.approx(7.0)
    assert math.isnan(perplexity(np.array([])))
    assert delta_pct(11.0, 10.0) == pytest.approx(10.0)
    assert delta_pct(9.5, 10.0) == pytest.approx(-5.0)


def test_agreement_counts_positions_and_first_divergence():
    assert Agreement.of([1, 2, 3, 4], [1, 2, 9, 4]) == Agreement(0.75, 2)
    assert Agreement.of([5, 6], [5, 6]) == Agreement(1.0, 2)
    assert Agreement.of([], []) == Agreement(1.0, 0)
    with pytest.raises(ValueError):
        Agreement.of([1], [1, 2])


@pytest.mark.parametrize("answer, found", [
    (" 48213. Remember", True), (" 4 8 2 1 3", True), ("\n48213", True), (" 48214", False),
    (" not known", False), (" 482130", False), (" the key 12 then 48213", False),
])
def test_passkey_answer_check(answer, found):
    assert passkey_found(answer, "48213") is found
