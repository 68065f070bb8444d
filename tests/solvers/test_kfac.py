"""K-FAC's solver mathematics against hand-computed references (no TensorFlow, no MPI)."""

import json
import math
import threading

import numpy as np
import pytest

from mpinewton.solvers import METHODS
from mpinewton.solvers.base import ParameterError, WorkShare
from mpinewton.solvers.kfac import (
    KFAC,
    KFACConfig,
    KFACState,
    KroneckerBlock,
    check_blocks,
    factored_damping,
    kfac_direction,
    share_blocks,
)

from .problems import spd_matrix


class KroneckerQuadratic:
    """``c(w) = 0.5 (w - w*)^T H (w - w*)`` with ``H`` block diagonal: ``A (x) G`` per block.

    Weights outside every block have curvature ``outside``. ``factors`` may be
    a list of factor lists, one per call (to check the running averages).
    """

    def __init__(self, blocks, pairs, n, outside=1.0, seed=0, factors=None):
        self.blocks, self.pairs, self.n = tuple(blocks), pairs, n
        self.h = outside * np.eye(n)
        for b, (a, g) in zip(blocks, pairs, strict=True):
            idx = b.indices().ravel()
            self.h[np.ix_(idx, idx)] = np.kron(a, g)
        self.w_star = np.random.default_rng(seed).standard_normal(n)
        self.factor_calls = 0
        self.factors = factors

    def value(self, w):
        d = w - self.w_star
        return 0.5 * float(d @ self.h @ d)

    def value_and_grad(self, w):
        return self.value(w), self.h @ (w - self.w_star)

    def hvp(self, w, v):
        return self.h @ v

    def gnvp(self, w, v):
        return self.h @ v

    def kfac_blocks(self):
        return self.blocks

    def kfac_factors(self, w, max_dim=KFACConfig.max_factor_dim):
        """The factors; one of order above ``max_dim`` as its diagonal, as the model gives it."""
        self.factor_calls += 1
        pairs = self.pairs if self.factors is None else self.factors[self.factor_calls - 1]
        return [tuple(m if len(m) <= max_dim else np.diag(m).copy() for m in pair)
                for pair in pairs]


def _two_blocks():
    # a Dense-like block with a bias row (3 inputs + 1, 2 outputs) and one without, then
    # two weights that no block covers
    b1 = KroneckerBlock("dense", 0, 3, 2, bias_offset=6)
    b2 = KroneckerBlock("out", 8, 2, 3)
    pairs = [(spd_matrix(4, 20.0, 1), spd_matrix(2, 5.0, 2)),
             (spd_matrix(2, 3.0, 3), spd_matrix(3, 50.0, 4))]
    return [b1, b2], pairs, 16


def test_block_indices_are_row_major_kernel_then_bias():
    b = KroneckerBlock("d", 5, 2, 3, bias_offset=20)
    np.testing.assert_array_equal(b.indices(), [[5, 6, 7], [8, 9, 10], [20, 21, 22]])
    assert (b.a_dim, b.g_dim) == (3, 3)
    assert KroneckerBlock("c", 0, 16, 1).indices().shape == (16, 1)
    v = np.arange(30.0)
    np.testing.assert_array_equal(b.matrix(v), v[b.indices()])  # slices read what indices name
    out = np.zeros(30)
    b.put(out, b.matrix(v) + 1)
    np.testing.assert_array_equal(out[b.indices()], v[b.indices()] + 1)
    assert np.count_nonzero(out) == 9


def test_check_blocks_refuses_overlap_and_overreach():
    with pytest.raises(ValueError, match="overlaps"):
        check_blocks([KroneckerBlock("a", 0, 2, 2), KroneckerBlock("b", 3, 1, 2)], 10)
    with pytest.raises(ValueError, match="reaches weight 10"):
        check_blocks([KroneckerBlock("a", 5, 3, 2)], 10)
    with pytest.raises(TypeError, match="KroneckerBlock"):
        check_blocks([(0, 2, 2)], 10)
    with pytest.raises(ValueError, match="rows"):
        KroneckerBlock("a", 0, 0, 2)


