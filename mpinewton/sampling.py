"""Mini-batches for stochastic Newton (thesis section 8.2), the same on any number of ranks.

Each iteration of a stochastic run uses a batch of ``batch_size`` samples of
the training set, drawn without replacement from a permutation that depends
only on the seed and the epoch: ``numpy.random.default_rng([seed, epoch])``.
Epoch ``e`` is cut into ``N // batch_size`` consecutive batches of that
permutation (the last ``N % batch_size`` samples of an epoch are left out of
it, and are in other batches in other epochs). So the batch of iteration k is
a set of *global* sample indices, whatever the number of ranks. The driver
cuts the sorted batch into ``size`` balanced contiguous parts
(``mpinewton.data.shard_bounds``), each rank reads the rows of its part from
the HDF5 file (``mpinewton.data.hdf5.read_rows``: memory per rank does not
grow with the data set), and the Allreduce adds the parts' sums up (design
invariant 1).

The whole state is ``(seed, epoch, position)``: a checkpoint holds it and a
resumed run draws the same batches as an uninterrupted one. numpy only: this
module knows neither MPI nor TensorFlow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class MiniBatchSampler:
    """Seeded epochs of a global permutation, cut into batches of ``batch_size``."""

    num_samples: int
    batch_size: int
    seed: int = 0
    epoch: int = 0
    position: int = 0  # index into the current epoch's permutation
    _perm: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)
    _perm_epoch: int = field(default=-1, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.batch_size <= 0:
            raise ValueError(f"batch size must be > 0, got {self.batch_size}")
        if self.batch_size > self.num_samples:
            raise ValueError(f"batch size {self.batch_size} exceeds the {self.num_samples} "
                             "training samples")
        if self.epoch < 0 or not 0 <= self.position <= self.num_samples:
            raise ValueError(f"bad sampler position: epoch {self.epoch}, position "
                             f"{self.position} of {self.num_samples}")

    def permutation(self, epoch: int) -> np.ndarray:
        """The permutation of all sample indices used in ``epoch``."""
        if self._perm_epoch != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm = rng.permutation(self.num_samples)
            self._perm_epoch = epoch
        assert self._perm is not None
        return self._perm

    def next(self) -> np.ndarray:
        """The next batch: sorted global sample indices; advances the state."""
        if self.position + self.batch_size > self.num_samples:
            self.epoch += 1
            self.position = 0
        batch = self.permutation(self.epoch)[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        return np.sort(batch)

    def grow(self, batch_size: int) -> int:
        """Use batches of ``batch_size`` (at most all samples) from the next one on.

        Batches only grow (progressive batching); the epoch goes on, and the
        next batch opens a new epoch when fewer samples than that are left.
        Returns the batch size now in use.
        """
        self.batch_size = max(self.batch_size, min(int(batch_size), self.num_samples))
        return self.batch_size

    def state(self) -> dict[str, Any]:
        """Plain dict for a checkpoint."""
        return {"mode": "mini_batch", "num_samples": self.num_samples,
                "batch_size": self.batch_size, "seed": self.seed, "epoch": self.epoch,
                "position": self.position}

    @classmethod
    def from_state(cls, state: dict[str, Any], *, num_samples: int,
                   batch_size: int, growing: bool = False) -> MiniBatchSampler:
        """Restore from :meth:`state`; the data set and the batch size must be the same.

        With ``growing`` (progressive batches) the saved batch size may exceed
        the job's: the run had grown it.
        """
        saved = int(state["batch_size"])
        if int(state["num_samples"]) != num_samples or not (
                saved == batch_size or (growing and saved > batch_size)):
            raise ValueError(
                f"the checkpoint drew batches of {state['batch_size']} from "
                f"{state['num_samples']} samples; this job draws {batch_size} from "
                f"{num_samples}: resuming would not continue the same run")
        return cls(num_samples, saved, seed=int(state["seed"]), epoch=int(state["epoch"]),
                   position=int(state["position"]))



def curvature_count(batch_size: int, fraction: float) -> int:
    """``ceil(fraction * batch_size)`` (at least 1): the size of a curvature subset."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"curvature fraction must be in (0, 1], got {fraction!r}")
    return min(batch_size, max(1, math.ceil(fraction * batch_size)))


