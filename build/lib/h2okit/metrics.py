"""Quality metrics as pure functions (numpy only): perplexity, agreement, passkey answers."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Negative log-likelihood (nats) of each target under each row of logits [n, vocab]."""
    logits = np.asarray(logits, dtype=np.float64)
    top = logits.max(axis=1, keepdims=True)
    log_z = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
    return log_z - logits[np.arange(len(targets)), targets]


def perplexity(nll: np.ndarray) -> float:
    return math.exp(float(np.mean(nll))) if len(nll) else float("nan")


def delta_pct(value: float, reference: float) -> float:
    """Relative increase in percent (0 = same as the reference)."""
    return (value / reference - 1.0) * 100.0


@dataclass(frozen=True)
class Agreement:
    fraction: float  # positions where the tokens are identical
    first_divergence: int  # index of the first differing token; len(tokens) if none

    @classmethod
    def of(cls, tokens: list[int], reference: list[int]) -> "Agreement":
        if len(tokens) != len(reference):
            raise ValueError(f"{len(tokens)} tokens against a reference of {len(reference)}")
        if not tokens:
            return cls(1.0, 0)
        same = np.asarray(tokens) == np.asarray(reference)
        first = int(np.argmin(same)) if not same.all() else len(tokens)
        return cls(float(same.mean()), first)


def passkey_found(answer: str, key: str) -> bool:
    """The first number in the model's answer is the key (digits may be split by spaces)."""
    digits = re.sub(r"(?<=\d)\s+(?=\d)", "", answer)
    match = re.search(r"\d+", digits)
    return match is not None and match.group(0) == key