def test_factored_damping_matches_hand_computation():
    a = np.diag([4.0, 2.0, 6.0])  # tr/dim = 4
    g = np.diag([1.0, 0.0])  # tr/dim = 0.5
    sa, sg = factored_damping(a, g, 0.01)
    pi = math.sqrt(4.0 / 0.5)
    assert sa == pytest.approx(pi * 0.1, rel=1e-15)
    assert sg == pytest.approx(0.1 / pi, rel=1e-15)
    assert sa * sg == pytest.approx(0.01, rel=1e-15)  # the product's shift is lambda
    assert factored_damping(a, np.zeros((2, 2)), 0.04) == (0.2, 0.2)  # dead layer: pi = 1


def test_direction_is_the_inverse_kronecker_product_per_block():
    blocks, pairs, n = _two_blocks()
    g = np.random.default_rng(5).standard_normal(n)
    inverses = [(np.linalg.inv(a), np.linalg.inv(gg)) for a, gg in pairs]
    p = kfac_direction(tuple(blocks), inverses, g)
    for b, (a, gg) in zip(blocks, pairs, strict=True):
        idx = b.indices().ravel()
        np.testing.assert_allclose(p[idx], np.linalg.solve(np.kron(a, gg), g[idx]),
                                   rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(p[[14, 15]], g[[14, 15]])  # outside: the gradient


def test_one_undamped_step_lands_on_the_minimiser_of_a_kronecker_quadratic():
    blocks, pairs, n = _two_blocks()
    prob = KroneckerQuadratic(blocks, pairs, n)
    method = KFAC(KFACConfig(learning_rate=1.0, momentum=0.0, damping=1e-24, kl_clip=0.0))
    w0 = np.zeros(n)
    w1, state, info = method.step(prob, w0, method.init(w0))
    covered = np.concatenate([b.indices().ravel() for b in blocks])
    np.testing.assert_allclose(w1[covered], prob.w_star[covered], rtol=1e-8, atol=1e-8)
    # uncovered weights took the plain step -lr g; their curvature is 1, so they land too
    np.testing.assert_allclose(w1, prob.w_star, rtol=1e-8, atol=1e-8)
    assert info.clip == 1.0 and info.stats and info.inverted
    assert info.loss == pytest.approx(prob.value(w0))
    assert info.update_norm == pytest.approx(np.linalg.norm(prob.w_star))


def test_damping_shifts_each_factor_as_martens_and_grosse():
    blocks, pairs, n = _two_blocks()
    prob = KroneckerQuadratic(blocks, pairs, n)
    lam = 0.3
    method = KFAC(KFACConfig(learning_rate=1.0, momentum=0.0, damping=lam, kl_clip=0.0))
    w0 = np.zeros(n)
    _, g = prob.value_and_grad(w0)
    w1, _, _ = method.step(prob, w0, method.init(w0))
    for b, (a, gg) in zip(blocks, pairs, strict=True):
        pi = math.sqrt((np.trace(a) / a.shape[0]) / (np.trace(gg) / gg.shape[0]))
        ad = a + pi * math.sqrt(lam) * np.eye(a.shape[0])
        gd = gg + math.sqrt(lam) / pi * np.eye(gg.shape[0])
        idx = b.indices().ravel()
        np.testing.assert_allclose(w1[idx], -np.linalg.solve(np.kron(ad, gd), g[idx]),
                                   rtol=1e-10)


def test_kl_clip_scales_the_step():
    blocks, pairs, n = _two_blocks()
    prob = KroneckerQuadratic(blocks, pairs, n)
    lr, kl = 0.5, 1e-3
    w0 = np.zeros(n)
    _, g = prob.value_and_grad(w0)
    free = KFAC(KFACConfig(learning_rate=lr, momentum=0.0, damping=1e-3, kl_clip=0.0))
    w_free, _, info_free = free.step(prob, w0, free.init(w0))
    p = (w0 - w_free) / lr
    vg = lr * lr * float(p @ g)
    assert vg > kl  # the clip is active here
    clipped = KFAC(KFACConfig(learning_rate=lr, momentum=0.0, damping=1e-3, kl_clip=kl))
    w_clip, _, info = clipped.step(prob, w0, clipped.init(w0))
    nu = math.sqrt(kl / vg)
    assert info.clip == pytest.approx(nu, rel=1e-12) and info_free.clip == 1.0
    np.testing.assert_allclose(w_clip, w0 - lr * nu * p, rtol=1e-12)


@pytest.mark.parametrize("warmup", [0, 5])
def test_running_averages_refresh_and_momentum_by_hand(warmup):
    """New factors every 2 steps, inverses every 3 (and at each of the first ``warmup``)."""
    blocks, pairs, n = _two_blocks()
    rng = np.random.default_rng(9)
    calls = [[(a * s, g * s) for a, g in pairs] for s in rng.uniform(0.5, 2.0, size=8)]
    prob = KroneckerQuadratic(blocks, pairs, n, factors=calls)
    cfg = KFACConfig(learning_rate=0.05, momentum=0.5, damping=1e-2, stat_decay=0.8,
                     stats_every=2, inverse_every=3, inverse_warmup=warmup, kl_clip=0.0)
    method = KFAC(cfg)
    w = rng.standard_normal(n)
    state = method.init(w)
    ref_f, ref_inv, v = None, None, np.zeros(n)
    used = 0
    for t in range(8):
        _, g = prob.value_and_grad(w)
        w_new, state, info = method.step(prob, w, state)
        refresh = t % 3 == 0 or t < warmup  # warmup 5: steps 1-5 and 7 (t = 0-4, 6)
        assert info.stats == (t % 2 == 0) and info.inverted == refresh
        if t % 2 == 0:
            new = calls[used]
            used += 1
            ref_f = new if ref_f is None else [
                (0.8 * a0 + 0.2 * a1, 0.8 * g0 + 0.2 * g1)
                for (a0, g0), (a1, g1) in zip(ref_f, new, strict=True)]
        if refresh:
            ref_inv = []
            for a, gg in ref_f:
                sa, sg = factored_damping(a, gg, 1e-2)
                ref_inv.append((np.linalg.inv(a + sa * np.eye(len(a))),
                                np.linalg.inv(gg + sg * np.eye(len(gg)))))
        v = 0.5 * v + kfac_direction(tuple(blocks), ref_inv, g)
        np.testing.assert_allclose(w_new, w - 0.05 * v, rtol=1e-10, atol=1e-14)
        w = w_new
    assert prob.factor_calls == 4


@pytest.mark.parametrize("rule", ["fixed", "levenberg_marquardt"])
def test_resume_from_a_saved_state_is_bitwise_the_same(rule):
    blocks, pairs, n = _two_blocks()
    cfg = KFACConfig(learning_rate=0.2, inverse_every=4, stats_every=2, damping_rule=rule,
                     damping_every=2)
    w0 = np.linspace(-1, 1, n)

    def steps(w, state, k, prob):
        for _ in range(k):
            w, state, _ = KFAC(cfg).step(prob, w, state)
        return w, state

    w_all, s_all = steps(w0, KFACState(), 7, KroneckerQuadratic(blocks, pairs, n))
    w_mid, s_mid = steps(w0, KFACState(), 3, KroneckerQuadratic(blocks, pairs, n))
    saved = json.loads(json.dumps({k: v.tolist() if isinstance(v, np.ndarray) else v
                                   for k, v in s_mid.to_dict().items()}))
    w_end, s_end = steps(w_mid, KFACState.from_dict(saved), 4,
                         KroneckerQuadratic(blocks, pairs, n))
    np.testing.assert_array_equal(w_end, w_all)
    assert s_end == s_all
    assert (s_all.damping is not None) == (rule == "levenberg_marquardt")


class MiscalibratedQuadratic(KroneckerQuadratic):
    """The quadratic whose Gauss-Newton products are ``scale H v``: the model errs by ``scale``."""

    scale = 1.0

    def gnvp(self, w, v):
        return self.scale * (self.h @ v)


def _lm_by_hand(damping, rho, cfg):
    if rho < cfg.lm_rho_low:
        damping *= cfg.lm_increase
    elif rho > cfg.lm_rho_high:
        damping *= cfg.lm_decrease
    return min(max(damping, cfg.damping_min), cfg.damping_max)


def test_levenberg_marquardt_damping_follows_the_reduction_ratio_by_hand():
    """Martens & Grosse 6.5: rho from c and the model g.d + d.F d / 2, every damping_every steps."""
    blocks, pairs, n = _two_blocks()
    prob = MiscalibratedQuadratic(blocks, pairs, n)
    cfg = KFACConfig(learning_rate=0.5, momentum=0.5, damping=1e-2, kl_clip=0.0,
                     inverse_every=2, damping_rule="levenberg_marquardt", damping_every=3)
    method = KFAC(cfg)
    w, state = prob.w_star + 0.8 * np.cos(np.arange(n)), KFACState()
    damping, ratios, moves = cfg.damping, [], set()
    for t in range(1, 25):
        prob.scale = (1.0, 0.1, 0.6)[(t // 3) % 3]  # exact, far too flat, a little flat
        c0, g = prob.value_and_grad(w)
        new_w, state, info = method.step(prob, w, state)
        assert info.damping == damping  # the damping this step started from
        if t % 3:
            assert info.rho is None and state.damping == damping
        else:
            d = new_w - w
            predicted = -(g @ d + 0.5 * prob.scale * (d @ prob.h @ d))
            if predicted <= 0:  # momentum can step where the model rises: no ratio, kept
                assert info.rho is None and state.damping == damping
                moves.add(0.0)
                w = new_w
                continue
            rho = (c0 - prob.value(new_w)) / predicted
            assert info.rho == pytest.approx(rho, rel=1e-12)
            ratios.append(rho)
            new = _lm_by_hand(damping, rho, cfg)
            moves.add(float(np.sign(new - damping)))
            damping = new
            assert state.damping == pytest.approx(damping, rel=1e-14)
        w = new_w
    # it grew, shrank, and stayed where momentum stepped against the model (the rule's
    # middle band is newton's lm_damping_update, tested with Newton-CG)
    assert moves == {-1.0, 0.0, 1.0}
    assert min(ratios) < cfg.lm_rho_low < cfg.lm_rho_high < max(ratios)


def test_levenberg_marquardt_damping_on_an_exact_model_shrinks_to_its_floor():
    """On the quadratic the model is exact (rho = 1): lm_decrease each time, down to damping_min."""
    blocks, pairs, n = _two_blocks()
    prob = KroneckerQuadratic(blocks, pairs, n)
    cfg = KFACConfig(learning_rate=0.3, momentum=0.0, damping=1e-1, kl_clip=0.0, inverse_every=1,
                     damping_rule="levenberg_marquardt", damping_every=1, damping_min=0.05)
    method = KFAC(cfg)
    w, state, seen = np.zeros(n), KFACState(), []
    for _ in range(5):
        w, state, info = method.step(prob, w, state)
        assert info.rho == pytest.approx(1.0, rel=1e-9)
        seen.append(info.damping)
    np.testing.assert_allclose(seen, [0.1, 0.1 * cfg.lm_decrease, 0.1 * cfg.lm_decrease ** 2,
                                      0.05, 0.05], rtol=1e-14)
    # each refresh inverted with the damping of its step: the state's inverses are those
    # of damping_min
    fresh = KFAC(KFACConfig(damping=0.05, kl_clip=0.0))
    _, ref, _ = fresh.step(prob, np.zeros(n), KFACState())
    np.testing.assert_allclose(state.inverses, ref.inverses, rtol=1e-12)


def test_levenberg_marquardt_damping_needs_gauss_newton_products_and_grows_on_overflow():
    blocks, pairs, n = _two_blocks()

    class NoProducts(KroneckerQuadratic):
        gnvp = None

    cfg = KFACConfig(damping_rule="levenberg_marquardt", damping_every=1)
    with pytest.raises(TypeError, match="needs Gauss-Newton products.*has no gnvp"):
        KFAC(cfg).step(NoProducts(blocks, pairs, n), np.zeros(n), KFACState())

    class Overflows(KroneckerQuadratic):
        def value(self, w):  # the loss at the new weights overflows; at the old it is finite
            return math.inf if self.calls else super().value(w)

        def value_and_grad(self, w):
            self.calls = 1
            return super().value(w), self.h @ (w - self.w_star)

    prob = Overflows(blocks, pairs, n)
    prob.calls = 0
    _, state, info = KFAC(cfg).step(prob, np.zeros(n), KFACState())
    assert info.rho is None and state.damping == pytest.approx(cfg.damping * cfg.lm_increase)


def test_float32_weights_step_as_float64_to_their_precision_and_resume_the_same():
    """A float32 model's direction is computed in float32: the steps agree with the
    float64 ones to float32's precision, the weights stay float32, a resumed run
    recasts the inverses and steps bitwise as an uninterrupted one, and steps without
    new factors or inverses keep the state's arrays without copying them."""
    blocks, pairs, n = _two_blocks()
    cfg = KFACConfig(learning_rate=0.2, inverse_every=3, stats_every=2)
    w0 = np.linspace(-1, 1, n)

    def steps(w, state, k):
        prob, method = KroneckerQuadratic(blocks, pairs, n), KFAC(cfg)
        out = []
        for _ in range(k):
            w, state, _ = method.step(prob, w, state)
            out.append((w, state))
        return out

    run64 = steps(w0, KFACState(), 6)
    run32 = steps(w0.astype(np.float32), KFACState(), 6)
    for (w64, _), (w32, _) in zip(run64, run32, strict=True):
        assert w32.dtype == np.float32
        np.testing.assert_allclose(w32, w64, rtol=2e-5, atol=2e-6)
    # step 2 (t = 1) takes no factors and no inverses: the state keeps them as they are
    assert run32[1][1].factors is run32[0][1].factors
    assert run32[1][1].inverses is run32[0][1].inverses
    assert run32[3][1].inverses is not run32[2][1].inverses  # t = 3 refreshes them
    saved = KFACState.from_dict(run32[1][1].to_dict())
    resumed = steps(run32[1][0], saved, 4)
    np.testing.assert_array_equal(resumed[-1][0], run32[-1][0])
    assert resumed[-1][1] == run32[-1][1]


def test_diagonal_factors_above_max_factor_dim_step_as_the_same_diagonal_matrices():
    """A factor above ``max_factor_dim`` is held as its diagonal: where the factor is a
    diagonal matrix, the steps are those of the whole-matrix path (damping, inverses,
    averages, momentum and KL clip alike), and the state holds n, not n^2, entries."""
    blocks, pairs, n = _two_blocks()
    rng = np.random.default_rng(8)
    diagonal = [(np.diag(rng.uniform(0.5, 20.0, 4)), pairs[0][1]),
                (pairs[1][0], np.diag(rng.uniform(0.1, 50.0, 3)))]
    later = [[(m * rng.uniform(0.5, 2.0) if m.shape[0] != 4 else np.diag(np.diag(m) * 1.5),
               g) for m, g in diagonal] for _ in range(6)]

    def run(max_dim):
        cfg = KFACConfig(learning_rate=0.3, damping=1e-2, inverse_every=2, max_factor_dim=max_dim)
        prob = KroneckerQuadratic(blocks, diagonal, n, factors=later)
        w, state = np.zeros(n), KFACState()
        for _ in range(6):
            w, state, info = KFAC(cfg).step(prob, w, state)
        return w, state

    w_full, s_full = run(2048)
    w_diag, s_diag = run(2)  # block 1's A (order 4) and block 2's G (order 3) as diagonals
    np.testing.assert_allclose(w_diag, w_full, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(s_diag.velocity, s_full.velocity, rtol=1e-12, atol=1e-14)
    assert s_full.factors.size == 16 + 4 + 4 + 9 and s_diag.factors.size == 4 + 4 + 4 + 3
    with pytest.raises(ValueError, match="max_factor_dim"):  # a resume with another cap
        KFAC(KFACConfig(max_factor_dim=2)).step(KroneckerQuadratic(blocks, diagonal, n),
                                                np.zeros(n), s_full)
    with pytest.raises(FloatingPointError, match="diagonal"):
        bad = [(-np.eye(4), pairs[0][1]), pairs[1]]
        KFAC(KFACConfig(max_factor_dim=3)).step(
            KroneckerQuadratic(blocks, pairs, n, factors=[bad]), np.zeros(n), KFACState())


def test_state_and_config_validate():
    with pytest.raises(ValueError, match="factors and inverses"):
        KFACState(factors=np.zeros(3))
    with pytest.raises(ValueError, match="iteration"):
        KFACState(iteration=-1)
    for field, value in (("learning_rate", 0.0), ("damping", 0.0), ("momentum", 1.0),
                         ("stat_decay", -0.1), ("stats_every", 0), ("inverse_every", 1.5),
                         ("inverse_warmup", -1), ("kl_clip", -1.0), ("max_factor_dim", 0),
                         ("damping_rule", "trust_region"), ("damping_every", 0),
                         ("lm_increase", 1.0), ("lm_decrease", 1.0), ("lm_rho_low", 0.0),
                         ("damping_min", -1.0)):
        with pytest.raises(ParameterError, match=f"KFACConfig.{field} ") as err:
            KFACConfig(**{field: value})
        assert err.value.name == field
    with pytest.raises(ParameterError, match="KFACConfig.lm_rho_high "):
        KFACConfig(lm_rho_low=0.5, lm_rho_high=0.4)
    with pytest.raises(ParameterError, match="KFACConfig.damping_max "):
        KFACConfig(damping_min=1.0, damping_max=0.5)
    with pytest.raises(ValueError, match="damping"):
        KFACState(damping=-1.0)
    assert METHODS["kfac"] is KFAC and KFAC.config_class is KFACConfig
    assert KFAC().init(np.zeros(3)) == KFACState()


def test_step_refuses_problems_without_factors_and_non_finite_factors():
    from .problems import Quadratic

    with pytest.raises(TypeError, match="kfac_blocks"):
        KFAC().step(Quadratic(np.eye(2), np.ones(2)), np.zeros(2), KFACState())
    blocks, pairs, n = _two_blocks()
    bad = [(pairs[0][0] * np.nan, pairs[0][1]), pairs[1]]
    prob = KroneckerQuadratic(blocks, pairs, n, factors=[bad])
    with pytest.raises(FloatingPointError, match="NaN or Inf"):
        KFAC().step(prob, np.zeros(n), KFACState())
    wrong = [pairs[0]]
    prob = KroneckerQuadratic(blocks, pairs, n, factors=[wrong])
    with pytest.raises(ValueError, match="does not match"):
        KFAC().step(prob, np.zeros(n), KFACState())
    indefinite = [(-np.eye(4), pairs[0][1]), pairs[1]]
    prob = KroneckerQuadratic(blocks, pairs, n, factors=[indefinite])
    with pytest.raises(FloatingPointError, match="not positive definite"):
        KFAC(KFACConfig(damping=1e-4)).step(prob, np.zeros(n), KFACState())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_chunked_update_is_the_whole_vector_expression(dtype):
    """``_stepped`` gives bitwise ``w - lr v`` in w's dtype over several chunks and a
    ragged end; its |w_new - w| is numpy's norm to rounding; NaN and Inf show in it."""
    from mpinewton.solvers.kfac import _CHUNK, _stepped

    rng = np.random.default_rng(3)
    w = rng.standard_normal(3 * _CHUNK + 17).astype(dtype)
    v = rng.standard_normal(w.size)
    new, moved = _stepped(w, v, 0.3)
    whole = np.subtract(w, 0.3 * v, out=np.empty_like(w), casting="same_kind")
    assert new.dtype == dtype
    np.testing.assert_array_equal(new, whole)
    assert moved == pytest.approx(np.linalg.norm(whole.astype(np.float64) - w), rel=1e-12)
    for bad in (np.nan, np.inf):
        v[2 * _CHUNK + 5] = bad
        assert not math.isfinite(_stepped(w, v, 0.3)[1])


def test_the_running_average_is_the_whole_vector_expression():
    """In chunks into one buffer: bitwise ``d old + (1 - d) new`` of float64 factors,
    also from float32 factors (a float32 model's), for diagonal ones and for a factor
    longer than a chunk (its last chunk partial); at first ``new``."""
    from mpinewton.solvers.kfac import _CHUNK, _running_average

    def _pack(pairs):
        return np.concatenate([m.reshape(-1) for pair in pairs for m in pair])

    rng = np.random.default_rng(4)
    side = math.isqrt(_CHUNK) + 3  # side^2 entries: one whole chunk and part of another
    assert _CHUNK < side * side < 2 * _CHUNK
    shapes = [((5, 5), (3,)), ((2, 2), (4, 4)), ((side, side), (2 * _CHUNK + 7,))]
    old = [(rng.random(sa), rng.random(sg)) for sa, sg in shapes]
    new = [(rng.random(sa).astype(np.float32), rng.random(sg)) for sa, sg in shapes]
    expected = [(0.9 * a0 + (1 - 0.9) * np.float64(a1), 0.9 * g0 + (1 - 0.9) * g1)
                for (a0, g0), (a1, g1) in zip(old, new, strict=True)]
    np.testing.assert_array_equal(_running_average(_pack(old), new, shapes, 0.9),
                                  _pack(expected))
    first = _running_average(None, new, shapes, 0.9)
    assert first.dtype == np.float64
    np.testing.assert_array_equal(first, _pack([(np.float64(a), g) for a, g in new]))


def _four_blocks():
    """Four blocks of unequal work (with and without bias rows) and 3 weights outside."""
    blocks = [KroneckerBlock("conv", 0, 6, 4, bias_offset=24), KroneckerBlock("d1", 28, 3, 2),
              KroneckerBlock("d2", 34, 2, 5, bias_offset=44), KroneckerBlock("out", 49, 5, 3)]
    pairs = [(spd_matrix(b.a_dim, 30.0, 10 + i), spd_matrix(b.g_dim, 8.0, 20 + i))
             for i, b in enumerate(blocks)]
    return blocks, pairs, 67


class _Collective:
    """``WorkShare.add`` for parts that are threads of one process (an Allreduce SUM)."""

    def __init__(self, parts):
        self.parts, self.slots = parts, [None] * parts
        self.barrier = threading.Barrier(parts, timeout=30)

    def share(self, part):
        def add(x):
            self.slots[part] = np.array(x, copy=True)
            self.barrier.wait()
            total = self.slots[0].copy()
            for other in self.slots[1:]:
                total += other
            self.barrier.wait()  # nobody overwrites a slot before all have read them
            return total
        return WorkShare(part, self.parts, add)


class _SharedProblem:
    """A problem that is one part of a work share."""

    def __init__(self, problem, share):
        self.problem, self.share = problem, share

    def __getattr__(self, name):
        return getattr(self.problem, name)

    def work_share(self):
        return self.share


def _run_parts(parts, make_problem, w0, cfg, steps):
    """``steps`` K-FAC steps on each of ``parts`` threads; each part's results or error."""
    collective = _Collective(parts)
    out = [None] * parts

    def run(part):
        prob = _SharedProblem(make_problem(), collective.share(part))
        method, w, state = KFAC(cfg), w0, KFACState()
        try:
            for _ in range(steps):
                w, state, _ = method.step(prob, w, state)
            out[part] = (w, state)
        except Exception as err:  # a part left waiting in a collective: BrokenBarrierError
            out[part] = err

    threads = [threading.Thread(target=run, args=(part,)) for part in range(parts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_work_shared_among_parts_gives_bitwise_the_steps_of_one_process(dtype):
    """Each part inverts and applies its own blocks and the parts add the results: on
    1, 2 and 3 parts (3 parts: one of them may own a single block) every part's weights,
    running factors, inverses and velocity are bitwise those of one process, over 6
    steps with refreshes at steps 1, 3 and 5, diagonal factors and float32 weights."""
    blocks, pairs, n = _four_blocks()
    rng = np.random.default_rng(5)
    later = [[(a * rng.uniform(0.5, 2.0), g * rng.uniform(0.5, 2.0)) for a, g in pairs]
             for _ in range(6)]
    cfg = KFACConfig(learning_rate=0.2, damping=1e-2, inverse_every=2, max_factor_dim=6)
    w0 = np.linspace(-1, 1, n).astype(dtype)

    def make():
        return KroneckerQuadratic(blocks, pairs, n, factors=later)

    prob, method, w, state = make(), KFAC(cfg), w0, KFACState()
    for _ in range(6):
        w, state, _ = method.step(prob, w, state)
    for parts in (1, 2, 3):
        owners = share_blocks(tuple(blocks), cfg.max_factor_dim, cfg.inverse_every, parts)
        assert sorted(set(owners)) == list(range(min(parts, len(blocks))))
        for part_w, part_state in _run_parts(parts, make, w0, cfg, 6):
            assert part_w.dtype == dtype
            np.testing.assert_array_equal(part_w, w)
            for name in ("factors", "inverses", "velocity"):
                np.testing.assert_array_equal(getattr(part_state, name), getattr(state, name))


def test_a_failed_inverse_on_one_part_stops_every_part_with_the_same_error():
    """A factor that no damping makes positive, inverted by one part only: every part
    raises the error one process raises (none waits in the next collective)."""
    blocks, pairs, n = _four_blocks()
    bad = [pair if i != 2 else (pair[0], -10 * np.eye(blocks[2].g_dim))
           for i, pair in enumerate(pairs)]
    cfg = KFACConfig(max_factor_dim=6)
    with pytest.raises(FloatingPointError) as alone:
        KFAC(cfg).step(KroneckerQuadratic(blocks, bad, n), np.zeros(n), KFACState())
    assert "G of d2" in str(alone.value)
    owners = share_blocks(tuple(blocks), cfg.max_factor_dim, cfg.inverse_every, 3)
    assert owners.count(owners[2]) < len(blocks)  # d2's part is not every block's
    for result in _run_parts(3, lambda: KroneckerQuadratic(blocks, bad, n), np.zeros(n),
                             cfg, 1):
        assert isinstance(result, FloatingPointError) and str(result) == str(alone.value)


def test_share_blocks_balances_the_work_the_same_on_every_part():
    """Largest first to the least-loaded part: a deterministic assignment that no part
    computes differently; one part takes all; a heavy block gets a part to itself."""
    blocks = tuple(KroneckerBlock(f"b{i}", 100 * i, rows, cols)
                   for i, (rows, cols) in enumerate([(40, 40), (5, 5), (5, 5), (6, 4), (3, 3)]))
    assert share_blocks(blocks, 2048, 10, 1) == [0] * 5
    two = share_blocks(blocks, 2048, 10, 2)
    assert two == share_blocks(blocks, 2048, 10, 2) and two[0] == 0
    assert set(two[1:]) == {1}  # b0 outweighs the four small blocks together
    assert sorted(share_blocks(blocks, 2048, 10, 5)) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="part"):
        WorkShare(2, 2, lambda x: x)
