"""K-FAC: natural-gradient steps with a Kronecker-factored Fisher (Martens & Grosse 2015).

A second-order method built for mini-batches.  Each layer's block of the
Fisher (the Gauss-Newton matrix of a matching loss) is approximated by a
Kronecker product ``F_l ~ A_l (x) G_l`` of the second moments of the layer's
inputs ``a`` and of the loss's backpropagated pre-activation derivatives
``g`` (Martens & Grosse 2015, "Optimizing neural networks with
Kronecker-factored approximate curvature", sec. 3; convolutions as in Grosse &
Martens 2016, "A Kronecker-factored approximate Fisher matrix for convolution
layers": ``A`` over the input patches, ``G`` summed over output positions).
The problem supplies the factors (``problem.kfac_blocks()``,
``problem.kfac_factors(w, max_dim=...)``); here they are averaged over steps, damped and
inverted, and one step is::

    A, G <- decay (A, G) + (1 - decay) (A_batch, G_batch)      every stats_every steps
    inverses of A + pi sqrt(lambda) I and G + sqrt(lambda)/pi I  every inverse_every steps
                                                (and at each of the first inverse_warmup)
    p_l = (A_l + ...)^-1 dW_l (G_l + ...)^-1                    each layer's gradient block
    nu = min(1, sqrt(kl_clip / (lr^2 p . g)))                   (Ba, Grosse & Martens 2017)
    v <- momentum v + nu p,  w <- w - lr v

with ``pi = sqrt((tr A / dim A) / (tr G / dim G))``, the factored Tikhonov
damping of Martens & Grosse (2015, sec. 6.3).  With ``damping_rule =
"levenberg_marquardt"`` the damping ``lambda`` adapts every ``damping_every``
steps (Martens & Grosse 2015, sec. 6.5) to the ratio of the batch's actual
decrease to the one its quadratic model predicts for the step ``d`` taken::

    rho = (c(w) - c(w + d)) / -(g . d + d . F d / 2)    F d: a Gauss-Newton product

times ``lm_increase`` when ``rho < lm_rho_low``, ``lm_decrease`` when ``rho >
lm_rho_high``, within ``[damping_min, damping_max]``; the next inverse refresh
uses it.  That costs one loss on the batch and one Gauss-Newton product on the
curvature sample every ``damping_every`` steps.  A layer's bias is the last row
of its block (the input's homogeneous coordinate 1).  Weights no block covers
(batch-norm scales, embeddings) take the plain momentum step ``nu g``.

A factor of order above ``max_factor_dim`` is kept as its diagonal: a full
one costs ``n^2`` numbers in the state, the Allreduce and the checkpoint, and
an ``n^3 / 3`` Cholesky factorisation (ResNet-50's 3 x 3 x 512 convolutions
have ``A`` of order 4,609: 170 MB in float64).  Its block is then
``diag(A) (x) G`` (or ``A (x) diag(G)``), inverted exactly; the factor is
computed as its diagonal from the start, not cut from a full matrix.

numpy (and scipy's LAPACK and BLAS, loaded on first use); the factors come from the
problem, which is where TensorFlow and MPI live. Where the problem spans several
processes (``problem.work_share()``, a :class:`~.base.WorkShare`), each block is
inverted and applied on one of them (:func:`share_blocks`) and the parts' results are
added: bitwise the steps of one process doing it all.  With ``kl_clip = 0``,
``momentum = 0``, ``lr = 1`` and ``damping -> 0`` a step on a quadratic whose
Hessian is exactly ``A (x) G`` lands on its minimiser.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from .base import Problem, SolverState, WorkShare, check_value_and_grad, require
from .momentum import FixedStepInfo, _check_counter, _float_array
from .newton import check_damping_rule, current_damping, lm_damping_update, optional_float

__all__ = ["FISHERS", "KFAC", "KFACConfig", "KFACInfo", "KFACState", "KroneckerBlock",
           "factor_shapes", "factored_damping", "kfac_direction", "share_blocks"]


@dataclass(frozen=True)
class KroneckerBlock:
    """Where one layer's weights sit in the flat vector, as a (rows [+ 1]) x cols matrix.

    The kernel occupies ``rows * cols`` entries from ``kernel_offset`` in
    row-major order (a Dense kernel ``(in, out)``; a Conv2D kernel ``(kh, kw,
    cin, cout)`` as ``(kh * kw * cin, cout)``); a bias of ``cols`` entries at
    ``bias_offset`` (-1: none) is the block's last row.
    """

    name: str
    kernel_offset: int
    rows: int
    cols: int
    bias_offset: int = -1

    def __post_init__(self) -> None:
        for field in ("kernel_offset", "rows", "cols"):
            value = getattr(self, field)
            if not (isinstance(value, (int, np.integer)) and not isinstance(value, bool)
                    and value >= (0 if field == "kernel_offset" else 1)):
                raise ValueError(f"KroneckerBlock {self.name!r}: {field} = {value!r}")
        if not isinstance(self.bias_offset, (int, np.integer)) or self.bias_offset < -1:
            raise ValueError(f"KroneckerBlock {self.name!r}: bias_offset = {self.bias_offset!r}")

    @property
    def a_dim(self) -> int:
        """Order of the input factor A: the kernel's rows, plus 1 for a bias."""
        return self.rows + (self.bias_offset >= 0)

    @property
    def g_dim(self) -> int:
        """Order of the output factor G: the layer's outputs (channels)."""
        return self.cols

    def matrix(self, v: np.ndarray) -> np.ndarray:
        """The block's (a_dim, g_dim) matrix of the flat vector ``v``, read as slices.

        The kernel and the bias are contiguous runs of ``v``: a view of the kernel
        without a bias, no index array (ResNet-50's 23.5 M block entries would
        take one of 188 MB).
        """
        k0 = self.kernel_offset
        m = v[k0:k0 + self.rows * self.cols].reshape(self.rows, self.cols)
        if self.bias_offset < 0:
            return m
        return np.vstack([m, v[self.bias_offset:self.bias_offset + self.cols][None, :]])

    def put(self, v: np.ndarray, m: np.ndarray) -> None:
        """Write the (a_dim, g_dim) matrix ``m`` into the block's places of ``v``."""
        k0 = self.kernel_offset
        v[k0:k0 + self.rows * self.cols] = m[:self.rows].reshape(-1)
        if self.bias_offset >= 0:
            v[self.bias_offset:self.bias_offset + self.cols] = m[self.rows]

    def clear(self, v: np.ndarray) -> None:
        """Zero the block's places of ``v``."""
        k0 = self.kernel_offset
        v[k0:k0 + self.rows * self.cols] = 0
        if self.bias_offset >= 0:
            v[self.bias_offset:self.bias_offset + self.cols] = 0

    def indices(self) -> np.ndarray:
        """Flat positions of the block's matrix entries, as an (a_dim, g_dim) array."""
        k = self.kernel_offset + np.arange(self.rows * self.cols).reshape(self.rows, self.cols)
        if self.bias_offset < 0:
            return k
        return np.vstack([k, self.bias_offset + np.arange(self.cols)[None, :]])