def curvature_rows(batch_size: int, fraction: float, seed: int, iteration: int) -> np.ndarray:
    """Positions in a batch of ``batch_size`` whose curvature products an iteration uses.

    Sub-sampled curvature (Byrd, Chin, Neveitt & Nocedal 2011; Martens 2010
    sec. 4.3): the gradient runs on the whole batch, the Hessian or
    Gauss-Newton products on ``ceil(fraction * batch_size)`` of its samples,
    drawn without replacement by ``numpy.random.default_rng([seed, 2, iteration])``
    afresh at each iteration. The positions are global (sorted), so every
    number of ranks draws the same subset; ``fraction = 1`` is the whole batch.
    """
    m = curvature_count(batch_size, fraction)
    if m >= batch_size:
        return np.arange(batch_size)
    rng = np.random.default_rng([seed, 2, iteration])
    return np.sort(rng.choice(batch_size, m, replace=False))


def fisher_draws(seed: int, iteration: int, m: int, width: int) -> np.ndarray:
    """Uniforms in [0, 1), (m, width), for a sampled Fisher's labels at an iteration.

    Row i is the draw of the i-th sample of the iteration's curvature samples
    (global order), from ``numpy.random.default_rng([seed, 3, iteration])``:
    the same on any number of ranks, and a resumed run draws what an
    uninterrupted one would (K-FAC's ``fisher = "sampled"``).
    """
    return np.random.default_rng([seed, 3, iteration]).random((m, width))


def norm_test(batch_size: int, mean_squares: float, grad_norm_sq: float,
              theta: float) -> int | None:
    """The batch size the norm test asks for, or None when the batch passes it.

    Bollapragada, Byrd & Nocedal (2018), "Adaptive sampling strategies for
    stochastic optimization", eq. (2.6): with the batch gradient ``g`` (mean
    of the b per-sample gradients ``g_i``) and their sample variance
    ``V = b / (b - 1) (mean_i |g_i|^2 - |g|^2)``, the step is mostly signal
    when ``V / b <= theta^2 |g|^2``; otherwise the next batch should hold
    ``ceil(V / (theta^2 |g|^2))`` samples. ``mean_squares`` is
    ``mean_i |g_i|^2`` (the sum of the empirical Fisher diagonal).
    """
    if batch_size < 2 or not grad_norm_sq > 0 or not math.isfinite(mean_squares):
        return None
    variance = max(0.0, mean_squares - grad_norm_sq) * batch_size / (batch_size - 1)
    if variance / batch_size <= theta**2 * grad_norm_sq:
        return None
    return math.ceil(variance / (theta**2 * grad_norm_sq))


def grow_by_norm_test(sampler: MiniBatchSampler, mean_squares: float, grad_norm_sq: float,
                      theta: float, batch_max: int = 0) -> int | None:
    """Grow ``sampler``'s batches as :func:`norm_test` asks; the new size, or None.

    ``mean_squares`` and ``grad_norm_sq`` are :func:`norm_test`'s, taken on
    the step's batch at the step's weights; batches grow to at most
    ``batch_max`` samples (0: all of them) and never shrink. The trainer and
    ``mpinewton.compare`` both decide with this, from numbers reduced over all
    ranks, so every rank grows alike.
    """
    wanted = norm_test(sampler.batch_size, mean_squares, grad_norm_sq, theta)
    cap = batch_max or sampler.num_samples
    if wanted is None or sampler.batch_size >= cap:
        return None
    return sampler.grow(min(wanted, cap))


def grow_geometric(sampler: MiniBatchSampler, step: int, every: int, factor: float,
                   batch_max: int = 0) -> int | None:
    """Grow the batches by ``factor`` after every ``every``-th step; the new size, or None.

    Geometric sample-size growth (Friedlander & Schmidt 2012, "Hybrid
    deterministic-stochastic methods for data fitting", section 3; Smith et al.
    2018 grow the batch in steps the same way): cheap noisy steps while the
    loss falls fast, larger batches once the noise dominates, without the norm
    test's per-sample pass. After method step ``step`` (1, 2, ...) with
    ``step % every == 0`` the batch becomes ``ceil(factor * b)``, at most
    ``batch_max`` samples (0: all of them). It depends only on the step and
    the sampler's batch size, which a checkpoint holds, so a resumed run grows
    as an uninterrupted one. With ``factor = 2`` and a first batch that is a
    multiple of ``ranks * micro_batch``, every size reuses the compiled graphs.
    """
    if every < 1 or factor <= 1:
        raise ValueError(f"geometric growth needs every >= 1 and factor > 1, got {every}, "
                         f"{factor}")
    cap = batch_max or sampler.num_samples
    if step < 1 or step % every or sampler.batch_size >= cap:
        return None
    return sampler.grow(min(math.ceil(factor * sampler.batch_size), cap))


