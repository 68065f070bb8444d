"""An exponential moving average of the iterates (Polyak & Juditsky 1992; Ruppert 1988).

On mini-batches every step carries its batch's noise; the average of the
recent iterates carries less of it, at the cost of one ``axpy`` a step. The
average is bias-corrected as Adam's moments are (Kingma & Ba 2015, 3): with
weights ``1 - decay^k`` after ``k`` updates, so the starting point drops out
after the first step instead of lingering with weight ``decay^k``::

    n_k = decay n_{k-1} + (1 - decay),   a_k = a_{k-1} + (1 - decay) / n_k (w_k - a_{k-1})

which is ``a_k = sum_j decay^(k-j) (1 - decay) w_j / n_k``. The optimiser
itself never sees the average: it steps from its own iterate.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .base import ParameterError


class IterateAverage:
    """The bias-corrected exponential average of the iterates ``w_1, w_2, ...``."""

    def __init__(self, decay: float, w: np.ndarray) -> None:
        if not 0.0 < decay < 1.0:
            raise ParameterError("IterateAverage", "decay", decay, "a number in (0, 1)")
        self.decay = float(decay)
        self.weights = np.array(w, copy=True)  # before the first update: the start
        self.total = 0.0  # n_k = 1 - decay^k

    def update(self, w: np.ndarray) -> np.ndarray:
        """Fold in the next iterate; returns the average (the array held, not a copy)."""
        self.total = self.decay * self.total + (1.0 - self.decay)
        self.weights += ((1.0 - self.decay) / self.total) * (np.asarray(w) - self.weights)
        return self.weights

    def to_dict(self) -> dict[str, Any]:
        """For a checkpoint: the average and its weight ``n_k`` (resume continues exactly)."""
        return {"decay": self.decay, "weights": self.weights.copy(), "total": self.total}

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> IterateAverage:
        average = cls(float(state["decay"]), np.asarray(state["weights"]))
        average.total = float(state["total"])
        return average