def check_blocks(blocks: Any, n: int) -> tuple[KroneckerBlock, ...]:
    """The problem's blocks, checked to lie inside ``n`` weights without overlapping."""
    blocks = tuple(blocks)
    seen = np.zeros(n, dtype=bool)
    for b in blocks:
        if not isinstance(b, KroneckerBlock):
            raise TypeError(f"kfac: kfac_blocks() gave a {type(b).__name__}, not a KroneckerBlock")
        idx = b.indices()
        if idx.size and idx.max() >= n:
            raise ValueError(f"kfac: block {b.name!r} reaches weight {idx.max()}, the vector "
                             f"has {n}")
        if seen[idx].any():
            raise ValueError(f"kfac: block {b.name!r} overlaps another block")
        seen[idx] = True
    return blocks


def _mean_diagonal(m: np.ndarray) -> float:
    """``tr m / dim m`` of a factor held whole (n, n) or as its diagonal (n,)."""
    return float(np.trace(m) if m.ndim == 2 else np.sum(m)) / m.shape[0]


def factored_damping(a: np.ndarray, g: np.ndarray, damping: float) -> tuple[float, float]:
    """The ``(A, G)`` shifts ``(pi sqrt(lambda), sqrt(lambda) / pi)`` (Martens & Grosse, 6.3).

    ``pi = sqrt((tr A / dim A) / (tr G / dim G))`` balances the two factors so
    that the damped product is close to ``A (x) G + lambda I``; a factor with
    zero trace gives ``pi = 1``. Either factor may be a diagonal, held as a vector.
    """
    ta, tg = _mean_diagonal(a), _mean_diagonal(g)
    pi = math.sqrt(ta / tg) if ta > 0 and tg > 0 else 1.0
    root = math.sqrt(damping)
    return pi * root, root / pi


