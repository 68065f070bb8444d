"""Symmetric test matrices with a chosen spectrum."""

from __future__ import annotations

import numpy as np


def with_spectrum(eigenvalues, seed: int) -> np.ndarray:
    """Q diag(eigenvalues) Q^T for a random orthogonal Q, exactly symmetric."""
    eigenvalues = np.asarray(eigenvalues, dtype=float)
    rng = np.random.default_rng(seed)
    q, r = np.linalg.qr(rng.standard_normal((eigenvalues.size, eigenvalues.size)))
    q = q * np.sign(np.diag(r))
    a = (q * eigenvalues) @ q.T
    return 0.5 * (a + a.T)


def gapped_spectrum(n: int = 60, seed: int = 1) -> np.ndarray:
    """Three clear eigenvalues at each end (incl. negative ones) over a bulk in [-1, 1]."""
    rng = np.random.default_rng(seed)
    return np.concatenate([[10.0, 6.0, 4.0, -9.0, -5.0, -3.0], rng.uniform(-1, 1, n - 6)])


