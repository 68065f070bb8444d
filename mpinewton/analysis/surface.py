"""The loss along a line and over a plane through the weights (thesis 15.1, figure 15.1).

The thesis plots ResNet's loss over the plane spanned by the top two
Hessian eigenvectors (:func:`~mpinewton.analysis.eigen.power_iteration`);
Li, Xu, Taylor, Studer & Goldstein 2018 ("Visualizing the loss landscape of
neural nets") use random *filter-normalised* directions instead, so that
the scale invariance of ReLU networks does not distort the picture
(:func:`filter_normalized_direction`).

``value`` is any callable ``c(w)`` on flat vectors; it is called in a fixed
order (row by row over the grid), so a ``value`` that reduces over MPI runs
in lockstep on every rank.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ._common import check_vector

__all__ = ["filter_normalized_direction", "line", "plane"]


def _grid(who: str, name: str, points: Any) -> np.ndarray:
    if np.ndim(points) != 1:
        raise ValueError(f"{who}: {name} must be a 1-D sequence of numbers, got {points!r}")
    points = np.array(points, dtype=np.float64)
    if points.size == 0:
        raise ValueError(f"{who}: {name} has no points; the grid needs at least one")
    if not np.all(np.isfinite(points)):
        raise ValueError(f"{who}: {name} contains NaN or Inf: {points.tolist()}")
    return points


def _weights(who: str, w: Any) -> tuple[np.ndarray, np.dtype]:
    w = np.asarray(w)
    if w.ndim != 1:
        raise ValueError(f"{who}: w must be a 1-D vector, got shape {w.shape}")
    dtype = w.dtype if np.issubdtype(w.dtype, np.floating) else np.dtype(np.float64)
    return check_vector(who, "weights w", w, w.size), dtype


def line(value: Callable[[np.ndarray], float], w: np.ndarray, d: np.ndarray,
         alphas: Sequence[float] | np.ndarray) -> np.ndarray:
    """``c(w + alpha d)`` for each ``alpha``: a ``(len(alphas),)`` float64 array."""
    who = "line"
    w_vec, dtype = _weights(who, w)
    d_vec = check_vector(who, "direction d", d, w_vec.size, nonzero=True)
    alphas = _grid(who, "alphas", alphas)
    return np.array([float(value((w_vec + a * d_vec).astype(dtype))) for a in alphas])


def plane(value: Callable[[np.ndarray], float], w: np.ndarray, d1: np.ndarray, d2: np.ndarray,
          alphas: Sequence[float] | np.ndarray, betas: Sequence[float] | np.ndarray,
          ) -> np.ndarray:
    """``grid[i, j] = c(w + alphas[i] d1 + betas[j] d2)``: a ``(len(alphas), len(betas))`` array."""
    who = "plane"
    w_vec, dtype = _weights(who, w)
    d1 = check_vector(who, "direction d1", d1, w_vec.size, nonzero=True)
    d2 = check_vector(who, "direction d2", d2, w_vec.size, nonzero=True)
    alphas, betas = _grid(who, "alphas", alphas), _grid(who, "betas", betas)
    grid = np.empty((alphas.size, betas.size))
    for i, a in enumerate(alphas):
        row = w_vec + a * d1
        for j, b in enumerate(betas):
            grid[i, j] = float(value((row + b * d2).astype(dtype)))
    return grid


def filter_normalized_direction(w: np.ndarray, shapes: Sequence[tuple[int, ...]],
                                rng: np.random.Generator | int) -> np.ndarray:
    """A random direction with each filter scaled to the norm of ``w``'s (Li et al. 2018, 4).

    ``w`` is the flat concatenation of variables of ``shapes`` (in order, C
    order within each).  A standard normal direction is drawn for all of
    ``w`` at once; in each variable of two or more axes every *filter* (a
    slice along the last axis: the output channel of a Keras conv kernel
    ``(H, W, Cin, Cout)`` or the output unit of a dense kernel ``(in, out)``)
    is rescaled to the Frobenius norm of the same filter of ``w`` (a filter
    of norm 0 gets 0).  Variables of fewer than two axes (biases, batch-norm
    parameters, scalars) get the zero direction, as Li et al. do.  Returns a
    flat float64 vector like ``w``.  ``rng``: a numpy Generator or an integer
    seed.
    """
    who = "filter_normalized_direction"
    w_vec, _ = _weights(who, w)
    shapes = [tuple(int(s) for s in shape) for shape in shapes]
    sizes = [math.prod(shape) for shape in shapes]
    if any(s < 0 for shape in shapes for s in shape):
        raise ValueError(f"{who}: shapes must have sizes >= 0, got {shapes}")
    if sum(sizes) != w_vec.size:
        raise ValueError(f"{who}: shapes {shapes} hold {sum(sizes):,} numbers, "
                         f"but w has {w_vec.size:,}")
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    direction = rng.standard_normal(w_vec.size)
    offset = 0
    for shape, size in zip(shapes, sizes, strict=True):
        part = direction[offset:offset + size]
        if len(shape) < 2 or size == 0:
            part[:] = 0.0
        else:
            d_part = part.reshape(-1, shape[-1])  # a view: rows are positions, columns filters
            w_norm = np.linalg.norm(w_vec[offset:offset + size].reshape(-1, shape[-1]), axis=0)
            d_norm = np.linalg.norm(d_part, axis=0)
            scale = np.divide(w_norm, d_norm, out=np.zeros_like(w_norm), where=d_norm > 0)
            d_part *= scale
        offset += size
    return direction