def _refusal(m: np.ndarray, shift: float, who: str) -> str:
    """What :func:`_inverse` says when ``m + shift I`` has no usable inverse."""
    if m.ndim == 1:
        return f"kfac: factor {who} (diagonal) plus {shift:.3g} is not positive; raise the damping"
    return (f"kfac: factor {who} plus {shift:.3g} I is not positive definite; raise the "
            "damping")


def _inverse(m: np.ndarray, shift: float, who: str) -> np.ndarray:
    """``(m + shift I)^-1`` of a symmetric positive (semi-)definite factor, symmetrised.

    A diagonal factor (a vector) gives the vector of the inverse's diagonal.
    Raises ``FloatingPointError`` (:func:`_refusal`) where the shifted factor is
    not positive definite or its inverse overflows.
    """
    if m.ndim == 1:
        shifted = m + shift
        if not np.all(shifted > 0):
            raise FloatingPointError(_refusal(m, shift, who))
        inv = 1.0 / shifted
        if not np.all(np.isfinite(inv)):
            raise FloatingPointError(_refusal(m, shift, who))
        return inv
    from scipy.linalg import lapack  # loaded on first use: importing the solvers stays light

    n = m.shape[0]
    shifted = m + m.T  # symmetrised and shifted in one buffer, factorised and inverted in it
    shifted *= 0.5
    shifted.flat[::n + 1] += shift
    c, info = lapack.dpotrf(shifted, lower=1, overwrite_a=1)
    if info == 0:
        inv, info = lapack.dpotri(c, lower=1, overwrite_c=1)  # from the Cholesky factor
    if info != 0 or not np.all(np.isfinite(inv)):
        raise FloatingPointError(_refusal(m, shift, who))
    upper = np.triu_indices(n, 1)
    inv[upper] = inv.T[upper]  # the lower triangle mirrored
    return inv


def kfac_direction(blocks: tuple[KroneckerBlock, ...], inverses: list[tuple[np.ndarray,
                   np.ndarray]], g: np.ndarray, dtype: Any = np.float64, *,
                   mine: list[bool] | None = None, outside: bool = True) -> np.ndarray:
    """``F^-1 g`` block by block: ``A_l^-1 dW_l G_l^-1``; entries outside the blocks are ``g``.

    An inverse held as a vector is a diagonal matrix (a factor above
    ``max_factor_dim``). Computed in ``dtype`` (the inverses are expected in it).
    One part of a :class:`~.base.WorkShare` computes only the blocks ``mine``
    marks (the others' inverses are not read) and ``g`` outside the blocks only
    if ``outside``; everything else is zero, so the parts' sum is the whole.
    """
    if mine is None:
        p = np.array(g, dtype=dtype, copy=True)
        source = p  # p still holds g outside the blocks written so far
    else:
        source = np.asarray(g, dtype=dtype)
        p = np.array(source, copy=True) if outside else np.zeros(source.shape, dtype=dtype)
    for i, (block, (ai, gi)) in enumerate(zip(blocks, inverses, strict=True)):
        if mine is not None and not mine[i]:
            if outside:
                block.clear(p)
            continue
        dw = block.matrix(source)
        m = ai @ dw if ai.ndim == 2 else ai[:, None] * dw
        block.put(p, m @ gi if gi.ndim == 2 else m * gi[None, :])
    return p


