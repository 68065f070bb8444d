"""Smoke test of ``python -m mpinewton.bench`` on a tiny problem.

The benchmark's figures are not checked (speed targets never are by tests);
what is checked is that each benchmark runs to the end as a command, prints its
figures and writes JSON of the documented shape with positive, finite timings.
Tiny means: random images (``--synthetic``), batches of 10 and 20 (``--sizes``;
1 and 2 for ``hessian``), one timed call after the warm-up (``--repeats 1``),
shards of 20 and 40 for ``memory`` (``--samples``), one thread.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mpijobs import pythonpath

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--synthetic", "--sizes", "10,20", "--repeats", "1", "--samples", "40", "--threads", "1"]


def _bench(tmp_path, which, *extra):
    """Run one benchmark as a command (``extra`` after TINY, so it overrides it); its
    stdout and the JSON it wrote."""
    out = tmp_path / f"{which}.json"
    env = dict(os.environ, PYTHONPATH=pythonpath(), TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, "-m", "mpinewton.bench", which, *TINY, *extra,
                           "--out", str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=150)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"== {which}" in proc.stdout and f"wrote {out}" in proc.stdout, proc.stdout
    results = json.loads(out.read_text())
    assert set(results) == {"machine", "data", "threads", "micro_batch", which}, list(results)
    assert results["data"] == "synthetic" and results["threads"] == 1
    assert results["micro_batch"] == {"hessian": 250}.get(which, 500)
    assert results["machine"]["tensorflow"]
    return proc.stdout, results[which]


def _positive(value):
    return isinstance(value, float) and math.isfinite(value) and value > 0


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_products(tmp_path):
    stdout, products = _bench(tmp_path, "products")
    modes = ("reverse_over_reverse", "forward_over_reverse")
    assert set(products) == {f"b={b} {mode}" for b in (10, 20) for mode in modes} | {
        "b=10 reverse_over_reverse (no XLA)"}
    for key, figures in products.items():
        gn = {"gnvp_s", "gnvp_over_hvp", "gnvp_over_grad", "gnvp_over_hvp_median"} \
            if key.split()[1] == "reverse_over_reverse" else set()
        assert set(figures) == {"grad_s", "hvp_s", "ratio", "ratio_median", "ratio_min",
                                "ratio_max", "rounds"} | gn, key
        assert figures.pop("rounds") == 1  # --repeats
        assert all(_positive(x) for x in figures.values()), (key, figures)
        assert figures["ratio"] == pytest.approx(figures["hvp_s"] / figures["grad_s"])
        assert figures["ratio_min"] <= figures["ratio_median"] <= figures["ratio_max"]
        if gn:
            assert figures["gnvp_over_hvp"] == pytest.approx(figures["gnvp_s"] / figures["hvp_s"])
        assert key in stdout
    assert stdout.count("HVP/gradient") == len(products)
    assert stdout.count("GN/HVP") == 3


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_micro_batches(tmp_path):
    """Micro-batches 10 and 20 (``--sizes``) on 2 ranks: every product timed at each."""
    stdout, out = _bench(tmp_path, "micro-batches")
    products = {"gradient", "gauss-newton", "hvp", "gauss-newton on 5 %",
                "fisher diagonal on 5 %"}
    assert out["ranks"] == 2 and out["samples"] == 40 and out["curvature_samples"] >= 1
    for mb in ("10", "20"):
        assert set(out[mb]) == products, out[mb]
        for figures in out[mb].values():
            assert _positive(figures["median_s"]) and _positive(figures["best_s"])
            assert figures["best_s"] <= figures["median_s"]
    assert stdout.count("\n         10  ") == 1 and "(median seconds" in stdout


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_table(tmp_path):
    stdout, table = _bench(tmp_path, "table")
    assert set(table) == {"10", "20"}
    assert all(_positive(table[b]["hvp_s"]) for b in table)
    # b = 10 is in the thesis' table 14.2 (64 ms); b = 20 is not.
    assert table["10"]["thesis_s"] == 0.064
    assert table["10"]["speedup"] == pytest.approx(0.064 / table["10"]["hvp_s"])
    assert table["20"]["thesis_s"] is None and table["20"]["speedup"] is None
    assert "b=10" in stdout and "thesis" in stdout and "b=20" in stdout


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_memory(tmp_path):
    stdout, memory = _bench(tmp_path, "memory")  # shards of 20 and 40, a fresh process each
    assert set(memory) == {"20", "40", "growth"}
    for samples in ("20", "40"):
        figures = memory[samples]
        assert figures["samples"] == int(samples)
        assert all(_positive(figures[key]) for key in ("peak_rss_mib", "rss_before_hvp_mib",
                                                        "process_max_rss_mib")), figures
        assert figures["peak_rss_mib"] >= figures["rss_before_hvp_mib"]
    assert math.isfinite(memory["growth"])
    assert "peak RSS during HVPs" in stdout and "growth when the shard doubles" in stdout


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_hessian(tmp_path):
    # b = 1 and 2: every method runs (the three processes' start is most of the test's time)
    stdout, hessian = _bench(tmp_path, "hessian", "--sizes", "1,2")
    assert set(hessian) == {"block", "hvp", "loop_b", "jacobian_max_b", "jacobian_guard_mib",
                            "sizes"}
    assert set(hessian["sizes"]) == {"1", "2"} and hessian["loop_b"] == 2
    for figures in hessian["sizes"].values():
        assert all(_positive(figures[key]) for key in ("batched_s", "batched_first_block_s",
                                                        "batched_peak_rss_mib")), figures
        assert figures["symmetry_rel"] < 1e-12
        jacobian = figures["jacobian"]
        assert _positive(jacobian["seconds"]) and _positive(jacobian["peak_rss_mib"]), jacobian
        assert jacobian["max_rel_diff"] < 1e-12  # batched products = the thesis' jacobian
    one, two = hessian["sizes"]["1"], hessian["sizes"]["2"]
    # b = 1 is in the thesis' table 14.1 (6.529 s); b = 2 is not.
    assert one["thesis_s"] == 6.529
    assert one["speedup_vs_thesis"] == pytest.approx(6.529 / one["batched_s"])
    assert two["thesis_s"] is None and two["speedup_vs_thesis"] is None
    # the loop of single products runs at the largest b only
    assert _positive(two["loop_s"]) and "loop_s" not in one
    assert two["batching_gain"] == pytest.approx(two["loop_s"] / two["batched_s"])
    assert two["loop_max_abs_diff"] < 1e-12
    assert "tape.jacobian" in stdout and "max|Hb-Hj|/max|Hj|" in stdout


@pytest.mark.parametrize("sizes", ["0", "10,x", ""])
def test_sizes_must_be_positive_integers(sizes, capsys):
    from mpinewton.bench import main

    with pytest.raises(SystemExit) as exc:
        main(["table", "--sizes", sizes])
    assert exc.value.code == 2 and "--sizes" in capsys.readouterr().err


def test_interleaved_rounds_turn_the_order_and_ratios_are_per_round():
    """Each round calls every product once, the order reversed every other round."""
    from mpinewton.bench import _interleaved, _round_ratios

    calls = []
    times = _interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 3)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warm-up, then a b / b a / a b
    assert {name: len(t) for name, t in times.items()} == {"a": 3, "b": 3}
    ratios = _round_ratios([2.0, 3.0, 9.0], [1.0, 2.0, 3.0])  # 2, 1.5, 3
    assert ratios == {"median": 2.0, "min": 1.5, "max": 3.0}