@dataclass
class CurvatureGrowth:
    """The curvature fraction of each iteration: it grows while the damping stays high.

    A small curvature sample is cheap and good enough while the loss falls
    fast; late in a run the steps that still gain lie along directions of
    small curvature, which a small sample estimates poorly. Levenberg-Marquardt
    damping answers a poor model by shrinking the step towards gradient
    descent; past a point a larger sample is the cheaper answer (measured in
    docs/results.md: from the same late weights, 20 % of the images gave
    0.4344 in 150 s where 5 % gave 0.4462, with damping 4e-4 against 5e-2).

    Rule (``optimizer.curvature_growth = "damping"``): ``a_k`` is an
    exponential average of ``log lambda_k`` (weight ``smoothing`` on the past,
    started at the initial damping ``lambda_0``). When ``a_k > log(threshold
    lambda_0)`` the fraction doubles (at most ``fraction_max``) and the
    average restarts at ``log lambda_0``, so a further doubling needs the
    damping to stay high again with the larger sample. Doubling levels keep
    the compiled shapes few. ``lambda_k`` is rank 0's decision, the same on
    every rank, so every rank picks the same fraction. The state goes into
    checkpoints (:meth:`state`), so a resumed run continues the same sequence.
    """

    fraction: float
    damping: float  # lambda_0, the method's initial damping
    threshold: float = 2.0
    fraction_max: float = 1.0
    smoothing: float = 0.9
    level: int = 0
    log_avg: float | None = None  # None: log(lambda_0)

    def __post_init__(self) -> None:
        if not 0.0 < self.fraction <= self.fraction_max <= 1.0:
            raise ValueError("curvature growth needs 0 < fraction <= fraction_max <= 1, got "
                             f"{self.fraction!r} and {self.fraction_max!r}")
        if not (math.isfinite(self.damping) and self.damping > 0):
            raise ValueError(f"curvature growth needs an initial damping > 0, got "
                             f"{self.damping!r}")
        if not (math.isfinite(self.threshold) and self.threshold > 1):
            raise ValueError(f"curvature growth threshold must be > 1, got {self.threshold!r}")
        if not 0.0 <= self.smoothing < 1.0:
            raise ValueError(f"curvature growth smoothing must be in [0, 1), got "
                             f"{self.smoothing!r}")

    @property
    def max_level(self) -> int:
        """The first level whose fraction reaches ``fraction_max``."""
        return max(0, math.ceil(math.log2(self.fraction_max / self.fraction) - 1e-12))

    def at_level(self, level: int) -> float:
        """The fraction of ``level``: ``fraction * 2**level``, at most ``fraction_max``."""
        return min(self.fraction_max, self.fraction * 2.0 ** level)

    def fractions(self) -> list[float]:
        """Every fraction the rule can reach, from the first (the shapes to compile)."""
        return [self.at_level(j) for j in range(self.max_level + 1)]

    def current(self) -> float:
        """The fraction the next iteration uses."""
        return self.at_level(self.level)

    def update(self, damping: float | None) -> float:
        """Take the step's damping into account; the fraction of the next iteration."""
        if damping is None or not (math.isfinite(damping) and damping > 0):
            return self.current()
        ref = math.log(self.damping)
        avg = ref if self.log_avg is None else self.log_avg
        avg = self.smoothing * avg + (1.0 - self.smoothing) * math.log(damping)
        if avg > ref + math.log(self.threshold) and self.level < self.max_level:
            self.level, avg = self.level + 1, ref
        self.log_avg = avg
        return self.current()

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps (``log_avg`` None before the first step)."""
        return {"level": self.level, "log_avg": self.log_avg}

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state` of an earlier run with the same settings."""
        self.level = min(self.max_level, int(state["level"]))
        self.log_avg = None if state.get("log_avg") is None else float(state["log_avg"])