def share_blocks(blocks: tuple[KroneckerBlock, ...], max_dim: int, inverse_every: int,
                 parts: int) -> list[int]:
    """The part that inverts and applies each block: a greedy balance of their work.

    A block's work is its direction's flops (``2 a^2 g + 2 a g^2``; ``a g`` per
    diagonal factor) plus its inversions' (``n^3`` per full factor) spread
    over ``inverse_every`` steps. Largest first, each to the part with the
    least so far (Graham's LPT rule); ties go to the lower block and part, so
    every part computes the same assignment from the shapes alone.
    """
    def work(block: KroneckerBlock) -> float:
        sa, sg = factor_shapes(block, max_dim)
        a, g = block.a_dim, block.g_dim
        apply = (2.0 * a * a * g if len(sa) == 2 else a * g) + (
            2.0 * a * g * g if len(sg) == 2 else a * g)
        invert = sum(float(n) ** 3 if len(s) == 2 else float(n)
                     for n, s in ((a, sa), (g, sg)))
        return apply + invert / inverse_every

    load = [0.0] * parts
    owner = [0] * len(blocks)
    for i in sorted(range(len(blocks)), key=lambda i: (-work(blocks[i]), i)):
        part = min(range(parts), key=lambda k: (load[k], k))
        owner[i] = part
        load[part] += work(blocks[i])
    return owner


#: How K-FAC's output factors G are taken: the exact Fisher of the model's predictive
#: distribution (K backward passes a sample, K the outputs), or the Monte-Carlo Fisher
#: of one label a sample drawn from it (one backward pass; Martens & Grosse 2015, sec. 5).
FISHERS = ("exact", "sampled")


