"""The next token from the last position's logits: greedy, or sampled with temperature, top-k and top-p.

A pure function of the logits, the settings and a seeded generator, so a replayed step chooses again
exactly what it chose the first time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from coordinator.errors import ModelError


@dataclass(frozen=True, slots=True)
class Sampling:
    """``temperature`` 0 is greedy; otherwise softmax(logits / temperature) restricted to the ``top_k``
    most likely tokens (0: all) and the smallest set whose mass reaches ``top_p``."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ModelError(f"bad sampling settings {self}: temperature >= 0, top_k >= 0, 0 < top_p <= 1")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def choose_token(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> int:
    """The next token for a 1-D vector of logits."""
    if sampling.greedy:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / sampling.temperature
    order = np.argsort(-scaled, kind="stable")
    if sampling.top_k:
        order = order[: sampling.top_k]
    probs = np.exp(scaled[order] - scaled[order[0]])
    probs /= probs.sum()
    keep = int(np.searchsorted(np.cumsum(probs), sampling.top_p) + 1)
    order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
    return int(order[rng.choice(len(order), p=probs)])
