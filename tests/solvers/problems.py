"""Small test problems implementing the ``Problem`` protocol, with spies."""

from __future__ import annotations

import numpy as np
import scipy.optimize as so


def spd_matrix(n: int, cond: float, seed: int) -> np.ndarray:
    """Symmetric positive definite matrix with log-spaced eigenvalues in [1, cond]."""
    rng = np.random.default_rng(seed)
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    q = q * np.sign(np.diag(r))
    eig = np.logspace(0.0, np.log10(cond), n)
    a = (q * eig) @ q.T
    return 0.5 * (a + a.T)


class Quadratic:
    """c(w) = 0.5 w.A w - b.w (A symmetric, possibly indefinite)."""

    def __init__(self, a: np.ndarray, b: np.ndarray) -> None:
        self.a = np.asarray(a, dtype=float)
        self.b = np.asarray(b, dtype=float)

    def value(self, w):
        return float(0.5 * w @ (self.a @ w) - self.b @ w)

    def value_and_grad(self, w):
        return self.value(w), self.a @ w - self.b

    def hvp(self, w, v):
        return self.a @ v


class Rosenbrock:
    """scipy's chained Rosenbrock function."""

    def value(self, w):
        return float(so.rosen(w))

    def value_and_grad(self, w):
        return float(so.rosen(w)), so.rosen_der(w)

    def hvp(self, w, v):
        return so.rosen_hess_prod(w, v)


class SqrtOnePlusSquare:
    """Thesis section 2.3 counterexample c(w) = sqrt(w^2 + 1), w in R^1."""

    def value(self, w):
        return float(np.sqrt(w[0] ** 2 + 1.0))

    def value_and_grad(self, w):
        root = np.sqrt(w[0] ** 2 + 1.0)
        return float(root), np.array([w[0] / root])

    def hvp(self, w, v):
        return v / (w[0] ** 2 + 1.0) ** 1.5


class DoubleWell:
    """c(w) = w0^4/4 - w0^2/2 + w1^2/2: minima (+-1, 0), saddle at 0, H indefinite near it."""

    def value(self, w):
        return float(w[0] ** 4 / 4 - w[0] ** 2 / 2 + w[1] ** 2 / 2)

    def value_and_grad(self, w):
        return self.value(w), np.array([w[0] ** 3 - w[0], w[1]])

    def hvp(self, w, v):
        return np.array([(3 * w[0] ** 2 - 1) * v[0], v[1]])


class Spy:
    """Wraps a problem and records every call."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.value_calls: list[np.ndarray] = []
        self.vg_calls: list[np.ndarray] = []
        self.hvp_calls: list[np.ndarray] = []

    def value(self, w):
        self.value_calls.append(np.array(w, copy=True))
        return self.inner.value(w)

    def value_and_grad(self, w):
        self.vg_calls.append(np.array(w, copy=True))
        return self.inner.value_and_grad(w)

    def hvp(self, w, v):
        self.hvp_calls.append(np.array(v, copy=True))
        return self.inner.hvp(w, v)