def factor_shapes(block: KroneckerBlock, max_dim: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of a block's ``A`` and ``G``: ``(n, n)``, or ``(n,)`` (its diagonal) above max_dim."""
    def shape(n: int) -> tuple[int, ...]:
        return (n, n) if n <= max_dim else (n,)
    return shape(block.a_dim), shape(block.g_dim)


@dataclass(frozen=True, kw_only=True)
class KFACConfig:
    """Hyper-parameters of K-FAC (defaults: Martens & Grosse 2015; Ba et al. 2017)."""

    learning_rate: float = 0.1  # lr > 0, the step along the natural gradient
    momentum: float = 0.9  # mu in [0, 1)
    damping: float = 1e-3  # lambda > 0, Tikhonov damping shared by the two factors
    stat_decay: float = 0.95  # decay of the factors' running averages, in [0, 1)
    stats_every: int = 1  # new factors from the curvature sample every this many steps
    inverse_every: int = 10  # damped inverses every this many steps
    # ... and at every one of the first this many steps: the running factors of the first
    # steps rest on a few samples and change fast; inverses kept from step 1 misdirect 2-10
    inverse_warmup: int = 0
    kl_clip: float = 1e-3  # step scaled so that lr^2 p.g <= kl_clip; 0 = never
    max_factor_dim: int = 2048  # a factor of a larger order is kept as its diagonal
    fisher: str = "exact"  # G from every class ("exact") or one drawn label a sample ("sampled")
    damping_rule: str = "fixed"  # "fixed" or "levenberg_marquardt" (Martens & Grosse 6.5)
    damping_every: int = 5  # LM: the damping adapts every this many steps (their T1)
    lm_increase: float = 1 / 0.95 ** 5  # LM: damping *= this when rho < lm_rho_low; > 1
    lm_decrease: float = 0.95 ** 5  # LM: damping *= this when rho > lm_rho_high; (0, 1)
    lm_rho_low: float = 0.25  # LM: reduction ratio below which the damping grows
    lm_rho_high: float = 0.75  # LM: reduction ratio above which the damping shrinks
    damping_min: float = 1e-8  # LM: lower bound of the damping; >= 0
    damping_max: float = 1e8  # LM: upper bound of the damping; >= damping_min

    def __post_init__(self) -> None:
        require(self, "learning_rate", "> 0")
        require(self, "damping", "> 0")
        check_damping_rule(self)
        require(self, "damping_every", "int >= 1")
        require(self, "momentum", "[0, 1)")
        require(self, "stat_decay", "[0, 1)")
        require(self, "stats_every", "int >= 1")
        require(self, "inverse_every", "int >= 1")
        require(self, "inverse_warmup", "int >= 0")
        require(self, "kl_clip", ">= 0")
        require(self, "max_factor_dim", "int >= 1")
        require(self, "fisher", "choice", choices=FISHERS)


@dataclass(frozen=True, eq=False)
class KFACState(SolverState):
    """Step count, running factors, their damped inverses and the velocity.

    ``factors`` and ``inverses`` are the blocks' ``A`` then ``G`` matrices
    (diagonals above ``max_factor_dim``), flattened and concatenated in block
    order (None before the first step);
    ``inverses`` is what the last refresh computed, so a resumed run steps
    exactly as an uninterrupted one. ``damping`` is the adapted damping of
    ``damping_rule = "levenberg_marquardt"`` (None: not adapted yet, the
    configured one).
    """

    iteration: int = 0
    factors: np.ndarray | None = None
    inverses: np.ndarray | None = None
    velocity: np.ndarray | None = None
    damping: float | None = None

    def __post_init__(self) -> None:
        _check_counter(self, "iteration")
        object.__setattr__(self, "damping", optional_float(type(self).__name__, "damping",
                                                           self.damping, 0.0, math.inf))
        owner = type(self).__name__
        for name in ("factors", "inverses", "velocity"):
            object.__setattr__(self, name, _float_array(getattr(self, name), owner, name))
        if (self.factors is None) != (self.inverses is None) or (
                self.factors is not None and self.inverses is not None
                and self.factors.shape != self.inverses.shape):
            raise ValueError(f"{owner}: factors and inverses must both be None or vectors "
                             "of one shape")
        super().__post_init__()


def _unpack(flat: np.ndarray, shapes: list[tuple[tuple[int, ...], tuple[int, ...]]],
            ) -> list[tuple[np.ndarray, np.ndarray]]:
    need = sum(math.prod(s) for pair in shapes for s in pair)
    if flat.size != need:
        raise ValueError(f"kfac: the state holds {flat.size} factor entries, the model's "
                         f"blocks need {need} (with this max_factor_dim)")
    out, i = [], 0
    for sa, sg in shapes:
        a = flat[i:i + math.prod(sa)].reshape(sa)
        i += a.size
        g = flat[i:i + math.prod(sg)].reshape(sg)
        i += g.size
        out.append((a, g))
    return out


#: Entries a pass of :func:`_stepped` and :func:`_running_average`: their temporaries
#: (512 KB in float64) stay in cache.
_CHUNK = 1 << 16


def _chunks(size: int) -> Iterator[slice]:
    """Slices of ``_CHUNK`` entries (the last one shorter) that cover ``range(size)``."""
    return (slice(i, i + _CHUNK) for i in range(0, size, _CHUNK))


def _stepped(w: np.ndarray, velocity: np.ndarray, lr: float) -> tuple[np.ndarray, float]:
    """``w - lr velocity`` in the weights' dtype, and ``|w_new - w|`` (NaN/Inf if either is).

    In chunks: as one expression it made a 189 MB temporary and cast through
    numpy's buffers, 0.5 s a step on ResNet-50 in float32, where the chunks
    take 0.04 s; the same operations on each entry, so the same weights.
    """
    new_w = np.empty_like(w)
    squares = 0.0
    for part in _chunks(w.size):
        np.subtract(w[part], lr * velocity[part], out=new_w[part], casting="same_kind")
        moved = np.subtract(new_w[part], w[part], dtype=np.float64)
        squares += float(moved @ moved)  # NaN or Inf stays
    return new_w, math.sqrt(squares)


def _running_average(old: np.ndarray | None, new: list[tuple[np.ndarray, np.ndarray]],
                     shapes: list[tuple[tuple[int, ...], tuple[int, ...]]],
                     decay: float) -> np.ndarray:
    """The packed running factors ``decay old + (1 - decay) new`` (``new`` alone at first).

    Written into one float64 buffer in chunks of ``_CHUNK`` entries, whose
    temporary stays in cache: the whole-vector expression took five passes of
    fresh pages over the packed factors (358 MB in float64 on ResNet-50) a step,
    and a temporary the size of a factor (up to 32 MB) still went through memory
    twice more than the three passes needed (read old, read new, write). The
    same operations on each entry, so the same numbers.
    """
    packed = np.empty(sum(math.prod(s) for pair in shapes for s in pair))
    olds = _unpack(old, shapes) if old is not None else None
    for i, (pair, out) in enumerate(zip(new, _unpack(packed, shapes), strict=True)):
        for j, (m, into) in enumerate(zip(pair, out, strict=True)):
            if olds is None:
                into[...] = m
                continue
            src, prev, dst = m.reshape(-1), olds[i][j].reshape(-1), into.reshape(-1)
            for part in _chunks(dst.size):
                np.multiply(prev[part], decay, out=dst[part])
                dst[part] += np.multiply(src[part], 1 - decay, dtype=np.float64)
    return packed


@dataclass(frozen=True)
class KFACInfo(FixedStepInfo):
    """What one K-FAC step did (``step_size`` is the learning rate)."""

    clip: float  # nu, the KL clip's scale of the step (1: not clipped)
    stats: bool  # whether new factors were taken this step
    inverted: bool  # whether the damped inverses were refreshed this step
    update_norm: float  # |w_new - w|
    damping: float  # lambda at the step's start: a refresh on this step inverts with it
    rho: float | None = None  # LM: actual / predicted decrease, on steps that adapt


class KFAC:
    """K-FAC (Martens & Grosse 2015) with momentum and KL clipping, on the method interface."""

    name: ClassVar[str] = "kfac"
    config_class: ClassVar[type] = KFACConfig
    state_class: ClassVar[type[SolverState]] = KFACState

    def __init__(self, config: KFACConfig | None = None) -> None:
        self.config = KFACConfig() if config is None else config
        self._checked: tuple[Any, int, tuple[KroneckerBlock, ...]] | None = None
        self._cast: tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]] | None = None
        self._owners: tuple[Any, list[int]] | None = None

    def _direction(self, blocks: tuple[KroneckerBlock, ...],
                   inverses: list[tuple[np.ndarray, np.ndarray]], packed: np.ndarray,
                   g: np.ndarray, dtype: np.dtype, share: WorkShare | None,
                   mine: list[bool] | None) -> np.ndarray:
        """``F^-1 g`` in float64, computed in the weights' precision when that is lower.

        A float32 model's direction needs no more: its matrix products in float32
        take half the time of float64 (53.7 GFLOP a step on ResNet-50). The
        float32 inverses are cast once per refresh from the state's float64 ones
        (``packed``, read-only, so its identity names its contents), so a resumed
        run computes the same. With a share, each part computes its own blocks
        (``mine``) and the parts' results are added, in that precision.
        """
        low = np.dtype(dtype) != np.float64
        if low and (self._cast is None or self._cast[0] is not packed):
            self._cast = (packed, [(a.astype(np.float32), b.astype(np.float32))
                                   if mine is None or mine[i] else (a, b)
                                   for i, (a, b) in enumerate(inverses)])
        p = kfac_direction(blocks, self._cast[1] if low else inverses, g,
                           np.float32 if low else np.float64, mine=mine,
                           outside=share is None or share.part == 0)
        if share is not None:
            p = share.add(p)
        return p.astype(np.float64) if low else p

    def _shared(self, problem: Problem, blocks: tuple[KroneckerBlock, ...],
                ) -> tuple[WorkShare | None, list[bool] | None]:
        """The problem's work share (None on one process) and the blocks this part computes."""
        get = getattr(problem, "work_share", None)
        share = get() if callable(get) else None
        if share is None or share.parts == 1:
            return None, None
        key = (blocks, share.parts)
        if self._owners is None or self._owners[0] != key:
            cfg = self.config
            self._owners = (key, share_blocks(blocks, cfg.max_factor_dim, cfg.inverse_every,
                                              share.parts))
        return share, [owner == share.part for owner in self._owners[1]]

    def _invert(self, blocks: tuple[KroneckerBlock, ...], packed: np.ndarray,
                shapes: list[tuple[tuple[int, ...], tuple[int, ...]]],
                share: WorkShare | None, mine: list[bool] | None,
                damping: float) -> np.ndarray:
        """The packed damped inverses of the running factors ``packed``.

        With a share, each part inverts its own blocks into a buffer of zeros and
        the parts add the buffers; a factor whose inverse fails is NaN there, so
        that every part raises the same ``FloatingPointError`` (no part is left
        waiting in the next collective).
        """
        factors = _unpack(packed, shapes)
        # one process writes every block's inverses; a part, its own into zeros
        local = np.empty(packed.size) if share is None else np.zeros(packed.size)
        for i, (b, pair, out) in enumerate(zip(blocks, factors, _unpack(local, shapes),
                                               strict=True)):
            if mine is not None and not mine[i]:
                continue
            shifts = factored_damping(*pair, damping)
            for m, shift, into, which in zip(pair, shifts, out, "AG", strict=True):
                try:
                    into[...] = _inverse(m, shift, f"{which} of {b.name}")
                except FloatingPointError:
                    if share is None:
                        raise
                    into[...] = np.nan
        if share is None:
            return local
        packed_inverses = share.add(local)
        if not np.all(np.isfinite(packed_inverses)):  # the first failed factor, on every part
            for b, pair, out in zip(blocks, factors, _unpack(packed_inverses, shapes),
                                    strict=True):
                shifts = factored_damping(*pair, damping)
                for m, shift, inv, which in zip(pair, shifts, out, "AG", strict=True):
                    if not np.all(np.isfinite(inv)):
                        raise FloatingPointError(_refusal(m, shift, f"{which} of {b.name}"))
        return packed_inverses

    def init(self, w: np.ndarray) -> KFACState:
        """No factors yet: the first step takes them and inverts them."""
        return KFACState()

    def step(self, problem: Problem, w: np.ndarray, state: KFACState, *,
             value_and_grad: tuple[float, np.ndarray] | None = None,
             ) -> tuple[np.ndarray, KFACState, KFACInfo]:
        """One K-FAC step; raises ``FloatingPointError`` on NaN/Inf weights or factors."""
        w = np.asarray(w)
        get_blocks = getattr(problem, "kfac_blocks", None)
        get_factors = getattr(problem, "kfac_factors", None)
        if not (callable(get_blocks) and callable(get_factors)):
            raise TypeError(f"kfac: the problem ({type(problem).__name__}) has no "
                            "kfac_blocks() and kfac_factors(w, max_dim)")
        found = get_blocks()
        if self._checked is None or self._checked[0] is not found or self._checked[1] != w.size:
            self._checked = (found, w.size, check_blocks(found, w.size))
        blocks = self._checked[2]
        loss, g = check_value_and_grad(problem, w, value_and_grad, "kfac")
        cfg = self.config
        shapes = [factor_shapes(b, cfg.max_factor_dim) for b in blocks]
        t = state.iteration
        stats = state.factors is None or t % cfg.stats_every == 0
        if stats:
            sampled = {"sampled": True} if cfg.fisher == "sampled" else {}
            new = [(np.asarray(a), np.asarray(gg))
                   for a, gg in get_factors(w, max_dim=cfg.max_factor_dim, **sampled)]
            if len(new) != len(blocks) or any(
                    (a.shape, gg.shape) != shape for (a, gg), shape in zip(new, shapes,
                                                                            strict=False)):
                raise ValueError("kfac: kfac_factors(w, max_dim) does not match kfac_blocks()")
            packed = _running_average(state.factors, new, shapes, float(cfg.stat_decay))
            if not np.all(np.isfinite(packed)):
                raise FloatingPointError(f"kfac: step {t + 1}: the Kronecker factors hold NaN "
                                         "or Inf")
        else:  # the running factors as they are, not copied (358 MB on ResNet-50)
            assert state.factors is not None
            packed = state.factors
        share, mine = self._shared(problem, blocks)
        lm = cfg.damping_rule == "levenberg_marquardt"
        damping = float(current_damping(state, cfg))
        invert = state.inverses is None or t % cfg.inverse_every == 0 or t < cfg.inverse_warmup
        if invert:
            packed_inverses = self._invert(blocks, packed, shapes, share, mine, damping)
        else:
            assert state.inverses is not None
            packed_inverses = state.inverses
        inverses = _unpack(packed_inverses, shapes)
        p = self._direction(blocks, inverses, packed_inverses, g, w.dtype, share, mine)
        lr = float(cfg.learning_rate)
        nu = 1.0
        if cfg.kl_clip > 0:
            vg = lr * lr * float(p @ g)
            if vg > cfg.kl_clip:
                nu = math.sqrt(float(cfg.kl_clip) / vg)
        v0 = np.zeros_like(p) if state.velocity is None else state.velocity
        if v0.shape != w.shape:
            raise ValueError(f"kfac: velocity has shape {v0.shape}, weights have shape {w.shape}")
        # v = momentum v0 + nu p in place in p's buffer (BLAS axpy): on ResNet-50 each
        # temporary vector would be 189 MB of fresh pages
        from scipy.linalg.blas import daxpy  # loaded on first use, as LAPACK

        velocity = daxpy(v0, np.multiply(p, nu, out=p), a=float(cfg.momentum))
        new_w, moved = _stepped(w, velocity, lr)
        if not np.isfinite(moved):
            raise FloatingPointError(f"kfac: step {t + 1} with learning_rate={lr!r} gives "
                                     "NaN/Inf weights")
        rho, new_damping = None, damping
        if lm and (t + 1) % cfg.damping_every == 0:
            rho = self._reduction_ratio(problem, w, new_w, loss, g)
            new_damping = lm_damping_update(damping, rho, True, cfg)
        info = KFACInfo(loss, float(np.linalg.norm(g)), lr, nu, stats, invert, moved,
                        damping, rho if rho is not None and math.isfinite(rho) else None)
        return new_w, state.take(iteration=t + 1, factors=packed, inverses=packed_inverses,
                                 velocity=velocity, damping=new_damping if lm else None), info

    @staticmethod
    def _reduction_ratio(problem: Problem, w: np.ndarray, new_w: np.ndarray, loss: float,
                         g: np.ndarray) -> float:
        """``rho``: the batch's decrease over the one its quadratic model predicts for ``d``.

        The model is ``c(w) + g . d + d . F d / 2`` with ``F`` the Gauss-Newton
        matrix (Martens & Grosse 2015, sec. 6.5: the exact curvature, without
        the damping); NaN (the damping stays) when the model predicts no
        decrease, ``-inf`` (it grows) when the loss at ``new_w`` is not finite.
        """
        gnvp = getattr(problem, "gnvp", None)
        if not callable(gnvp):
            raise TypeError(f"kfac: damping_rule = \"levenberg_marquardt\" needs Gauss-Newton "
                            f"products; the problem ({type(problem).__name__}) has no gnvp")
        d = np.subtract(new_w, w, dtype=np.float64)
        predicted = -(float(g @ d) + 0.5 * float(d @ np.asarray(gnvp(w, d), dtype=np.float64)))
        actual = loss - float(problem.value(new_w))
        if not math.isfinite(actual):
            return -math.inf
        if not (math.isfinite(predicted) and predicted > 0):
            return math.nan
        return actual / predicted
